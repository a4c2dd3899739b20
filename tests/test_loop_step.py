"""The training step's maths on known inputs: every option that reaches the step changes the denoiser's input, the
target, the loss or the weight update exactly as the formulas below say.

Each test builds the real `Trainer` in-process on a tiny model (LoRA or DreamBooth), runs its set-up steps, takes the
first batch of a four-image dataset (two train images, two regularisation images, latents cached), wraps the
denoiser's forward to see what it is called with and what it returns, and runs `training_step(batch)` once. The test
then recomputes, by hand, from the known latents, the captured timesteps and the noise replayed from the step's
noise-generator state: the noisy input, the target (epsilon or v), the per-sample loss weights (prior_loss_weight,
min-SNR-gamma) and the loss; for the clipping options it recomputes the gradient on a copy of the denoiser and the
AdamW update of the clipped gradient. So an option that stops reaching the step fails here.

What each test guards (each was shown to fail when its option was dropped on a scratch copy):
- test_noisy_input_and_epsilon_loss[0.5]: noise_offset not reaching the noise;
- test_v_prediction_model_learns_v: a v-prediction model trained on the epsilon target;
- test_min_snr_gamma_weights_each_sample: min_snr_gamma ignored, or weighted as epsilon for a v model;
- test_prior_loss_weight_weights_the_regularisation_images: per-sample loss weights dropped (loop or dataset);
- test_clip_skip_selects_the_text_encoder_layer[2]: clip_skip not reaching (or not used by) the family;
- test_max_grad_norm_clips_the_global_gradient_norm[None]: the default max_grad_norm = 1 clipping skipped;
- test_fused_backward_pass_steps_each_parameter_with_its_own_clipping: fused_backward_pass not wired in.

Everything that knows the trainer's internals (attribute names, set-up step names, the order of the noise draws)
is in the helpers right below; the tests only use them and the formulas.
"""
from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from sd_scripts.options import parse_args
from sd_scripts.training.full_methods import DreamBoothMethod
from sd_scripts.training.loop import Trainer
from sd_scripts.training.methods import NetworkMethod

pytestmark = pytest.mark.timeout(300)

VAE_SCALE = 0.18215  # SD 1.x / 2.x latent scale (FORMATS.md); the tiny models use the real one
BETA_START, BETA_END, NUM_TIMESTEPS = 0.00085, 0.012, 1000  # SD 1.x / 2.x "scaled_linear" training schedule


# ---------------------------------------------------------------- helpers that know the trainer's internals
_METHODS = {"network": NetworkMethod, "db": DreamBoothMethod}


def build_trainer(kind: str, model: str, data: "Data", out_dir, *options: str) -> Trainer:
    """A Trainer (`kind` 'network' = LoRA, 'db' = DreamBooth) with every set-up step run, ready for training_step."""
    argv = ["--pretrained_model_name_or_path", model, "--output_dir", str(out_dir),
            "--train_data_dir", data.train_dir, "--reg_data_dir", data.reg_dir, "--resolution", "64",
            "--train_batch_size", "4", "--cache_latents", "--seed", "3", "--max_train_steps", "2", *options]
    args = parse_args(kind, argv)
    trainer = Trainer(args, _METHODS[kind](args))
    for step in ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents",
                 "cache_text_encoder_outputs", "build_method", "release_unused_models", "create_optimizer",
                 "prepare"):
        getattr(trainer, step)()
    return trainer


def first_batch(trainer: Trainer) -> dict:
    return next(iter(trainer.loader))


def denoiser(trainer: Trainer) -> torch.nn.Module:
    return trainer.bundle.denoiser


def noise_generator(trainer: Trainer) -> torch.Generator:
    return trainer.noise_rng.generator


