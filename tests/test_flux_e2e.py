"""End to end: real `accelerate launch -m sd_scripts.flux_train_network` / `flux_train` runs on the tiny FLUX.1 and
Chroma models (64 px, a few steps), checked from the outside: files, samples, metadata, diffusers reading them."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO, accelerate_cmd, subprocess_env

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from sd_scripts.tools.tiny_model import build_tiny_model, make_demo_dataset

    root = tmp_path_factory.mktemp("flux_e2e")
    flux = build_tiny_model(str(root / "flux"), "flux", layout="both", model_type="flux_dev")
    chroma = build_tiny_model(str(root / "chroma"), "chroma", layout="both")
    data = make_demo_dataset(str(root / "data"))
    return root, flux, chroma, data


def _parts(root, kind="flux") -> list[str]:
    folder = root / kind
    out = ["--t5xxl", str(folder / "t5xxl.safetensors"), "--ae", str(folder / "ae.safetensors")]
    return out + (["--clip_l", str(folder / "clip_l.safetensors")] if kind == "flux" else [])


def _run(*args, module="sd_scripts.flux_train_network", expect_ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(accelerate_cmd(*args, module=module), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _common(tmp_path, data, steps=3) -> list[str]:
    return ["--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--output_name", "lora",
            "--resolution", "64", "--max_train_steps", str(steps), "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--seed", "1",
            "--caption_extension", ".txt", "--t5xxl_max_token_length", "32", "--max_data_loader_n_workers", "0"]


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _assert_diffusers_applies_the_file_as_we_do(pipe, folder: str, path, family_name: str) -> None:
    """The transformer diffusers built with the LoRA file loaded predicts what ours does with the file applied:
    every key of the file reached its layer."""
    from sd_scripts.families import family_class
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    bundle = load_model(folder)
    net = lora.create_network_from_weights(str(path), unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                           family=family_name)
    net.apply_to()
    family = family_class(family_name)(bundle, None, t5xxl_max_token_length=32, model_prediction_type="raw")
    noised = family.noised(torch.randn(1, 16, 8, 8), torch.Generator().manual_seed(0))
    cond = family.encode_captions(["a photo"], train_text_encoder=False)
    with torch.no_grad():
        ours = family.predict(noised, cond, {})
        bundle.denoiser = pipe.transformer
        net.unapply()
        theirs = family.predict(noised, cond, {})
    assert torch.allclose(ours, theirs, atol=1e-4)


def _image(pipe, seed=3):
    out = pipe("a photo of sks dog", width=64, height=64, num_inference_steps=2, guidance_scale=3.5,
               max_sequence_length=32, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images


def test_flux_lora_with_samples(tmp_path, tiny_flux):
    root, flux, _, data = tiny_flux
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --d 1 --s 2 --g 3.0\n")
    _run("--pretrained_model_name_or_path", flux.single_file, *_parts(root), *_common(tmp_path, data),
         "--sample_prompts", str(prompts), "--sample_every_n_steps", "3", "--apply_t5_attn_mask",
         "--timestep_sampling", "shift")
    tensors, meta = _tensors(tmp_path / "out" / "lora.safetensors")
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_double_blocks_1_img_attn_qkv" in names and "lora_unet_single_blocks_0_linear1" in names
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0") for n in names)
    assert not any(n.startswith("lora_te3") for n in names)  # train_t5xxl is off by default
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k and "unet" in k)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_timestep_sampling"] == "shift"
    assert meta["ss_model_type"] == "flux" and meta["ss_apply_t5_attn_mask"] == "True"
    samples = list((tmp_path / "out" / "sample").glob("*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_flux_lora_cached_text_encoders_loads_in_diffusers(tmp_path, tiny_flux):
    """T5 + CLIP outputs cached to disk; the file (double blocks: diffusers' kohya converter knows single blocks only
    at FLUX.1's real widths) loads in FluxPipeline with every key used and changes the image."""
    from diffusers import FluxPipeline

    root, flux, _, data = tiny_flux
    _run("--pretrained_model_name_or_path", flux.diffusers_dir, *_common(tmp_path, data, steps=4),
         "--cache_text_encoder_outputs_to_disk", "--cache_latents", "--network_train_unet_only",
         "--network_args", "train_blocks=double", "split_qkv=True")
    assert len(list(Path(data).glob("*/*_flux_te.npz"))) == 13  # one per captioned image
    path = tmp_path / "out" / "lora.safetensors"
    tensors, _ = _tensors(path)
    assert all(k.startswith("lora_unet_double_blocks_") for k in tensors)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # split: 3 x rank 4

    pipe = FluxPipeline.from_pretrained(flux.diffusers_dir, local_files_only=True)
    before = _image(pipe)
    pipe.load_lora_weights(str(path))
    after = _image(pipe)
    assert (after - before).abs().max() > 1e-3
    # every key used: the transformer diffusers built equals ours with the file applied
    _assert_diffusers_applies_the_file_as_we_do(pipe, flux.diffusers_dir, path, "flux")


def test_chroma_lora(tmp_path, tiny_flux):
    from diffusers import ChromaPipeline  # noqa: F401 - Chroma's pipeline exists in this diffusers

    root, _, chroma, data = tiny_flux
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --d 1 --s 2\n")
    _run("--pretrained_model_name_or_path", chroma.single_file, *_parts(root, "chroma"), "--model_type", "chroma",
         "--apply_t5_attn_mask", *_common(tmp_path, data), "--sample_prompts", str(prompts),
         "--sample_every_n_steps", "3")
    tensors, meta = _tensors(tmp_path / "out" / "lora.safetensors")
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_double_blocks_0_txt_attn_qkv" in names and "lora_unet_single_blocks_1_linear2" in names
    assert not any("mod_lin" in n or "modulation" in n for n in names)  # Chroma's blocks have no modulation Linear
    assert not any(n.startswith("lora_te") for n in names)
    assert meta["modelspec.architecture"] == "chroma/lora" and meta["ss_base_model_version"] == "chroma"
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1


def test_chroma_lora_loads_in_diffusers(tmp_path, tiny_flux):
    """A Chroma LoRA (double blocks: diffusers' kohya converter knows single blocks only at real widths) loads in
    ChromaPipeline, changes the image, and diffusers' transformer with it equals ours with the file applied."""
    from diffusers import ChromaPipeline

    root, _, chroma, data = tiny_flux
    folder = chroma.diffusers_dir
    _run("--pretrained_model_name_or_path", folder, *_common(tmp_path, data), "--apply_t5_attn_mask",
         "--network_train_unet_only", "--network_args", "train_blocks=double")
    path = tmp_path / "out" / "lora.safetensors"
    pipe = ChromaPipeline.from_pretrained(folder, local_files_only=True)

    def image():
        return pipe("a photo of sks dog", width=64, height=64, num_inference_steps=2, max_sequence_length=32,
                    generator=torch.Generator().manual_seed(3), output_type="pt").images

    before = image()
    pipe.load_lora_weights(str(path))
    assert (image() - before).abs().max() > 1e-3
    _assert_diffusers_applies_the_file_as_we_do(pipe, folder, path, "chroma")


def test_wrong_script_and_options_are_refused(tmp_path, tiny_flux, tiny_sd1):
    root, flux, _, data = tiny_flux
    proc = _run("--pretrained_model_name_or_path", flux.single_file, *_parts(root), "--train_data_dir", data,
                "--output_dir", str(tmp_path / "o"), module="sd_scripts.train_network", expect_ok=False)
    assert proc.returncode == 1 and "flux_train_network" in proc.stderr
    proc = _run("--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", data,
                "--output_dir", str(tmp_path / "o"), expect_ok=False)
    assert proc.returncode == 1 and "flux_train_network trains" in proc.stderr
    proc = _run("--pretrained_model_name_or_path", flux.single_file, *_parts(root), "--train_data_dir", data,
                "--output_dir", str(tmp_path / "o"), "--v_parameterization", expect_ok=False)
    assert proc.returncode == 1 and "'v_parameterization'" in proc.stderr
    proc = _run("--pretrained_model_name_or_path", flux.single_file, "--t5xxl", str(root / "flux" / "clip_l.safetensors"),
                "--ae", str(root / "flux" / "ae.safetensors"), "--clip_l", str(root / "flux" / "clip_l.safetensors"),
                "--train_data_dir", data, "--output_dir", str(tmp_path / "o"), expect_ok=False)
    assert proc.returncode == 1 and "--t5xxl" in proc.stderr and "CLIP-L" in proc.stderr


def test_flux_full_fine_tune_with_fused_backward_saves_bfl_file(tmp_path, tiny_flux):
    from sd_scripts.families.flux.weights import load_transformer

    root, flux, _, data = tiny_flux
    images = tmp_path / "images" / "1_square"  # concept folders, as sd-scripts' flux_train reads them too
    images.mkdir(parents=True)
    for i, colour in enumerate(((220, 40, 40), (40, 70, 220))):
        Image.new("RGB", (64, 64), colour).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.caption").write_text(f"a square number {i}\n")
    out = tmp_path / "out"
    _run("--pretrained_model_name_or_path", flux.single_file, *_parts(root),
         "--train_data_dir", str(images.parent), "--output_dir", str(out), "--output_name", "ft", "--resolution", "64",
         "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "2", "--t5xxl_max_token_length", "32",
         "--save_precision", "float", "--max_data_loader_n_workers", "0",
         "--fused_backward_pass", "--mem_eff_save", module="sd_scripts.flux_train")  # 24 GB path: steps inside backward
    final = out / "ft.safetensors"
    tensors, meta = _tensors(final)
    assert "double_blocks.0.img_attn.qkv.weight" in tensors and "guidance_in.in_layer.weight" in tensors
    assert meta["modelspec.architecture"] == "flux-1-dev"
    base = load_transformer(flux.single_file)
    tuned = load_transformer(str(final))
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any("transformer_blocks.0.attn.to_q" in k for k in changed)
    # (diffusers' from_single_file reads save_transformer's layout at FLUX.1's real width: test_flux_files.py)
