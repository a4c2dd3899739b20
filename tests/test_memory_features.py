"""The memory options on the tiny FLUX.1 / SD3 denoisers (training/block_swap.py, fp8.py, memory.py): block swap gives
the unswapped outputs and LoRA gradients (with and without gradient checkpointing) and moves what it should; fp8
storage keeps float8 weights, stays within fp8 tolerance and LoRA still trains; cpu_offload_checkpointing is exact;
the up-front checks name the option and the fix. End-to-end runs through `accelerate launch` at the end."""
from __future__ import annotations

import argparse
import copy
import subprocess

import pytest
import torch

from sd_scripts.options import OptionError
from sd_scripts.training import memory
from sd_scripts.training.block_swap import BlockSwapper, SwapGroup, spread

FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------ helpers
def _flux(blocks=(3, 4), seed=0):
    from sd_scripts.families.flux.tiny import _randomise, tiny_transformer_config
    from sd_scripts.families.flux.weights import build_transformer

    model = build_transformer(tiny_transformer_config("flux_dev", blocks))
    _randomise(model, seed, "transformer")
    return model.requires_grad_(False)


def _inputs(model, batch=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8
    cfg = model.config
    return dict(hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g, dtype=dtype),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g, dtype=dtype),
                timestep=torch.tensor([0.3, 0.7][:batch], dtype=dtype), guidance=torch.full((batch,), 3.5),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                   indexing="ij"), -1).reshape(-1, 3),
                txt_ids=torch.zeros(text, 3), return_dict=False)


def _lora(model, seed=0):
    from sd_scripts.networks import lora

    torch.manual_seed(seed)
    net = lora.create_network(unet=model, text_encoders=[], family="flux", network_dim=4, network_alpha=2,
                              train_text_encoder=False)
    with torch.no_grad():  # non-zero up weights, so the LoRA changes the output and every gradient is non-trivial
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    net.apply_to()
    return net


def _step(model, net, inputs):
    """One forward + backward: (output, {LoRA parameter name: gradient})."""
    net.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def _flux_groups(model, n):
    from sd_scripts.families.flux.model import FluxFamily

    return FluxFamily.block_swap_groups(model, n)


# ------------------------------------------------------------------ block swap
def test_spread_keeps_block_zero_and_spreads_evenly():
    assert spread(19, 0) == []
    assert spread(4, 2) == [1, 2] or spread(4, 2) == [1, 3]
    for length in range(3, 40):
        for count in range(1, length - 1):
            chosen = spread(length, count)
            assert len(chosen) == count and 0 not in chosen and max(chosen) < length


def test_flux_split_follows_sd_scripts():
    # the split only reads the lists' lengths: FLUX.1-dev's 19 double and 38 single blocks
    fake = argparse.Namespace(transformer_blocks=torch.nn.ModuleList([torch.nn.Identity()] * 19),
                              single_transformer_blocks=torch.nn.ModuleList([torch.nn.Identity()] * 38))
    groups = _flux_groups(fake, 18)
    assert [(g.name, g.count) for g in groups] == [("transformer_blocks", 9), ("single_transformer_blocks", 18)]
    from sd_scripts.families.flux.model import FluxFamily

    assert memory.max_blocks_to_swap(lambda n: FluxFamily.block_swap_groups(fake, n)) == 35  # FLUX.1-dev: 35


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_forward_backward_equal_unswapped(checkpointing):
    ref_model = _flux()
    model = copy.deepcopy(ref_model)
    ref_net, net = _lora(ref_model), _lora(model)
    net.load_state_dict(ref_net.state_dict())
    if checkpointing:
        ref_model.enable_gradient_checkpointing()
        model.enable_gradient_checkpointing()
    ref_model.train(), model.train()
    groups = _flux_groups(model, 2)  # 1 of 3 double blocks, 2 of 4 single blocks
    swapper = BlockSwapper(model, groups, "cpu").install()
    assert len(swapper.swapped) == 3
    inputs = _inputs(model)
    for _ in range(2):  # twice: the second step starts from where the first left the blocks
        ref_out, ref_grads = _step(ref_model, ref_net, inputs)
        out, grads = _step(model, net, inputs)
        assert torch.equal(out, ref_out)
        assert ref_grads.keys() == grads.keys() and len(grads) > 0
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), name
    # per step each swapped block comes in once for the forward pass, and once more for checkpointing's recompute
    per_step = 2 if checkpointing else 1
    assert swapper.stats.per_block == {p: 2 * per_step for p in swapper.swapped_positions}
    # afterwards every swapped parameter points at its CPU master again (nothing of it stays on the device)
    for block in swapper.swapped.values():
        for param, master in zip(block.params, block.masters):
            assert param.data_ptr() == master.data_ptr()
        assert block.loaded is None


