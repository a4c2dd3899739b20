"""The LoRA tools (sd_scripts.networks.merge_lora, svd_merge_lora, extract_lora_from_models, resize_lora,
check_lora_weights) on the tiny models: outputs checked by diffusers' loaders and by the numbers the tools state."""
from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import PYTHON, REPO, subprocess_env
from sd_scripts.errors import NetworkError
from sd_scripts.networks import merge_lora
from sd_scripts.networks.lora import create_network
from sd_scripts.networks.lora_tools import family_facts, read_lora


# ------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The checks' own SVDs of tiny matrices: one thread (LAPACK threads only slow them down on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_lora(bundle, path, *, dim=4, alpha=2.0, conv_dim=None, seed=1, scale=0.3, text_encoder=True,
              network_args=()):
    """A LoRA of the bundle's family with random up weights (so its update is not zero), saved with the family's
    ss_* facts."""
    args = ([f"conv_dim={conv_dim}", f"conv_alpha={conv_dim}"] if conv_dim else []) + list(network_args) or None
    net = create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders, family=bundle.family,
                         network_dim=dim, network_alpha=alpha, network_args=args, train_text_encoder=text_encoder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * scale)
            lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=gen) * scale)
    net.save_weights(str(path), metadata=dict(family_facts(bundle.family, bundle.v_prediction),
                                              ss_network_module="networks.lora"))
    return str(path)