def replay_draws(generator_state: torch.Tensor, shape: tuple, *, noise_offset: float | None = None,
                 low: int = 0, high: int = NUM_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and timesteps the step draws from a generator in `generator_state`, in the step's order: the
    noise, then (with noise_offset) one offset value per sample and channel, then the timesteps."""
    g = torch.Generator().set_state(generator_state)
    noise = torch.randn(shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=g)
    timesteps = torch.randint(low, high, (shape[0],), generator=g)
    return noise, timesteps


def trained_denoiser_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- the step, observed from outside
@dataclass
class Observed:
    loss: float
    noisy: torch.Tensor  # what the denoiser got as its sample
    timesteps: torch.Tensor
    cond: torch.Tensor  # encoder hidden states
    pred: torch.Tensor  # what the denoiser returned
    generator_state: torch.Tensor  # the noise generator before the step


def observe_step(trainer: Trainer, batch: dict) -> Observed:
    """Runs trainer.training_step(batch) once with the denoiser's forward wrapped to record its inputs and output."""
    unet = denoiser(trainer)
    original = unet.forward
    signature = inspect.signature(original)
    seen: dict = {}

    def recording_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        pred = out[0] if isinstance(out, tuple) else out.sample
        seen.update(noisy=bound["sample"].detach().float().clone(),
                    timesteps=torch.as_tensor(bound["timestep"]).detach().clone(),
                    cond=bound["encoder_hidden_states"].detach().float().clone(), pred=pred.detach().float().clone())
        return out

    state = noise_generator(trainer).get_state()
    unet.forward = recording_forward
    try:
        loss = trainer.training_step(batch)
    finally:
        del unet.forward  # back to the class's forward
    assert seen, "the denoiser was not called"
    return Observed(loss=float(loss), generator_state=state, **seen)


# ---------------------------------------------------------------- the formulas
def alphas_cumprod() -> torch.Tensor:
    """DDPM a_t = prod_{s<=t} (1 - beta_s) of the scaled_linear schedule (betas linear in sqrt space), float32."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def noisy_latents(x0, noise, t):
    a = per_sample(alphas_cumprod()[t])
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0, noise, t):
    a = per_sample(alphas_cumprod()[t])
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr(t):
    a = alphas_cumprod()[t]
    return a / (1 - a)


def weighted_mse(pred, target, weights):
    """Mean over the batch of weight_i * mean((pred_i - target_i)^2)."""
    return ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(weights).mean()


def clean_latents(batch: dict) -> torch.Tensor:
    return batch["latents"].float() * VAE_SCALE


def reg_weights(batch: dict, data: "Data", prior_loss_weight: float) -> torch.Tensor:
    """prior_loss_weight for the regularisation images of the batch, 1 for train images (from their paths)."""
    return torch.tensor([prior_loss_weight if os.path.dirname(os.path.dirname(p)) == data.reg_dir else 1.0
                         for p in batch["image_paths"]])


# ---------------------------------------------------------------- data
@dataclass
class Data:
    train_dir: str
    reg_dir: str


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    """Two 64x64 train images ('1_sks dog') and two reg images ('1_dog'): one batch of four holds all of them."""
    root = tmp_path_factory.mktemp("step_data")
    folders = {"train/1_sks dog": [(200, 40, 40), (40, 200, 90)], "reg/1_dog": [(40, 60, 210), (220, 200, 40)]}
    for folder, colours in folders.items():
        os.makedirs(root / folder)
        for i, colour in enumerate(colours):
            image = Image.new("RGB", (64, 64), colour)
            image.paste((255 - colour[0], 128, colour[2] // 2), (8 + 16 * i, 8, 40 + 16 * i, 48))
            image.save(root / folder / f"{i}.png")
    return Data(str(root / "train"), str(root / "reg"))


def step_on(kind, model, data, tmp_path, *options):
    trainer = build_trainer(kind, model, data, tmp_path / "out", *options)
    batch = first_batch(trainer)
    return trainer, batch


# ---------------------------------------------------------------- noise, target and loss
@pytest.mark.parametrize("noise_offset", [None, 0.5])
def test_noisy_input_and_epsilon_loss(tiny_sd1, data, tmp_path, noise_offset):
    options = ["--noise_offset", str(noise_offset)] if noise_offset else []
    trainer, batch = step_on("network", tiny_sd1.diffusers_dir, data, tmp_path, *options)
    seen = observe_step(trainer, batch)
    x0 = clean_latents(batch)
    noise, timesteps = replay_draws(seen.generator_state, tuple(x0.shape), noise_offset=noise_offset)
    assert torch.equal(seen.timesteps.cpu(), timesteps)
    torch.testing.assert_close(seen.noisy, noisy_latents(x0, noise, timesteps), rtol=1e-5, atol=1e-5)
    expected = weighted_mse(seen.pred, noise, torch.ones(4))
    assert seen.loss == pytest.approx(float(expected), rel=1e-5)
    if noise_offset:  # precondition: the offset part of the noise is large enough to be seen
        base = torch.randn(tuple(x0.shape), generator=torch.Generator().set_state(seen.generator_state))
        assert float((noise - base).abs().min()) > 1e-3 and float((noise - base).abs().max()) > 0.1


def test_v_prediction_model_learns_v(tiny_sd2v, data, tmp_path):
    trainer, batch = step_on("network", tiny_sd2v.diffusers_dir, data, tmp_path)
    seen = observe_step(trainer, batch)
    x0 = clean_latents(batch)
    noise, timesteps = replay_draws(seen.generator_state, tuple(x0.shape))
    torch.testing.assert_close(seen.noisy, noisy_latents(x0, noise, timesteps), rtol=1e-5, atol=1e-5)
    v_loss = float(weighted_mse(seen.pred, v_target(x0, noise, timesteps), torch.ones(4)))
    eps_loss = float(weighted_mse(seen.pred, noise, torch.ones(4)))
    assert abs(v_loss - eps_loss) > 0.01 * v_loss, "precondition: the two targets give different losses"
    assert seen.loss == pytest.approx(v_loss, rel=1e-5)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_gamma_weights_each_sample(tiny_sd1, tiny_sd2v, data, tmp_path, v_prediction):
    gamma = 5.0
    model = (tiny_sd2v if v_prediction else tiny_sd1).diffusers_dir
    # low timesteps have SNR far above gamma, so every sample's weight is well below 1
    trainer, batch = step_on("network", model, data, tmp_path, "--min_snr_gamma", str(gamma), "--max_timestep", "100")
    seen = observe_step(trainer, batch)
    x0 = clean_latents(batch)
    noise, timesteps = replay_draws(seen.generator_state, tuple(x0.shape), high=100)
    assert torch.equal(seen.timesteps.cpu(), timesteps) and int(timesteps.max()) < 100
    s = snr(timesteps)
    weights = torch.clamp(s, max=gamma) / ((s + 1) if v_prediction else s)
    assert float(weights.max()) < 0.5, "precondition: min-SNR weights differ from 1"
    target = v_target(x0, noise, timesteps) if v_prediction else noise
    assert seen.loss == pytest.approx(float(weighted_mse(seen.pred, target, weights)), rel=1e-5)


def test_prior_loss_weight_weights_the_regularisation_images(tiny_sd1, data, tmp_path):
    trainer, batch = step_on("network", tiny_sd1.diffusers_dir, data, tmp_path, "--prior_loss_weight", "0.25")
    weights = reg_weights(batch, data, 0.25)
    assert sorted(weights.tolist()) == [0.25, 0.25, 1.0, 1.0], "precondition: the batch holds both kinds of image"
    seen = observe_step(trainer, batch)
    x0 = clean_latents(batch)
    noise, timesteps = replay_draws(seen.generator_state, tuple(x0.shape))
    per_image = ((seen.pred - noise) ** 2).mean(dim=(1, 2, 3))
    assert float((per_image * (1 - weights)).abs().sum()) > 1e-3 * float(per_image.sum()), \
        "precondition: the weights change the loss"
    assert seen.loss == pytest.approx(float(weighted_mse(seen.pred, noise, weights)), rel=1e-5)


# ---------------------------------------------------------------- text conditioning
def hand_encoded(model_dir: str, captions: list[str], clip_skip: int | None) -> torch.Tensor:
    """CLIP hidden states straight from transformers: the last layer, or with clip_skip N the N-th last layer's
    hidden states through the final layer norm (as the original SD code does)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval()
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=True)
        if not clip_skip or clip_skip == 1:
            return out.last_hidden_state
        final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 / 5
        return final_layer_norm(out.hidden_states[-clip_skip])


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_clip_skip_selects_the_text_encoder_layer(tiny_sd1, data, tmp_path, clip_skip):
    options = ["--clip_skip", str(clip_skip)] if clip_skip else []
    trainer, batch = step_on("network", tiny_sd1.diffusers_dir, data, tmp_path, *options)
    seen = observe_step(trainer, batch)
    expected = hand_encoded(tiny_sd1.diffusers_dir, batch["captions"], clip_skip)
    other = hand_encoded(tiny_sd1.diffusers_dir, batch["captions"], None if clip_skip else 2)
    assert (expected - other).abs().max() > 0.1, "precondition: the layers differ"
    torch.testing.assert_close(seen.cond, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradient clipping and the fused backward pass
LR, ADAM_EPS = 1.0, 1.0  # AdamW's first step is -lr * g / (|g| + eps): with a large eps it shows the gradient's size


def adamw_first_step(grad: torch.Tensor) -> torch.Tensor:
    """The change AdamW (weight_decay 0) makes on its first step: m_hat = g, sqrt(v_hat) = |g|."""
    return -LR * grad / (grad.abs() + ADAM_EPS)


def hand_gradients(reference: torch.nn.Module, seen: Observed, batch: dict) -> dict[str, torch.Tensor]:
    """Gradients of the hand-computed epsilon loss w.r.t. the denoiser's weights before the step."""
    x0 = clean_latents(batch)
    noise, timesteps = replay_draws(seen.generator_state, tuple(x0.shape))
    params = trained_denoiser_parameters(reference)
    pred = reference(seen.noisy, seen.timesteps, seen.cond).sample
    torch.testing.assert_close(pred.detach(), seen.pred, rtol=1e-4, atol=1e-5)  # same function, same inputs
    loss = weighted_mse(pred, noise, torch.ones(4))
    assert float(loss.detach()) == pytest.approx(seen.loss, rel=1e-5)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(p)) for (name, p), g in zip(params.items(), grads)}


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_: gradients are scaled by max_norm / (norm + 1e-6) when that is below 1."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm else 1.0


