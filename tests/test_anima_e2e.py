"""End to end: real `accelerate launch -m sd_scripts.anima_train_network` / `anima_train` runs on the tiny Anima
model (64 px, a few steps), checked from the outside: files and their names, samples, metadata, the text-encoder
cache files, the trained file read back and shown to change the output."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO, accelerate_cmd, subprocess_env

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd_scripts.families.anima.tiny import build_tiny_anima
    from sd_scripts.tools.tiny_model import make_demo_dataset

    root = tmp_path_factory.mktemp("anima_e2e")
    # 3 DiT blocks: block swap may move all but two of them
    return build_tiny_anima(str(root / "model"), blocks=3), make_demo_dataset(str(root / "data"))


def _run(*args, module="sd_scripts.anima_train_network"):
    proc = subprocess.run(accelerate_cmd(*args, module=module), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _model(paths) -> list[str]:
    return ["--pretrained_model_name_or_path", paths["pretrained_model_name_or_path"], "--qwen3", paths["qwen3"],
            "--vae", paths["vae"], "--qwen3_max_token_length", "16", "--t5_max_token_length", "16"]


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _prediction(paths, lora_path=None, **network):
    """The family's prediction on fixed inputs, with a LoRA file applied through our loader when given."""
    from sd_scripts.families import family_class
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    bundle = load_model(paths["pretrained_model_name_or_path"], qwen3=paths["qwen3"], vae=paths["vae"])
    if lora_path is not None:
        net = lora.create_network_from_weights(str(lora_path), unet=bundle.denoiser,
                                               text_encoders=bundle.text_encoders, family="anima", **network)
        net.apply_to()
    family = family_class("anima")(bundle, None, qwen3_max_token_length=16, t5_max_token_length=16)
    noised = family.noised(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
                           torch.Generator().manual_seed(1))
    with torch.no_grad():
        return family.predict(noised, family.encode_captions(["a photo of sks dog"], train_text_encoder=False), {})


def test_anima_lora_with_adapter_text_encoder_and_samples(tmp_path, tiny):
    paths, data = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --d 1 --s 2 --l 4.0 --n blurry\n")
    out = tmp_path / "out"
    _run(*_model(paths), "--train_data_dir", data, "--output_dir", str(out), "--output_name", "lora",
         "--resolution", "64", "--max_train_steps", "3", "--network_module", "networks.lora_anima",
         "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--seed", "1",
         "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", "--network_args",
         "train_llm_adapter=True", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
         "--gradient_checkpointing")
    path = out / "lora.safetensors"
    tensors, meta = _tensors(path)
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_blocks_1_cross_attn_output_proj" in names and "lora_unet_blocks_0_mlp_layer2" in names
    assert "lora_unet_llm_adapter_blocks_0_cross_attn_k_proj" in names
    assert "lora_te_layers_0_self_attn_q_proj" in names and not any("modulation" in n for n in names)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k and "llm_adapter" in k)
    assert meta["modelspec.architecture"] == "anima-preview/lora" and meta["ss_base_model_version"] == "anima"
    assert meta["ss_network_module"] == "networks.lora_anima" and meta["ss_timestep_sampling"] == "sigmoid"
    samples = list((out / "sample").glob("*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)
    assert np.asarray(Image.open(samples[0])).std() > 0
    assert not torch.allclose(_prediction(paths, path), _prediction(paths))


def test_anima_lora_cached_outputs_to_disk(tmp_path, tiny):
    """Qwen3 outputs and latents cached to disk in sd-scripts' files and keys with caption dropout, DiT-only LoRA,
    block swap."""
    paths, data = tiny
    out = tmp_path / "out"
    _run(*_model(paths), "--train_data_dir", data, "--output_dir", str(out), "--output_name", "cached",
         "--resolution", "64", "--max_train_steps", "2", "--network_module", "networks.lora_anima",
         "--learning_rate", "1e-2", "--seed", "2", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
         "--cache_text_encoder_outputs_to_disk", "--cache_latents", "--cache_latents_to_disk",
         "--network_train_unet_only",
         "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0", "--weighting_scheme", "cosmap",
         "--blocks_to_swap", "1", "--gradient_checkpointing",  # one frozen DiT block on the CPU between its turns
         "--caption_dropout_rate", "0.5")  # cached too (as sd-scripts' Anima): a dropped caption is "" encoded
    te = sorted(p for p in Path(data).glob("*/*_anima_te.npz"))
    assert len(te) == 13
    with np.load(te[0]) as npz:
        assert {"prompt_embeds", "attn_mask", "t5_input_ids", "t5_attn_mask", "caption_dropout_rate"} <= set(npz)
        assert npz["prompt_embeds"].shape == (16, 16) and npz["t5_input_ids"].shape == (16,)
    assert list(Path(data).glob("*/*_anima.npz"))
    tensors, meta = _tensors(out / "cached.safetensors")
    assert all(k.startswith("lora_unet_blocks_") for k in tensors)
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_discrete_flow_shift"] == "3.0"


def test_anima_full_fine_tune_with_per_part_rates(tmp_path, tiny):
    from sd_scripts.families.anima.weights import load_transformer

    paths, data = tiny
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --d 2 --s 2 --l 1\n")
    _run(*_model(paths), "--train_data_dir", data, "--output_dir", str(out), "--output_name", "ft",
         "--resolution", "64", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "3",
         "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", "--mod_lr", "0", "--llm_adapter_lr",
         "1e-3", "--save_precision", "float", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
         module="sd_scripts.anima_train")
    final = out / "ft.safetensors"
    tensors, meta = _tensors(final)
    assert "net.blocks.0.self_attn.q_proj.weight" in tensors and "net.llm_adapter.embed.weight" in tensors
    assert meta["modelspec.architecture"] == "anima-preview"
    base, _ = _tensors(paths["pretrained_model_name_or_path"])
    assert base.keys() == tensors.keys()
    changed = {k for k in base if not torch.equal(base[k], tensors[k])}
    assert "net.blocks.0.self_attn.q_proj.weight" in changed and "net.llm_adapter.blocks.0.mlp.0.weight" in changed
    assert not any("adaln_modulation" in k for k in changed)  # mod_lr 0: frozen
    tuned, _, _ = load_transformer(str(final))  # read back through our loader
    assert type(tuned).__name__ == "AnimaTransformer"
    assert len(list((out / "sample").glob("*.png"))) == 1