def metadata_of(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def deltas(path) -> dict[str, torch.Tensor]:
    return {name: m.delta() for name, m in read_lora(path).modules.items()}


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    from sd_scripts.models.loading import load_model

    return load_model(tiny_sd1.single_file)


@pytest.fixture(scope="module")
def sd1_loras(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return (make_lora(sd1, folder / "a.safetensors", dim=4, alpha=2, conv_dim=2, seed=1),
            make_lora(sd1, folder / "b.safetensors", dim=4, alpha=4, seed=2),
            make_lora(sd1, folder / "c8.safetensors", dim=8, alpha=1, seed=3))


# ------------------------------------------------------------------ merge_lora: into a checkpoint
def _latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a photo of a dog", num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_merge_into_sd1_checkpoint_equals_diffusers_runtime_lora(sd1, tiny_sd1, sd1_loras, tmp_path):
    """The merged single file, loaded by diffusers' from_single_file, gives what the base gives with both LoRAs
    applied at runtime by diffusers' load_lora_weights (LoCon and text-encoder modules included)."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from sd_scripts.families.sd.saving import diffusers_config_dir

    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", tiny_sd1.single_file, "--models", sd1_loras[0], sd1_loras[1],
                            "--ratios", "0.8", "-0.5", "--save_to", str(out)]) == 0
    config = diffusers_config_dir("sd1", False, bundle=sd1)
    kwargs = dict(config=config, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    merged = StableDiffusionPipeline.from_single_file(str(out), **kwargs)
    runtime = StableDiffusionPipeline.from_single_file(tiny_sd1.single_file, **kwargs)
    def fc1(pipe):  # transformers 5's CLIPTextModel has no 'text_model' level
        return getattr(pipe.text_encoder, "text_model", pipe.text_encoder).encoder.layers[0].mlp.fc1.weight

    base_te = fc1(runtime).detach().clone()
    runtime.load_lora_weights(sd1_loras[0], adapter_name="a")
    runtime.load_lora_weights(sd1_loras[1], adapter_name="b")
    runtime.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
    expected, got = _latents(runtime), _latents(merged)
    assert not torch.allclose(fc1(merged), base_te), "the text-encoder modules were merged"
    assert (got - expected).abs().max() < 1e-3 * max(1.0, expected.abs().max().item())
    meta = metadata_of(out)
    assert meta["modelspec.merged_from"] == "tiny-sd1, a, b"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.title"] == "merged"


def test_merge_precision_and_save_precision_reach_the_weights(tiny_sd1, sd1_loras, tmp_path):
    base = load_file(tiny_sd1.single_file)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    lora = read_lora(sd1_loras[0]).modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    outs = {}
    for name, extra in (("bf16", ["--precision", "bf16"]), ("half", ["--save_precision", "fp16", "--no_metadata"])):
        out = tmp_path / f"{name}.safetensors"
        assert merge_lora.main(["--sd_model", tiny_sd1.single_file, "--models", sd1_loras[0], "--ratios", "0.5",
                                "--save_to", str(out), *extra]) == 0
        outs[name] = load_file(str(out))[key]
    assert outs["bf16"].dtype == torch.bfloat16  # the save precision defaults to the merge precision
    assert outs["half"].dtype == torch.float16
    want = base[key].float() + 0.5 * lora.delta()
    torch.testing.assert_close(outs["half"].float(), want, atol=2e-3, rtol=1e-3)
    assert "modelspec.title" not in metadata_of(tmp_path / "half.safetensors")  # --no_metadata
    assert metadata_of(tmp_path / "bf16.safetensors")["modelspec.title"] == "bf16"


def test_merge_refuses_a_lora_of_another_base_naming_the_module(sd1, tiny_sd1, tmp_path, capsys):
    """Same names, other widths (a LoRA of a larger model): one line naming the first module that does not fit."""
    lora = read_lora(make_lora(sd1, tmp_path / "x.safetensors", dim=2))
    name = sorted(lora.modules)[0]
    tensors = load_file(lora.path)
    tensors[f"{name}.lora_down.weight"] = torch.zeros(2, tensors[f"{name}.lora_down.weight"].shape[1] * 2)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "wide.safetensors"))
    assert merge_lora.main(["--sd_model", tiny_sd1.single_file, "--models", str(tmp_path / "wide.safetensors"),
                            "--save_to", str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert name in err and "another base model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(SystemExit):
        merge_lora.main(["--models", lora.path, "--sd_model", tiny_sd1.single_file, "--v2", "--save_to",
                         str(tmp_path / "o.safetensors"), "--bogus"])
    assert merge_lora.main(["--models", lora.path, "--sd_model", tiny_sd1.single_file, "--v2", "--save_to",
                            str(tmp_path / "o.safetensors")]) == 1
    assert "--v2 is for" in capsys.readouterr().err


# ------------------------------------------------------------------ merge_lora: LoRAs into one LoRA
def test_merge_loras_concat_is_the_exact_weighted_sum(sd1_loras, tmp_path):
    out = tmp_path / "ab.safetensors"
    assert merge_lora.main(["--models", sd1_loras[0], sd1_loras[2], "--ratios", "0.7", "-0.4", "--concat",
                            "--save_to", str(out)]) == 0
    a, c, got = deltas(sd1_loras[0]), deltas(sd1_loras[2]), deltas(out)
    merged = read_lora(out)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert merged.modules[name].rank == 4 + 8  # ranks stacked
    for key in got:
        want = 0.7 * a.get(key, 0) + -0.4 * c.get(key, 0)
        torch.testing.assert_close(got[key], want, atol=1e-5, rtol=1e-4)
    meta = metadata_of(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.merged_from"] == "a, c8" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    from sd_scripts.training.metadata import safetensors_model_hash

    assert meta["sshs_model_hash"] == safetensors_model_hash(out)


def test_merge_loras_sum_ratio_shuffle_and_rank_mismatch(sd1_loras, tmp_path):
    one = tmp_path / "half.safetensors"
    assert merge_lora.main(["--models", sd1_loras[1], "--ratios", "-0.5", "--save_to", str(one),
                            "--save_precision", "fp16"]) == 0
    want, got = deltas(sd1_loras[1]), deltas(one)
    for key in want:  # a single LoRA at ratio r gives exactly r x its update
        torch.testing.assert_close(got[key], -0.5 * want[key], atol=2e-3, rtol=2e-2)
    saved = load_file(str(one))
    assert {v.dtype for k, v in saved.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.dtype for k, v in saved.items() if k.endswith(".alpha")} == {torch.float32}  # the scale stays exact
    meta = metadata_of(one)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"

    shuffled = tmp_path / "shuffled.safetensors"
    assert merge_lora.main(["--models", sd1_loras[1], "--save_to", str(shuffled), "--shuffle", "--no_metadata"]) == 0
    meta = metadata_of(shuffled)
    assert meta["ss_network_dim"] == "4" and not any(k.startswith("modelspec.") for k in meta)
    plain, mixed = read_lora(sd1_loras[1]), read_lora(shuffled)
    assert any(not torch.equal(plain.modules[n].down, mixed.modules[n].down) for n in plain.modules)
    for n in plain.modules:
        torch.testing.assert_close(mixed.modules[n].delta(), plain.modules[n].delta(), atol=1e-5, rtol=1e-5)

    with pytest.raises(NetworkError, match="rank 8 .* --concat"):
        merge_lora.merge(merge_lora.parse_args(["--models", sd1_loras[0], sd1_loras[2], "--save_to",
                                                str(tmp_path / "x.safetensors")]))
    with pytest.raises(NetworkError, match="one ratio per"):
        merge_lora.merge(merge_lora.parse_args(["--models", sd1_loras[0], "--ratios", "1", "2", "--save_to",
                                                str(tmp_path / "x.safetensors")]))


def test_merge_lora_command_line(sd1_loras, tmp_path):
    """The sd-scripts command line, run as `python -m`."""
    out = tmp_path / "cli.safetensors"
    result = subprocess.run([PYTHON, "-m", "sd_scripts.networks.merge_lora", "--save_precision", "bf16",
                             "--precision", "float", "--save_to", str(out), "--models", sd1_loras[0], sd1_loras[1],
                             "--ratios", "0.5", "0.5"], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert metadata_of(out)["ss_network_module"] == "networks.lora"
    assert load_file(str(out))["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dtype == torch.bfloat16


# ------------------------------------------------------------------ resize_lora
def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_resize_to_a_fixed_rank_keeps_the_reported_fidelity(sd1_loras, tmp_path, capsys):
    from sd_scripts.networks import resize_lora

    out = tmp_path / "r2.safetensors"
    modules, infos = resize_lora.resize(resize_lora.parse_args(
        ["--model", sd1_loras[2], "--save_to", str(out), "--new_rank", "3", "--verbose", "--save_precision", "bf16"]))
    lines = capsys.readouterr().out
    original, resized = read_lora(sd1_loras[2]), read_lora(out)
    assert set(resized.modules) == set(original.modules)
    for name, m in resized.modules.items():
        want, info = original.modules[name].delta(), infos[name]
        assert m.rank == min(3, *want.shape[:2]) and m.down.dtype == torch.bfloat16
        assert abs(m.scale - original.modules[name].scale) < 1e-6  # alpha follows the rank: same scale
        # what it reports it kept is what it kept (the rest is the error), up to bf16 rounding
        kept = float(m.delta().norm() / want.norm())
        assert abs(kept - info.fro_retained) < 2e-2
        assert abs(_relative_error(m.delta(), want) - (1 - info.fro_retained ** 2) ** 0.5) < 2e-2
        assert name in lines and f"fro retained: {info.fro_retained:.1%}" in lines
    assert "Average Frobenius norm retention" in lines
    meta = metadata_of(out)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "0.375"  # alpha 1 of rank 8 -> 3/8
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 3")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["sshs_model_hash"] != metadata_of(sd1_loras[2]).get(
        "sshs_model_hash")

    # a LoRA of rank 4 "resized" to 6 keeps rank 4 (no zero directions), and its update exactly
    grown = tmp_path / "grown.safetensors"
    modules, _ = resize_lora.resize(resize_lora.parse_args(["--model", sd1_loras[1], "--save_to", str(grown),
                                                            "--new_rank", "6"]))
    assert {m.rank for m in modules.values()} == {4} and metadata_of(grown)["ss_network_dim"] == "4"
    before = deltas(sd1_loras[1])
    for name, delta in deltas(grown).items():
        torch.testing.assert_close(delta, before[name], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def decaying_lora(sd1_loras, tmp_path_factory):
    """The rank-8 LoRA with its rank components damped faster in some modules than in others, so their updates'
    spectra (and the ranks a dynamic method keeps) differ."""
    from safetensors.torch import save_file

    tensors = load_file(sd1_loras[2])
    ups = sorted(k for k in tensors if k.endswith("lora_up.weight"))
    for i, key in enumerate(ups):
        rate = 0.1 + 0.6 * (i % 4)
        tensors[key] = tensors[key] * torch.exp(-rate * torch.arange(tensors[key].shape[1])).view(1, -1, *(
            [1] * (tensors[key].dim() - 2)))
    path = tmp_path_factory.mktemp("decay") / "decay.safetensors"
    save_file(tensors, str(path), metadata=metadata_of(sd1_loras[2]))
    return str(path)


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.7), ("sv_ratio", 3.0)])
def test_resize_dynamic_methods_keep_the_stated_share_with_the_fewest_ranks(decaying_lora, tmp_path, method, param):
    from sd_scripts.networks import resize_lora

    out = tmp_path / f"{method}.safetensors"
    modules, infos = resize_lora.resize(resize_lora.parse_args(
        ["--model", decaying_lora, "--save_to", str(out), "--new_rank", "6", "--new_conv_rank", "2",
         "--dynamic_method", method, "--dynamic_param", str(param)]))
    original = read_lora(decaying_lora)

    def fewest(values: torch.Tensor) -> int:  # the smallest rank meeting the threshold, computed independently
        if method == "sv_ratio":
            return int((values >= values[0] / param).sum())
        share = [float(((values[:r] ** 2).sum() / (values ** 2).sum()).sqrt()) if method == "sv_fro"
                 else float(values[:r].sum() / values.sum()) for r in range(1, len(values) + 1)]
        return next(r for r, x in enumerate(share, 1) if x >= param - 1e-6)

    ranks = set()
    for name, m in modules.items():
        s = torch.linalg.svdvals(original.modules[name].product().flatten(1))
        cap = 2 if m.is_conv_kxk else 6
        assert m.rank == max(1, min(cap, fewest(s)))
        ranks.add(m.rank)
        if method == "sv_fro":  # the share it reports is the share kept
            kept = float(((s[:m.rank] ** 2).sum() / (s ** 2).sum()).sqrt())
            assert abs(kept - infos[name].fro_retained) < 1e-5
            assert kept >= param - 1e-6 or m.rank == cap
    assert len(ranks) > 1, "ranks differ per module"
    assert metadata_of(out)["ss_network_dim"] == "Dynamic"
    with pytest.raises(NetworkError, match="needs --dynamic_param"):
        resize_lora.resize(resize_lora.parse_args(["--model", decaying_lora, "--save_to", str(out),
                                                   "--dynamic_method", method]))


# ------------------------------------------------------------------ svd_merge_lora
def test_svd_merge_to_new_ranks(sd1_loras, tmp_path, capsys):
    from sd_scripts.networks import svd_merge_lora

    a, b = deltas(sd1_loras[0]), deltas(sd1_loras[1])
    exact = tmp_path / "exact.safetensors"
    modules, infos = svd_merge_lora.merge(svd_merge_lora.parse_args(
        ["--models", sd1_loras[0], sd1_loras[1], "--ratios", "0.6", "-1.5", "--new_rank", "8", "--new_conv_rank", "3",
         "--clamp_quantile", "1", "--save_to", str(exact)]))
    got = deltas(exact)
    for name, delta in got.items():
        want = 0.6 * a.get(name, 0) + -1.5 * b.get(name, 0)
        m = modules[name]
        if m.is_conv_kxk:  # only LoRA a has conv modules (rank 2 < 3): still exact
            assert m.rank == min(3, *want.shape[:2])
        else:
            assert m.rank == min(8, *want.shape[:2])
        torch.testing.assert_close(delta, want, atol=1e-4, rtol=1e-3)  # rank 4 + 4 <= 8: nothing lost
    meta = metadata_of(exact)
    assert meta["ss_network_dim"] == "8" and '"conv_dim": "3"' in meta["ss_network_args"]
    assert meta["modelspec.merged_from"] == "a, b"

    low = tmp_path / "low.safetensors"
    modules, infos = svd_merge_lora.merge(svd_merge_lora.parse_args(
        ["--models", sd1_loras[0], sd1_loras[1], "--new_rank", "2", "--save_to", str(low), "--no_metadata",
         "--save_precision", "fp16", "--verbose"]))
    assert "fro retained" in capsys.readouterr().out
    assert load_file(str(low))["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dtype == torch.float16
    got = deltas(low)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
    assert modules[name].rank == 2 and infos[name].fro_retained < 0.99
    err = _relative_error(got[name], a[name] + b[name])
    assert err >= (1 - infos[name].fro_retained ** 2) ** 0.5 - 1e-4  # at least the SVD error (plus clamping)
    assert "modelspec.title" not in metadata_of(low)

    # --precision: the sum is computed in bf16 (and saved so), not in float
    half = tmp_path / "bf16.safetensors"
    svd_merge_lora.merge(svd_merge_lora.parse_args(
        ["--models", sd1_loras[0], sd1_loras[1], "--new_rank", "8", "--clamp_quantile", "1", "--precision", "bf16",
         "--save_to", str(half)]))
    rough, exact_sum = deltas(half), deltas(exact)
    name = "lora_unet_mid_block_attentions_0_proj_in"
    assert read_lora(half).modules[name].down.dtype == torch.bfloat16
    assert 0 < _relative_error(rough[name], a[name] + b[name]) < 5e-2


# ------------------------------------------------------------------ extract_lora_from_models
@pytest.fixture(scope="module")
def tuned_sd1(tiny_sd1, sd1, tmp_path_factory):
    """A 'fine-tune' of the tiny SD1 model: its base plus a known rank-2 LoCon update (U-Net and text encoder)."""
    folder = tmp_path_factory.mktemp("tuned")
    lora = make_lora(sd1, folder / "known.safetensors", dim=2, alpha=2, conv_dim=2, seed=7, scale=0.5)
    tuned = folder / "tuned.safetensors"
    assert merge_lora.main(["--sd_model", tiny_sd1.single_file, "--models", lora, "--save_to", str(tuned)]) == 0
    return str(tuned), lora


def test_extract_reproduces_the_difference(tiny_sd1, tuned_sd1, tmp_path, capsys):
    from sd_scripts.networks import extract_lora_from_models as extract

    tuned, known = tuned_sd1
    out = tmp_path / "extracted.safetensors"
    modules, infos = extract.extract(extract.parse_args(
        ["--model_org", tiny_sd1.single_file, "--model_tuned", tuned, "--save_to", str(out), "--dim", "4",
         "--conv_dim", "3", "--clamp_quantile", "1", "--min_diff", "0.001"]))
    want, got = deltas(known), deltas(out)
    assert set(got) == set(want)  # the same modules, text encoder included
    for name in want:  # rank 2 <= 4: reproduced up to float rounding
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3)
        assert infos[name].fro_retained > 0.9999
    assert {m.rank for n, m in modules.items() if not m.is_conv_kxk} == {4}
    assert {m.rank for m in modules.values() if m.is_conv_kxk} == {3}
    meta = metadata_of(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert '"conv_dim": "3"' in meta["ss_network_args"] and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"

    # rank 1, clipped, half precision, a high min_diff: the text encoders are left out and the stated error holds
    out1 = tmp_path / "r1.safetensors"
    modules, infos = extract.extract(extract.parse_args(
        ["--model_org", tiny_sd1.single_file, "--model_tuned", tuned, "--save_to", str(out1), "--dim", "1",
         "--min_diff", "100", "--save_precision", "fp16", "--load_precision", "bf16", "--verbose"]))
    printed = capsys.readouterr().out
    got = read_lora(out1)
    assert got.modules and all(n.startswith("lora_unet_") for n in got.modules)
    assert not any(m.is_conv_kxk for m in got.modules.values())  # no --conv_dim: no ResNet 3x3 layers
    assert next(iter(got.modules.values())).down.dtype == torch.float16
    for name, m in got.modules.items():
        assert m.rank == 1
        # bf16 loading, fp16 saving and 0.99 clipping add to the SVD error the report states
        assert _relative_error(m.delta(), want[name]) <= (1 - infos[name].fro_retained ** 2) ** 0.5 + 0.05
        assert name in printed
    assert "Average Frobenius norm retention" in printed


def test_extract_refuses_models_of_different_sizes_and_wrong_flags(tiny_sd1, tmp_path):
    from sd_scripts.networks import extract_lora_from_models as extract
    from sd_scripts.tools.tiny_model import build_tiny_model

    other = build_tiny_model(str(tmp_path / "sd2"), family="sd2", layout="single", seed=0).single_file
    with pytest.raises(NetworkError, match="different"):
        extract.extract(extract.parse_args(["--model_org", tiny_sd1.single_file, "--model_tuned", other,
                                            "--save_to", str(tmp_path / "x.safetensors")]))
    out = tmp_path / "v.safetensors"
    extract.extract(extract.parse_args(["--model_org", other, "--model_tuned", other, "--v2", "--v_parameterization",
                                        "--save_to", str(out), "--no_metadata"]))
    meta = metadata_of(out)
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert not any(k.startswith("modelspec.") for k in meta)
    with pytest.raises(NetworkError, match="--sdxl is for"):
        extract.extract(extract.parse_args(["--model_org", tiny_sd1.single_file, "--model_tuned",
                                            tiny_sd1.single_file, "--sdxl", "--save_to",
                                            str(tmp_path / "x.safetensors")]))
    with pytest.raises(NetworkError, match="device 'nonsense'"):
        extract.extract(extract.parse_args(["--model_org", tiny_sd1.single_file, "--model_tuned",
                                            tiny_sd1.single_file, "--device", "nonsense", "--save_to",
                                            str(tmp_path / "x.safetensors")]))
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ check_lora_weights
def test_check_lora_weights_prints_per_key_statistics(sd1_loras, tmp_path, capsys):
    from sd_scripts.networks import check_lora_weights

    assert check_lora_weights.main([sd1_loras[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    tensors = load_file(sd1_loras[1])
    lora_keys = [k for k in tensors if "lora_" in k and not k.endswith("alpha")]
    assert lines[0] == f"number of LoRA modules: {len(lora_keys)}"
    rows = {line.split(",")[0]: line.split(",") for line in lines[1:-1]}
    assert set(rows) == set(lora_keys)
    key = lora_keys[0]
    assert rows[key][1] == str(tuple(tensors[key].shape)).replace(", ", "-")
    assert abs(float(rows[key][2]) - tensors[key].abs().mean().item()) < 1e-6
    assert abs(float(rows[key][3]) - tensors[key].abs().min().item()) < 1e-6
    assert lines[-1].startswith("tensors with NaN/Inf: 0")

    tensors[key][0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bad.safetensors"))
    assert check_lora_weights.main(["-s", str(tmp_path / "bad.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"number of all modules: {len(tensors)}" and any(".alpha," in ln for ln in lines)
    assert lines[-1].startswith("tensors with NaN/Inf: 1")

    from sd_scripts.networks import resize_lora  # a LyCORIS file is named as such, not just "not a LoRA"

    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    assert resize_lora.main(["--model", str(tmp_path / "loha.safetensors"), "--save_to",
                             str(tmp_path / "o.safetensors")]) == 1
    assert "'hada_' tensors" in capsys.readouterr().err


# ------------------------------------------------------------------ block weights (--lbws)
def test_lbw_slots_of_both_unet_namings():
    from sd_scripts.networks.lora_tools import LBW_PRESETS, LBW_SLOTS, lbw_slot

    assert len(LBW_SLOTS) == 26 and all(len(v) == k for k, v in LBW_PRESETS.items())
    expect = {"lora_te_text_model_encoder_layers_0_mlp_fc1": "BASE",
              "lora_te2_text_model_encoder_layers_0_mlp_fc1": "BASE",
              "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
              "lora_unet_down_blocks_1_attentions_1_proj_in": "IN05",
              "lora_unet_down_blocks_1_downsamplers_0_conv": "IN06",
              "lora_unet_mid_block_attentions_0_proj_in": "MID",
              "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
              "lora_unet_up_blocks_3_attentions_2_proj_out": "OUT11",
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": "IN04",
              "lora_unet_middle_block_1_proj_in": "MID",
              "lora_unet_output_blocks_0_1_proj_out": "OUT00",
              "lora_unet_double_blocks_0_img_attn_qkv": None}
    assert {name: lbw_slot(name) for name in expect} == expect


def test_merge_and_svd_merge_apply_block_weights(sd1_loras, tmp_path):
    from sd_scripts.networks import svd_merge_lora
    from sd_scripts.networks.lora_tools import LBW_SLOTS, lbw_slot

    weights = [round(0.1 * i - 0.5, 2) for i in range(26)]
    lbw = "[" + ",".join(map(str, weights)) + "]"
    out, svd_out = tmp_path / "lbw.safetensors", tmp_path / "lbw_svd.safetensors"
    assert merge_lora.main(["--models", sd1_loras[1], "--ratios", "0.5", "--lbws", lbw, "--save_to", str(out)]) == 0
    svd_merge_lora.merge(svd_merge_lora.parse_args(["--models", sd1_loras[1], "--ratios", "0.5", "--lbws", lbw,
                                                    "--new_rank", "4", "--clamp_quantile", "1", "--save_to",
                                                    str(svd_out)]))
    want = deltas(sd1_loras[1])
    slots = set()
    for got in (deltas(out), deltas(svd_out)):
        for name, delta in want.items():
            slot = lbw_slot(name)
            slots.add(slot)
            factor = 0.5 * weights[LBW_SLOTS.index(slot)]
            torch.testing.assert_close(got[name], factor * delta, atol=1e-5, rtol=1e-4)
    assert {"BASE", "MID"} <= slots and len(slots) >= 5
    with pytest.raises(NetworkError, match="12, 17, 20, 26"):
        merge_lora.merge(merge_lora.parse_args(["--models", sd1_loras[1], "--lbws", "[1,1]", "--save_to", str(out)]))


# ------------------------------------------------------------------ sd-scripts command lines
# every option of sd-scripts' tools (commit 48d368f), by tool; the sdxl_ / flux_ variants' options are served by the
# one tool of ours
SD_SCRIPTS_OPTIONS = {
    "merge_lora": {  # merge_lora.py + sdxl_merge_lora.py + flux_merge_lora.py
        "v2", "save_precision", "precision", "sd_model", "save_to", "models", "ratios", "no_metadata", "concat",
        "shuffle", "lbws", "flux_model", "clip_l", "t5xxl", "mem_eff_load_save", "loading_device", "working_device",
        "clip_l_save_to", "t5xxl_save_to", "diffusers"},
    "svd_merge_lora": {"save_precision", "precision", "save_to", "models", "ratios", "lbws", "new_rank",
                       "new_conv_rank", "device", "no_metadata"},
    "extract_lora_from_models": {  # + flux_extract_lora.py
        "v2", "v_parameterization", "sdxl", "load_precision", "save_precision", "model_org", "model_tuned", "save_to",
        "dim", "conv_dim", "device", "clamp_quantile", "min_diff", "no_metadata", "load_original_model_to",
        "load_tuned_model_to", "mem_eff_safe_open"},
    "resize_lora": {"save_precision", "new_rank", "new_conv_rank", "save_to", "model", "device", "verbose",
                    "dynamic_method", "dynamic_param"},
    "check_lora_weights": {"file", "show_all_keys"},
}


@pytest.mark.parametrize("alias,tool", [("sdxl_merge_lora", "merge_lora"), ("flux_merge_lora", "merge_lora"),
                                        ("flux_extract_lora", "extract_lora_from_models")])
def test_sd_scripts_family_variants_are_the_same_tool(alias, tool, capsys):
    import importlib

    module, same = importlib.import_module(f"sd_scripts.networks.{alias}"), importlib.import_module(
        f"sd_scripts.networks.{tool}")
    assert module.OPTIONS is same.OPTIONS
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0 and f"usage: {alias}" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted(SD_SCRIPTS_OPTIONS))
def test_every_sd_scripts_option_is_declared(tool):
    import importlib

    module = importlib.import_module(f"sd_scripts.networks.{tool}")
    declared = {name for opt in module.OPTIONS for name in (opt.name, *opt.aliases)}
    assert SD_SCRIPTS_OPTIONS[tool] <= declared, SD_SCRIPTS_OPTIONS[tool] - declared
    parser_flags = {a for action in module.parse_args.__globals__["build_parser"]("x", "", module.OPTIONS)._actions
                    for a in action.option_strings}
    assert {"--" + n for n in declared if n != "file"} <= parser_flags  # the parser comes from the declared list


@pytest.mark.parametrize("tool,args,named", [
    ("merge_lora", ["--working_device", "nonsense"], "working_device"),
    ("merge_lora", ["--loading_device", "nonsense"], "loading_device"),
    ("merge_lora", ["--clip_l_save_to", "x.safetensors"], "clip_l_save_to"),
    ("merge_lora", ["--t5xxl_save_to", "x.safetensors"], "t5xxl_save_to"),
    ("merge_lora", ["--diffusers"], "diffusers"),
    ("svd_merge_lora", ["--device", "nonsense"], "device"),
    ("resize_lora", ["--device", "nonsense"], "device"),
    ("extract_lora_from_models", ["--load_original_model_to", "nonsense"], "load_original_model_to"),
    ("extract_lora_from_models", ["--load_tuned_model_to", "nonsense"], "load_tuned_model_to"),
])
def test_bad_or_unsupported_options_are_one_line_errors_naming_them(tool, args, named, sd1_loras, tiny_sd1, tmp_path,
                                                                   capsys):
    import importlib

    module = importlib.import_module(f"sd_scripts.networks.{tool}")
    common = {"merge_lora": ["--sd_model", tiny_sd1.single_file, "--models", sd1_loras[1]],
              "svd_merge_lora": ["--models", sd1_loras[1]], "resize_lora": ["--model", sd1_loras[1]],
              "extract_lora_from_models": ["--model_org", tiny_sd1.single_file, "--model_tuned",
                                           tiny_sd1.single_file]}[tool]
    out = tmp_path / "out.safetensors"
    assert module.main([*common, "--save_to", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert f"'--{named}'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_option_lists_are_torch_free():
    """A GUI form can be built from the tools' declared options without importing torch."""
    code = ("import sys\n"
            "from sd_scripts.networks import merge_lora, svd_merge_lora, resize_lora, extract_lora_from_models, "
            "check_lora_weights\n"
            "assert all(m.OPTIONS for m in (merge_lora, svd_merge_lora, resize_lora, extract_lora_from_models, "
            "check_lora_weights))\n"
            "merge_lora.parse_args(['--models', 'a.safetensors', '--save_to', 'b.safetensors'])\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([PYTHON, "-c", code], check=True, cwd=REPO, env=subprocess_env(), timeout=60)