def db_step(model, data, tmp_path, *options):
    """One DreamBooth step (U-Net trained, text encoder frozen) with AdamW at lr 1, eps 1, no weight decay.

    Returns (weights before, weights after, hand gradients)."""
    trainer, batch = step_on("db", model, data, tmp_path, "--learning_rate", str(LR), "--learning_rate_te", "0",
                             "--optimizer_args", "weight_decay=0", f"eps={ADAM_EPS}", *options)
    reference = copy.deepcopy(denoiser(trainer))
    before = {k: v.detach().clone() for k, v in trained_denoiser_parameters(reference).items()}
    seen = observe_step(trainer, batch)
    after = {k: v.detach().clone() for k, v in trained_denoiser_parameters(denoiser(trainer)).items()}
    return before, after, hand_gradients(reference, seen, batch)


def assert_update(before, after, expected_change: dict[str, torch.Tensor]):
    for name, change in expected_change.items():
        torch.testing.assert_close(after[name] - before[name], change, rtol=1e-3, atol=2e-6, msg=name)


@pytest.mark.parametrize("max_grad_norm", [None, 0.0])  # None: the default, 1.0
def test_max_grad_norm_clips_the_global_gradient_norm(tiny_sd1, data, tmp_path, max_grad_norm):
    options = ["--max_grad_norm", str(max_grad_norm)] if max_grad_norm is not None else []
    effective = parse_args("db", options).max_grad_norm
    assert effective == (1.0 if max_grad_norm is None else 0.0)
    before, after, grads = db_step(tiny_sd1.diffusers_dir, data, tmp_path, *options)
    norm = global_norm(grads)
    assert norm > 1.5, "precondition: the default clipping has something to clip"
    coefficient = clip_coefficient(norm, effective)
    assert_update(before, after, {k: adamw_first_step(g * coefficient) for k, g in grads.items()})


