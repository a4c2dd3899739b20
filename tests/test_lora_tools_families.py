"""The LoRA tools on other model families, with the family read from the files: an SDXL merge checked by diffusers'
StableDiffusionXLPipeline, and a FLUX.1 merge + extraction round trip through its fused (q/k/v) modules."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from sd_scripts.networks import extract_lora_from_models, flux_extract_lora, flux_merge_lora, sdxl_merge_lora
from sd_scripts.networks.lora_tools import read_lora
from test_lora_tools import make_lora, metadata_of


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a photo of a dog", num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_merge_into_sdxl_checkpoint_equals_diffusers_runtime_lora(tmp_path):
    """SAI-named SDXL LoRA (both text encoders, LoCon) merged into the SDXL single file: diffusers'
    from_single_file of the result gives what load_lora_weights on the base gives."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline

    from sd_scripts.families.sd.saving import diffusers_config_dir
    from sd_scripts.models.loading import load_model
    from sd_scripts.tools.tiny_model import build_tiny_model

    base = build_tiny_model(str(tmp_path / "sdxl"), family="sdxl", layout="single", seed=0).single_file
    bundle = load_model(base)
    lora = make_lora(bundle, tmp_path / "xl.safetensors", dim=4, alpha=2, conv_dim=2)
    assert any(n.startswith("lora_te2_") for n in read_lora(lora).modules)
    out = tmp_path / "merged.safetensors"
    assert sdxl_merge_lora.main(["--sd_model", base, "--models", lora, "--ratios", "0.7", "--save_to", str(out)]) == 0
    config = diffusers_config_dir("sdxl", False, bundle=bundle)
    merged = StableDiffusionXLPipeline.from_single_file(str(out), config=config, local_files_only=True)
    runtime = StableDiffusionXLPipeline.from_single_file(base, config=config, local_files_only=True)
    before = _latents(runtime)
    runtime.load_lora_weights(lora, adapter_name="x")
    runtime.set_adapters(["x"], adapter_weights=[0.7])
    expected, got = _latents(runtime), _latents(merged)
    assert (expected - before).abs().max() > 1e-2
    assert (got - expected).abs().max() < 1e-4 * max(1.0, float(expected.abs().max()))
    meta = metadata_of(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.merged_from"] == "tiny-sdxl, xl"


def test_flux_merge_then_extract_gives_the_lora_back(tmp_path):
    """A FLUX.1 LoRA (BFL names, q/k/v fused into one module) merged into the BFL single file, then extracted from
    the pair: the denoiser's updates come back exactly (rank 4 <= 4, no clipping)."""
    from sd_scripts.families import tiny_files
    from sd_scripts.models.loading import load_model
    from sd_scripts.tools.tiny_model import build_tiny_model

    build_tiny_model(str(tmp_path / "flux"), family="flux", layout="single", seed=0)
    files = {k: os.path.join(tmp_path / "flux", v) for k, v in tiny_files("flux").items()}
    model = files.pop("pretrained_model_name_or_path")
    parts = [x for k, v in files.items() for x in (f"--{k}", v)]
    bundle = load_model(model, **files)
    lora = make_lora(bundle, tmp_path / "flux_lora.safetensors", dim=4, alpha=2, text_encoder=False,
                     network_args=["in_dims=[4,0,0,0,4]"])
    fused = [n for n in read_lora(lora).modules if n.endswith("img_attn_qkv")]
    assert fused, "the file has fused q/k/v modules"
    outside = {"lora_unet_img_in", "lora_unet_txt_in"}
    assert outside <= set(read_lora(lora).modules), "in_dims adapts layers outside the blocks"
    merged = tmp_path / "flux_merged.safetensors"
    assert flux_merge_lora.main(["--flux_model", model, "--models", lora, "--save_to", str(merged), *parts]) == 0
    out = tmp_path / "extracted.safetensors"
    assert flux_extract_lora.main(["--model_org", model, "--model_tuned", str(merged), "--save_to", str(out),
                                   "--dim", "4", "--clamp_quantile", "1", "--mem_eff_safe_open", *parts]) == 0
    want, got = read_lora(lora), read_lora(out)
    assert set(got.modules) == set(want.modules) - outside  # extraction adapts the default targets
    for name, m in got.modules.items():
        torch.testing.assert_close(m.delta(), want.modules[name].delta(), atol=1e-4, rtol=1e-3)
    base_sd, merged_sd = load_file(model), load_file(str(merged))  # the embedders outside the blocks were merged
    for name in outside:
        key = name[len("lora_unet_"):] + ".weight"
        torch.testing.assert_close(merged_sd[key].float(), base_sd[key].float() + want.modules[name].delta(),
                                   atol=1e-5, rtol=1e-4)
    meta = metadata_of(out)
    assert meta["ss_base_model_version"] == metadata_of(lora)["ss_base_model_version"]
    assert extract_lora_from_models.OPTIONS is flux_extract_lora.OPTIONS  # one tool, sd-scripts' names
