"""The loss and noise options of the DDPM step, on the real Trainer: each one changes the denoiser's input, the
target or the loss exactly as the formulas below (sd-scripts 48d368f's meanings) say.

As in test_loop_step.py (whose helpers this module uses), a LoRA Trainer is built in-process on the tiny SD 1.x
(epsilon) and SD 2.x-v (v-prediction) models, once per module each; for every test the family is rebuilt from the
test's command line, as `load_model` builds it (`with_options`), and `training_step` runs once with the denoiser's
forward recorded. The test replays the step's draws from the noise generator's state and recomputes the noisy input,
the target and the loss by hand.

What each test guards (each was shown to fail with its option dropped on a scratch copy):
- test_loss_types: loss_type, huber_c, huber_scale, huber_schedule (constant / exponential / snr thresholds);
- test_multires_noise: multires_noise_iterations / multires_noise_discount not reaching the noise;
- test_offset_noise_random_and_adaptive_strength: noise_offset_random_strength, adaptive_noise_scale;
- test_input_perturbation_changes_only_the_noisy_input: ip_noise_gamma (+ _random_strength) missing from the
  input, or leaking into the target;
- test_zero_terminal_snr_rescales_the_schedule: zero_terminal_snr not rescaling the betas (Lin et al. 2023);
- test_snr_loss_weights: debiased_estimation_loss, v_pred_like_loss, scale_v_pred_loss_like_noise_pred;
- test_options_that_need_another_prediction_type_are_refused / test_flow_matching_families_refuse_ddpm_options.
"""
from __future__ import annotations

import pytest
import torch

from sd_scripts.families import check_run, family_class
from sd_scripts.options import BY_NAME, OptionError, parse_args
from test_loop_step import (Data, build_trainer, clean_latents, data, first_batch, noise_generator,  # noqa: F401
                            observe_step)

pytestmark = pytest.mark.timeout(300)

NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # the SD 1.x / 2.x "scaled_linear" training schedule


# ---------------------------------------------------------------- one trainer per model, options per test
class Step:
    def __init__(self, trainer, base_argv: list[str]):
        self.trainer, self.base_argv = trainer, base_argv
        self.batch = first_batch(trainer)

    def with_options(self, *options: str):
        """The trainer with its family rebuilt from the base command line plus `options` (as load_model does)."""
        args = parse_args("network", self.base_argv + list(options))
        self.trainer.args = args
        self.trainer.family = family_class(self.trainer.bundle.family)(self.trainer.bundle, args)
        return self

    def run(self, *options: str):
        self.with_options(*options)
        return observe_step(self.trainer, self.batch), clean_latents(self.batch)


def _step(model: str, data: Data, out_dir) -> Step:
    trainer = build_trainer("network", model, data, out_dir)
    # build_trainer's command line (test_loop_step.py)
    argv = ["--pretrained_model_name_or_path", model, "--output_dir", str(out_dir), "--train_data_dir", data.train_dir,
            "--reg_data_dir", data.reg_dir, "--resolution", "64", "--train_batch_size", "4", "--cache_latents",
            "--seed", "3", "--max_train_steps", "2"]
    return Step(trainer, argv)


@pytest.fixture(scope="module")
def eps_step(tiny_sd1, data, tmp_path_factory) -> Step:
    return _step(tiny_sd1.diffusers_dir, data, tmp_path_factory.mktemp("eps"))


@pytest.fixture(scope="module")
def v_step(tiny_sd2v, data, tmp_path_factory) -> Step:
    return _step(tiny_sd2v.diffusers_dir, data, tmp_path_factory.mktemp("v"))


# ---------------------------------------------------------------- the formulas
def base_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def zero_terminal_snr_alphas_cumprod() -> torch.Tensor:
    """Lin et al. 2023 (https://arxiv.org/abs/2305.08891), Algorithm 1: sqrt(a_t) moved linearly so that the last
    is 0 and the first unchanged, then through betas back to the cumulative product."""
    root = base_alphas_cumprod().double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    a_bar = root ** 2
    alphas = torch.cat([a_bar[:1], a_bar[1:] / a_bar[:-1]])
    return torch.cumprod(alphas, dim=0).float()


def per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def noisy_latents(x0, noise, t, ac):
    a = per_sample(ac[t])
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0, noise, t, ac):
    a = per_sample(ac[t])
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr(t, ac=None):
    a = (base_alphas_cumprod() if ac is None else ac)[t]
    return a / (1 - a)


def loss_of(pred, target, weights=None, kind="l2", c=None):
    """Mean over the batch of weight_i * mean(loss(pred_i - target_i)) with sd-scripts' loss types."""
    d = pred - target
    if kind == "l2":
        per_element = d ** 2
    elif kind == "l1":
        per_element = d.abs()
    else:
        c = per_sample(c)
        per_element = 2 * (torch.sqrt(d ** 2 + c ** 2) - c) * (c if kind == "huber" else 1.0)
    per_image = per_element.mean(dim=(1, 2, 3))
    return float((per_image if weights is None else per_image * weights).mean())