def test_swap_without_grad_and_lora_on_swapped_blocks_trains():
    model = _flux()
    net = _lora(model)
    model.enable_gradient_checkpointing()
    swapper = BlockSwapper(model, _flux_groups(model, 2), "cpu").install()
    swapped_names = {f"lora_unet_double_blocks_{p}_" for p in swapper.swapped_positions if p < 3}
    with torch.no_grad():  # sampling: a forward pass only
        model(**_inputs(model))
    assert swapper.stats.onloads == 3 and all(b.loaded is None for b in swapper.swapped.values())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _step(model, net, _inputs(model))
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith(tuple(swapped_names)) for n in changed)  # LoRA on a swapped block got a gradient


def test_swapped_block_with_trainable_weights_is_refused():
    model = _flux()
    model.transformer_blocks.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        BlockSwapper(model, _flux_groups(model, 2), "cpu")


def _fused_full_steps(model, steps=2):
    """`steps` full fine-tuning steps (every weight trained) with the fused backward pass: AdamW steps each weight
    inside backward. Returns the weights afterwards."""
    from sd_scripts.training.fused_backward import FusedBackwardOptimizer

    model.requires_grad_(True).train()
    model.enable_gradient_checkpointing()
    opt = FusedBackwardOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0)
    for i in range(steps):
        out = model(**_inputs(model, seed=10 + i))[0]
        (out.float() ** 2).mean().backward()
    return opt


def test_full_fine_tune_with_swapped_blocks_trains_exactly():
    """flux_train / sd3_train --blocks_to_swap: trained blocks live on the CPU between their turns; each stays on the
    device through its backward pass until the fused optimizer stepped it, then its new weights go back to the CPU
    masters. The weights after two steps equal those of the unswapped run bit for bit."""
    reference = _flux()
    swapped_model = copy.deepcopy(reference)
    swapper = BlockSwapper(swapped_model, _flux_groups(swapped_model, 2), "cpu", trainable=True).install()
    _fused_full_steps(reference)
    _fused_full_steps(swapped_model)
    assert swapper.stats.writebacks == 2 * len(swapper.swapped)  # each swapped block, once per step
    swapper.release_all()
    for block in swapper.swapped.values():
        assert block.loaded is None
        assert all(p.data_ptr() == m.data_ptr() for p, m in zip(block.params, block.masters))
    trained, initial = dict(reference.named_parameters()), _flux().state_dict()
    for name, param in swapped_model.named_parameters():
        assert torch.equal(param, trained[name]), name
    swapped_ids = {id(p) for block in swapper.swapped.values() for p in block.params}
    swapped_names = [n for n, p in swapped_model.named_parameters() if id(p) in swapped_ids]
    assert swapped_names and all(not torch.equal(trained[n], initial[n]) for n in swapped_names
                                 if n.endswith("weight")), "precondition: the swapped blocks' weights trained"


def test_sd3_swaps_its_joint_blocks():
    from sd_scripts.families.sd3.model import SD3Family
    from sd_scripts.families.sd3.tiny import TINY_TRANSFORMER
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**dict(TINY_TRANSFORMER, num_layers=4)).requires_grad_(False)
    ref = copy.deepcopy(model)
    groups = SD3Family.block_swap_groups(model, 2)
    assert [(g.name, g.count) for g in groups] == [("transformer_blocks", 2)]
    with pytest.raises(OptionError, match="at most 2"):
        memory.block_swap_groups(SD3Family, model, 3)
    BlockSwapper(model, groups, "cpu").install()
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 16, 16)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([500.0]),
                  return_dict=False)
    with torch.no_grad():
        assert torch.equal(model(x, **kwargs)[0], ref(x, **kwargs)[0])