@pytest.mark.parametrize("flag", ["--fused_backward_pass", "--blockwise_fused_optimizers", "--fused_optimizer_groups=2"])
def test_fused_backward_pass_steps_each_parameter_with_its_own_clipping(tiny_sd1, data, tmp_path, flag):
    max_norm = 0.02
    before, after, grads = db_step(tiny_sd1.diffusers_dir, data, tmp_path, flag, "--max_grad_norm", str(max_norm))
    per_parameter = {k: adamw_first_step(g * clip_coefficient(float(g.double().norm()), max_norm))
                     for k, g in grads.items()}
    global_coefficient = clip_coefficient(global_norm(grads), max_norm)
    plain = {k: adamw_first_step(g * global_coefficient) for k, g in grads.items()}
    gap = max(float((per_parameter[k] - plain[k]).abs().max()) for k in grads)
    assert gap > 1e-3, "precondition: per-parameter and global clipping give different updates"
    assert_update(before, after, per_parameter)


def test_weights_are_read_in_the_compute_dtype_only_when_every_part_ends_up_in_it():
    """A frozen base under bf16 is read in bf16 (no float32 copy of a 12B FLUX); anything kept in float32 (a trained
    denoiser, a VAE under fp16 or no_half_vae) makes the whole read float32, so no precision is lost."""
    from sd_scripts.training.run_setup import load_dtype

    lora = NetworkMethod(parse_args("network", []))
    full = DreamBoothMethod(parse_args("db", []))
    assert load_dtype(torch.bfloat16, lora) == torch.bfloat16
    assert load_dtype(torch.bfloat16, lora, no_half_vae=True) == torch.float32
    assert load_dtype(torch.float16, lora) == torch.float32
    assert load_dtype(torch.float32, lora) == torch.float32
    assert load_dtype(torch.bfloat16, full) == torch.float32