def hand_multires(noise, g, iterations, discount):
    """Pyramid noise: ratios r ~ U[2, 4) (drawn first, all of them), then per level N(0, 1) at the size divided by
    r^i, bilinearly upsampled, times discount^i, stopping after a 1-pixel level; divided by the batch's std."""
    b, c, h, w = noise.shape
    ratios = (2 + 2 * torch.rand((iterations,), generator=g)).tolist()
    upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
    out = noise.clone()
    for i, r in enumerate(ratios):
        hi, wi = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        out = out + upsample(torch.randn((b, c, hi, wi), generator=g)) * discount ** i
        if hi == 1 or wi == 1:
            break
    return out / out.std()


def replay(state, x0, *, noise_offset=None, offset_random=False, adaptive=None, multires=None, discount=0.3,
           low=0, high=NUM_TIMESTEPS, ip_gamma=None, ip_random=False):
    """(noise, the noise in the denoiser's input, timesteps) as the step draws them: the noise; with noise_offset
    its strength (random strength) and per-channel offsets; the multires levels; the timesteps; the input
    perturbation's strength (random strength) and noise."""
    g = torch.Generator().set_state(state)
    shape = tuple(x0.shape)
    noise = torch.randn(shape, generator=g)
    if noise_offset:
        strength = torch.rand((), generator=g) * noise_offset if offset_random else torch.tensor(noise_offset)
        if adaptive is not None:
            strength = torch.clamp(strength + adaptive * x0.mean(dim=(2, 3), keepdim=True).abs(), min=0)
        noise = noise + strength * torch.randn(shape[:2] + (1, 1), generator=g)
    if multires:
        noise = hand_multires(noise, g, multires, discount)
    t = torch.randint(low, high, (shape[0],), generator=g)
    input_noise = noise
    if ip_gamma:
        strength = torch.rand((), generator=g) * ip_gamma if ip_random else ip_gamma
        input_noise = noise + strength * torch.randn(shape, generator=g)
    return noise, input_noise, t