# ------------------------------------------------------------------ fp8
def test_fp8_storage_close_to_reference_and_lora_trains():
    from sd_scripts.training.fp8 import store_in_fp8

    ref = _flux().to(torch.bfloat16)
    model = copy.deepcopy(ref)
    layers = store_in_fp8(model, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert layers > 0 and layers == sum(1 for m in linears if m.weight.dtype == FP8)
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype != FP8]
    assert kept == ["proj_out"]  # only the output projection stays (adaLN modulation Linears are fp8 too)
    fp8_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fp8_bytes < 0.6 * sum(p.numel() * p.element_size() for p in ref.parameters())
    inputs = _inputs(model, dtype=torch.bfloat16)
    with torch.no_grad():
        out, expected = model(**inputs)[0].float(), ref(**inputs)[0].float()
    assert all(m.weight.dtype == FP8 for m in linears if m.weight.dtype != torch.bfloat16)  # back to fp8 after use
    rel = (out - expected).norm() / expected.norm()
    assert 0 < rel < 0.15, rel  # e4m3: 3 mantissa bits, a few per cent per layer

    net = _lora(model)
    model.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(6):
            opt.zero_grad()
            loss = (model(**inputs)[0].float() ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert losses[-1] < losses[0]
    assert all(m.weight.dtype == FP8 for m in linears if m.weight.dtype != torch.bfloat16)


def test_fp8_and_block_swap_together_equal_fp8_alone():
    from sd_scripts.training.fp8 import store_in_fp8

    ref_model = _flux().to(torch.bfloat16)
    model = copy.deepcopy(ref_model)  # before the hooks: a deep copy of a hooked layer calls the original's forward
    for m in (ref_model, model):
        store_in_fp8(m, torch.bfloat16)
    ref_net, net = _lora(ref_model), _lora(model)
    net.load_state_dict(ref_net.state_dict())
    for m in (ref_model, model):
        m.enable_gradient_checkpointing()
        m.train()
    swapper = BlockSwapper(model, _flux_groups(model, 2), "cpu").install()
    inputs = _inputs(model, dtype=torch.bfloat16)
    ref_out, ref_grads = _step(ref_model, ref_net, inputs)
    out, grads = _step(model, net, inputs)
    assert torch.equal(out, ref_out) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    for block in swapper.swapped.values():  # the CPU masters are the fp8 weights, untouched by the casts
        assert any(m.dtype == FP8 for m in block.masters)
        assert all(p.data_ptr() == m.data_ptr() for p, m in zip(block.params, block.masters))


def test_fp8_keeps_t5_wo_in_compute_dtype():
    from transformers import T5Config, T5EncoderModel

    from sd_scripts.training.fp8 import store_in_fp8

    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
                                 feed_forward_proj="gated-gelu")).to(torch.bfloat16)
    store_in_fp8(t5, torch.bfloat16)
    ff = t5.encoder.block[0].layer[1].DenseReluDense
    assert ff.wi_0.weight.dtype == FP8 and ff.wo.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = t5(torch.tensor([[1, 2, 3]])).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_fp8_device_check():
    from sd_scripts.training.fp8 import check_fp8_device

    check_fp8_device("cpu", torch.bfloat16)
    with pytest.raises(OptionError, match="'fp8_base'.*meta device"):
        check_fp8_device("meta", torch.bfloat16)


# ------------------------------------------------------------------ cpu_offload_checkpointing
def test_cpu_offload_checkpointing_is_exact():
    ref_model = _flux()
    model = copy.deepcopy(ref_model)
    ref_net, net = _lora(ref_model), _lora(model)
    net.load_state_dict(ref_net.state_dict())
    ref_model.enable_gradient_checkpointing()
    features = memory.MemoryFeatures(cpu_offload_checkpointing=True, gradient_checkpointing=True)
    features.enable_checkpointing(model)
    ref_model.train(), model.train()
    inputs = _inputs(model)
    ref_out, ref_grads = _step(ref_model, ref_net, inputs)
    out, grads = _step(model, net, inputs)
    assert torch.equal(out, ref_out) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    assert features.offloaded_checkpoint.calls == 7  # every block went through it


