"""The LoRA tools (sd_scripts.networks.merge_lora, svd_merge_lora, extract_lora_from_models, resize_lora,
check_lora_weights) on the tiny models: their outputs are checked by diffusers' loaders and by the numbers they state."""
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
def make_lora(bundle, path, *, dim=4, alpha=2.0, conv_dim=None, seed=1, scale=0.3, text_encoder=True):
    """A LoRA of the bundle's family with random up weights (so its update is not zero), saved with the family's
    ss_* facts."""
    args = [f"conv_dim={conv_dim}", f"conv_alpha={conv_dim}"] if conv_dim else None
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
    assert load_file(str(one))[next(iter(load_file(str(one))))].dtype == torch.float16
    meta = metadata_of(one)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"

    shuffled = tmp_path / "shuffled.safetensors"
    assert merge_lora.main(["--models", sd1_loras[1], "--save_to", str(shuffled), "--shuffle"]) == 0
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
    assert next(iter(load_file(str(out)).values())).dtype == torch.bfloat16