def assert_input(seen, x0, noise, t, ac=None):
    assert torch.equal(seen.timesteps.cpu(), t)
    expected = noisy_latents(x0, noise, t, base_alphas_cumprod() if ac is None else ac)
    torch.testing.assert_close(seen.noisy, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loss types
HUBER_C, HUBER_SCALE = 0.3, 1.5


def thresholds(schedule, t):
    if schedule == "constant":
        return torch.full((len(t),), HUBER_C * HUBER_SCALE)
    if schedule == "exponential":  # HUBER_SCALE at t = 0 down to HUBER_C * HUBER_SCALE at t = 1000
        return HUBER_SCALE * HUBER_C ** (t.double() / NUM_TIMESTEPS).float()
    a = base_alphas_cumprod()[t]  # snr: (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - a) / a); no scale
    return (1 - HUBER_C) / (1 + ((1 - a) / a).sqrt()) ** 2 + HUBER_C


@pytest.mark.parametrize("kind,schedule", [("l1", None), ("huber", "constant"), ("smooth_l1", "exponential"),
                                           ("huber", "snr")])
def test_loss_types(eps_step, kind, schedule):
    options = ["--loss_type", kind, "--huber_c", str(HUBER_C), "--huber_scale", str(HUBER_SCALE)]
    if schedule:
        options += ["--huber_schedule", schedule]
    seen, x0 = eps_step.run(*options)
    noise, _, t = replay(seen.generator_state, x0)
    assert_input(seen, x0, noise, t)
    c = thresholds(schedule, t) if schedule else None
    expected = loss_of(seen.pred, noise, kind=kind, c=c)
    l2 = loss_of(seen.pred, noise)
    assert abs(expected - l2) > 0.05 * l2, "precondition: the loss type changes the loss"
    if c is not None:  # precondition: the schedule's thresholds differ from the constant huber_c
        assert float((c - HUBER_C).abs().max()) > 0.05
    assert seen.loss == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- noise
def test_multires_noise(eps_step):
    seen, x0 = eps_step.run("--multires_noise_iterations", "6", "--multires_noise_discount", "0.8")
    noise, _, t = replay(seen.generator_state, x0, multires=6, discount=0.8)
    plain, _, _ = replay(seen.generator_state, x0)
    assert float((noise - plain).abs().mean()) > 0.1, "precondition: multires noise differs from plain noise"
    assert_input(seen, x0, noise, t)
    assert seen.loss == pytest.approx(loss_of(seen.pred, noise), rel=1e-5)


def test_offset_noise_random_and_adaptive_strength(eps_step):
    seen, x0 = eps_step.run("--noise_offset", "0.5", "--noise_offset_random_strength", "--adaptive_noise_scale", "2")
    noise, _, t = replay(seen.generator_state, x0, noise_offset=0.5, offset_random=True, adaptive=2.0)
    for other in (dict(offset_random=True), dict(adaptive=2.0)):  # precondition: each option changes the noise
        without, _, _ = replay(seen.generator_state, x0, noise_offset=0.5, **other)
        assert float((noise - without).abs().max()) > 0.05
    assert_input(seen, x0, noise, t)
    assert seen.loss == pytest.approx(loss_of(seen.pred, noise), rel=1e-5)


@pytest.mark.parametrize("random_strength", [False, True])
def test_input_perturbation_changes_only_the_noisy_input(eps_step, random_strength):
    gamma = 0.5
    options = ["--ip_noise_gamma", str(gamma)] + (["--ip_noise_gamma_random_strength"] if random_strength else [])
    seen, x0 = eps_step.run(*options)
    noise, input_noise, t = replay(seen.generator_state, x0, ip_gamma=gamma, ip_random=random_strength)
    assert float((input_noise - noise).abs().mean()) > 0.005, "precondition: the perturbation is visible"
    assert_input(seen, x0, input_noise, t)  # the denoiser sees the perturbed noise ...
    assert seen.loss == pytest.approx(loss_of(seen.pred, noise), rel=1e-5)  # ... and learns the plain noise
    assert abs(loss_of(seen.pred, input_noise) - seen.loss) > 1e-4 * seen.loss


def test_zero_terminal_snr_rescales_the_schedule(v_step):
    ac = zero_terminal_snr_alphas_cumprod()
    base = base_alphas_cumprod()
    assert float(ac[-1]) == 0 and float(ac[0]) == pytest.approx(float(base[0]), rel=1e-6)
    seen, x0 = v_step.run("--zero_terminal_snr", "--min_timestep", "900")
    noise, _, t = replay(seen.generator_state, x0, low=900)
    assert float((ac[t] - base[t]).abs().min()) > 1e-3, "precondition: the schedules differ at these timesteps"
    assert_input(seen, x0, noise, t, ac)
    assert seen.loss == pytest.approx(loss_of(seen.pred, v_target(x0, noise, t, ac)), rel=1e-5)


# ---------------------------------------------------------------- SNR loss weights
def capped_snr(t):
    return torch.clamp(snr(t), max=1000)


@pytest.mark.parametrize("option,v_prediction", [("--debiased_estimation_loss", False),
                                                 ("--debiased_estimation_loss", True),
                                                 ("--v_pred_like_loss", False),
                                                 ("--scale_v_pred_loss_like_noise_pred", True)])
def test_snr_loss_weights(eps_step, v_step, option, v_prediction):
    step = v_step if v_prediction else eps_step
    amount = 0.7
    seen, x0 = step.run(option, *([str(amount)] if option == "--v_pred_like_loss" else []))
    noise, _, t = replay(seen.generator_state, x0)
    s = capped_snr(t)
    if option == "--debiased_estimation_loss":
        weights = 1 / (s + 1) if v_prediction else 1 / s.sqrt()
    elif option == "--v_pred_like_loss":  # epsilon loss + amount x the v loss of the same prediction
        weights = 1 + amount * (s + 1) / s
    else:  # v loss scaled to the epsilon loss
        weights = s / (s + 1)
    assert float((weights - 1).abs().max()) > 0.05, "precondition: the weights differ from 1"
    target = v_target(x0, noise, t, base_alphas_cumprod()) if v_prediction else noise
    assert_input(seen, x0, noise, t)
    assert seen.loss == pytest.approx(loss_of(seen.pred, target, weights), rel=1e-5)


# ---------------------------------------------------------------- refusals
def test_options_that_need_another_prediction_type_are_refused(eps_step, v_step):
    with pytest.raises(OptionError, match="'scale_v_pred_loss_like_noise_pred'.*epsilon-prediction model"):
        eps_step.with_options("--scale_v_pred_loss_like_noise_pred")
    with pytest.raises(OptionError, match="'v_pred_like_loss'.*v-prediction model"):
        v_step.with_options("--v_pred_like_loss", "0.5")
    with pytest.raises(OptionError, match="'adaptive_noise_scale': needs noise_offset"):
        parse_args("network", ["--adaptive_noise_scale", "0.1"])
    with pytest.raises(OptionError, match="'max_timestep': must not be below min_timestep"):
        parse_args("network", ["--min_timestep", "500", "--max_timestep", "400"])


DDPM_ONLY = {"noise_offset": 0.1, "noise_offset_random_strength": True, "multires_noise_iterations": 6,
             "multires_noise_discount": 0.5, "zero_terminal_snr": True, "min_snr_gamma": 5.0,
             "scale_v_pred_loss_like_noise_pred": True, "v_pred_like_loss": 0.5, "debiased_estimation_loss": True}


@pytest.mark.parametrize("family,script", [("flux", "flux_train_network"), ("chroma", "flux_train_network"),
                                           ("sd3", "sd3_train_network")])
def test_flow_matching_families_refuse_ddpm_options(family, script):
    defaults = {name: o.default for name, o in BY_NAME.items()}
    for name, value in DDPM_ONLY.items():
        message = check_run(family, trainer="network", script=script, values=dict(defaults, **{name: value}),
                            defaults=defaults)
        assert message and f"option '{name}'" in message and "remove it" in message, name
    for name, value in {"ip_noise_gamma": 0.1, "loss_type": "huber", "huber_schedule": "constant"}.items():
        assert check_run(family, trainer="network", script=script, values=dict(defaults, **{name: value}),
                         defaults=defaults) is None, name