# ------------------------------------------------------------------ checks
def _args(**values):
    base = dict(blocks_to_swap=None, fp8_base=False, fp8_base_unet=False, cpu_offload_checkpointing=False,
                gradient_checkpointing=False, mixed_precision="bf16")
    return argparse.Namespace(**dict(base, **values))


@pytest.mark.parametrize("values, trainer, words", [
    (dict(cpu_offload_checkpointing=True), "network", ["'cpu_offload_checkpointing'", "gradient_checkpointing"]),
    (dict(cpu_offload_checkpointing=True, gradient_checkpointing=True, blocks_to_swap=4), "network",
     ["'blocks_to_swap'", "'cpu_offload_checkpointing'"]),
    (dict(fp8_base=True, mixed_precision="no"), "network", ["'fp8_base'", "bf16"]),
    (dict(fp8_base_unet=True, mixed_precision="no"), "network", ["fp8_base_unet", "bf16"]),
    (dict(blocks_to_swap=4), "finetune", ["'blocks_to_swap'", "fused_backward_pass", "gradient_checkpointing"]),
    (dict(fp8_base=True), "finetune", ["'fp8_base'", "frozen"]),
])
def test_option_combinations_refused(values, trainer, words):
    with pytest.raises(OptionError) as e:
        memory.check_options(_args(**values), trainer=trainer)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_option_combinations_accepted():
    for values in (dict(blocks_to_swap=4, gradient_checkpointing=True), dict(fp8_base=True),
                   dict(cpu_offload_checkpointing=True, gradient_checkpointing=True), dict(blocks_to_swap=0)):
        memory.check_options(_args(**values), trainer="network")
    memory.check_options(_args(blocks_to_swap=4, gradient_checkpointing=True, fused_backward_pass=True),
                         trainer="finetune")
    assert memory._swap(_args(double_blocks_to_swap=3, single_blocks_to_swap=5)) == 5  # sd-scripts' conversion
    assert memory.fp8_text_encoders(_args(fp8_base=True)) and not memory.fp8_text_encoders(_args(fp8_base_unet=True))
    assert memory.fp8_denoiser(_args(fp8_base_unet=True))


def test_too_many_blocks_names_the_limit():
    from sd_scripts.families.flux.model import FluxFamily

    model = _flux()
    with pytest.raises(OptionError, match=r"'blocks_to_swap' 3 is too many .*use at most 2"):
        memory.block_swap_groups(FluxFamily, model, 3)
    from sd_scripts.families.base import Family

    with pytest.raises(OptionError, match="no swappable blocks"):
        memory.block_swap_groups(Family, model, 1)


def test_too_little_memory_names_blocks_to_swap():
    from sd_scripts.families.flux.model import FluxFamily

    bundle = argparse.Namespace(denoiser=_flux((5, 8)), text_encoders=[], vae=None)  # at most 6
    total = sum(p.numel() * p.element_size() for p in bundle.denoiser.parameters())
    resident_4, largest_4 = memory.swap_plan_bytes(FluxFamily.block_swap_groups(bundle.denoiser, 4), bundle.denoiser)
    free = resident_4 + 2 * largest_4  # fits with 4 blocks swapped, not with 2
    features = memory.MemoryFeatures(blocks_to_swap=2)
    with pytest.raises(OptionError, match=r"'blocks_to_swap' 2: .* MB are free; use blocks_to_swap 4 or more"):
        features.place(bundle, FluxFamily, torch.device("cpu"), denoiser_dtype=torch.float32,
                       text_encoder_dtype=torch.float32, compute_dtype=torch.float32, free_memory=lambda d: free)
    features = memory.MemoryFeatures(blocks_to_swap=2)
    with pytest.raises(OptionError, match="even the most blocks_to_swap"):
        features.place(bundle, FluxFamily, torch.device("cpu"), denoiser_dtype=torch.float32,
                       text_encoder_dtype=torch.float32, compute_dtype=torch.float32, free_memory=lambda d: 1)
    assert total > free