def test_fp8_base_stores_the_sd_unet_in_float8_and_trains_the_lora(tiny_sd1, data, tmp_path):
    """sd-scripts' train_network --fp8_base on an SD model: the frozen U-Net's layers are stored in float8 (the
    text encoder too; fp8_base_unet keeps it in the compute dtype), and a step still trains the LoRA."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # this process's accelerator was fp32 so far
    for flag, te_fp8 in (("--fp8_base", True), ("--fp8_base_unet", False)):
        AcceleratorState._reset_state(reset_partial_state=True)
        trainer, batch = step_on("network", tiny_sd1.diffusers_dir, data, tmp_path / flag[2:], flag,
                                 "--mixed_precision", "bf16")
        unet_linear = next(m for m in denoiser(trainer).modules() if isinstance(m, torch.nn.Linear))
        te_linear = next(m for m in trainer.bundle.text_encoders[0].modules() if isinstance(m, torch.nn.Linear))
        assert unet_linear.weight.dtype == torch.float8_e4m3fn
        assert (te_linear.weight.dtype == torch.float8_e4m3fn) == te_fp8
        lora = [p for p in trainer.method.network.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in lora]
        loss = trainer.training_step(batch)
        assert torch.isfinite(torch.as_tensor(loss)).all()
        assert any(not torch.equal(b, p.detach()) for b, p in zip(before, lora))
    AcceleratorState._reset_state(reset_partial_state=True)  # the next test builds an fp32 accelerator