# ------------------------------------------------------------------ end to end
pytest_e2e = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def deep_flux(tmp_path_factory):
    """A tiny FLUX.1-dev with 3 double and 4 single blocks (block swap keeps 2 of each list on the device)."""
    from sd_scripts.families.flux.tiny import build_tiny_flux
    from sd_scripts.tools.tiny_model import make_demo_dataset

    root = tmp_path_factory.mktemp("memory_e2e")
    paths = build_tiny_flux(str(root / "flux"), layout="single", blocks=(3, 4))
    data = make_demo_dataset(str(root / "data"))
    return paths, data


def _train(tmp_path, paths, data, *extra, expect_ok=True):
    from conftest import REPO, accelerate_cmd, subprocess_env

    args = ["--pretrained_model_name_or_path", paths.transformer, "--clip_l", paths.clip_l, "--t5xxl", paths.t5xxl,
            "--ae", paths.ae, "--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--output_name",
            "lora", "--resolution", "64", "--max_train_steps", "3", "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--seed", "1",
            "--caption_extension", ".txt", "--t5xxl_max_token_length", "32", "--max_data_loader_n_workers", "0",
            "--cache_latents", "--events_file", str(tmp_path / "events.jsonl"), *extra]
    proc = subprocess.run(accelerate_cmd(*args, module="sd_scripts.flux_train_network"), cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _check_lora(path, paths):
    """The file loads into a network on the model (create_network_from_weights refuses a module with no layer),
    its up weights moved from zero (they start at zero), and applying it changes the denoiser's output."""
    from safetensors.torch import load_file

    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    tensors = load_file(str(path))
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k and "unet" in k)
    assert any(k.startswith("lora_unet_single_blocks_3_") for k in tensors)
    bundle = load_model(paths.transformer, clip_l=paths.clip_l, t5xxl=paths.t5xxl, ae=paths.ae)
    net = lora.create_network_from_weights(str(path), unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                           family="flux")
    inputs = _inputs(bundle.denoiser)
    with torch.no_grad():
        before = bundle.denoiser(**inputs)[0]
        net.apply_to()
        after = bundle.denoiser(**inputs)[0]
    assert (after - before).abs().max() > 1e-4


@pytest_e2e
def test_e2e_flux_lora_with_block_swap(tmp_path, deep_flux):
    paths, data = deep_flux
    proc = _train(tmp_path, paths, data, "--blocks_to_swap", "2", "--gradient_checkpointing")
    assert "block swap: 3 of 7 blocks on the CPU" in proc.stdout + proc.stderr
    _check_lora(tmp_path / "out" / "lora.safetensors", paths)


@pytest_e2e
def test_e2e_flux_lora_with_fp8_base(tmp_path, deep_flux):
    paths, data = deep_flux
    # CLIP-L is trained (LoRA on its fp8 base), T5 and the denoiser are frozen fp8
    proc = _train(tmp_path, paths, data, "--fp8_base", "--mixed_precision", "bf16", "--gradient_checkpointing")
    log = proc.stdout + proc.stderr
    assert "fp8:" in log and "FluxTransformer2DModel" in log and "T5EncoderModel" in log
    _check_lora(tmp_path / "out" / "lora.safetensors", paths)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert all(v.dtype == torch.float32 for v in tensors.values())  # the LoRA itself is not fp8
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k and k.startswith("lora_te1"))


@pytest_e2e
def test_e2e_refusals_are_one_line(tmp_path, deep_flux):
    paths, data = deep_flux
    proc = _train(tmp_path, paths, data, "--blocks_to_swap", "5", expect_ok=False)
    assert proc.returncode == 1 and "'blocks_to_swap' 5 is too many" in proc.stderr + proc.stdout
    proc = _train(tmp_path, paths, data, "--cpu_offload_checkpointing", expect_ok=False)
    assert proc.returncode == 1 and "add gradient_checkpointing" in proc.stderr + proc.stdout
