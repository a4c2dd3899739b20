"""End to end: real `accelerate launch -m sd_scripts.lumina_train_network` / `lumina_train` runs on the tiny Lumina
Image 2.0 model (64 px, a few steps), checked from the outside: files, samples, metadata, diffusers' Lumina2Pipeline
reading the LoRA (through lora_files' converter) and the fine-tuned file read back."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO, accelerate_cmd, subprocess_env

pytestmark = pytest.mark.timeout(600)


def _run(*args, module="sd_scripts.lumina_train_network", expect_ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(accelerate_cmd(*args, module=module), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _parts(tiny) -> list[str]:
    return ["--gemma2", tiny["gemma2"], "--ae", tiny["ae"]]


def _common(tmp_path, data, steps=3) -> list[str]:
    return ["--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--output_name", "lora",
            "--resolution", "64", "--max_train_steps", str(steps), "--network_module", "networks.lora_lumina",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--seed", "1",
            "--caption_extension", ".txt", "--gemma2_max_token_length", "32", "--max_data_loader_n_workers", "0"]


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_lumina_lora_with_samples_and_gemma_lora(tmp_path, tiny_lumina, demo_data):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --d 1 --s 2 --l 2.0 --n blurry\n")
    _run("--pretrained_model_name_or_path", tiny_lumina["transformer"], *_parts(tiny_lumina),
         *_common(tmp_path, demo_data), "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
         "--system_prompt", "You are an assistant designed to generate superior images.")
    tensors, meta = _tensors(tmp_path / "out" / "lora.safetensors")
    names = {k.split(".")[0] for k in tensors}
    assert {"lora_unet_layers_1_attention_qkv", "lora_unet_noise_refiner_0_adaLN_modulation_1",
            "lora_unet_context_refiner_0_feed_forward_w2", "lora_unet_final_layer_linear",
            "lora_te_layers_0_self_attn_q_proj"} <= names
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k and "unet" in k)
    assert meta["modelspec.architecture"] == "lumina-2/lora" and meta["ss_base_model_version"] == "lumina2"
    assert meta["modelspec.implementation"] == "https://github.com/Alpha-VLLM/Lumina-Image-2.0"
    assert meta["ss_network_module"] == "networks.lora_lumina"
    assert (meta["ss_timestep_sampling"], meta["ss_model_prediction_type"], meta["ss_discrete_flow_shift"]) == \
        ("shift", "raw", "6.0")  # sd-scripts' Lumina defaults, written as it writes them
    assert meta["ss_gemma2_max_token_length"] == "32"
    samples = list((tmp_path / "out" / "sample").glob("*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_lumina_lora_from_folder_loads_in_diffusers(tmp_path, tiny_lumina, demo_data):
    """Gemma outputs cached to disk (sd-scripts' _lumina_te.npz keys); the converted file loads in Lumina2Pipeline,
    changes the image, and diffusers' transformer with it predicts what ours does with the file applied."""
    import numpy as np
    from diffusers import Lumina2Pipeline
    from safetensors.torch import load_file

    from sd_scripts.families import family_class
    from sd_scripts.families.lumina import lora_files
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    folder = tiny_lumina["diffusers_dir"]
    _run("--pretrained_model_name_or_path", folder, *_common(tmp_path, demo_data, steps=4),
         "--cache_text_encoder_outputs_to_disk", "--cache_latents", "--network_train_unet_only",
         "--timestep_sampling", "nextdit_shift", "--network_args", "embedder_dims=[2,2,2]")
    caches = list(Path(demo_data).glob("*/*_lumina_te.npz"))
    assert len(caches) == 13 and set(np.load(caches[0]).files) >= {"hidden_state", "attention_mask", "input_ids"}
    path = tmp_path / "out" / "lora.safetensors"
    tensors, meta = _tensors(path)
    assert all(k.startswith("lora_unet_") for k in tensors) and meta["ss_timestep_sampling"] == "nextdit_shift"
    assert "lora_unet_t_embedder_mlp_0.lora_down.weight" in tensors and "lora_unet_x_embedder.alpha" in tensors
    converted = tmp_path / "diffusers_lora.safetensors"
    assert lora_files.main(["--lora", str(path), "--model", folder, "--out", str(converted)]) == 0

    pipe = Lumina2Pipeline.from_pretrained(folder, local_files_only=True)

    def image():
        return pipe("a photo of sks dog", width=64, height=64, num_inference_steps=2, guidance_scale=1.0,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(3), output_type="pt").images

    before = image()
    pipe.load_lora_weights(str(converted))
    assert (image() - before).abs().max() > 1e-3
    assert len(load_file(str(converted))) == 2 * sum(3 if "qkv" in k else 1 for k in tensors if "lora_down" in k)
    bundle = load_model(folder)
    net = lora.create_network_from_weights(str(path), unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                           family="lumina")
    net.apply_to()
    family = family_class("lumina")(bundle, None, gemma2_max_token_length=32)
    noised = family.noised(torch.randn(1, 16, 8, 8), torch.Generator().manual_seed(0))
    cond = family.encode_captions(["a photo"], train_text_encoder=False)
    with torch.no_grad():
        ours = family.predict(noised, cond, {})
        bundle.denoiser = pipe.transformer
        theirs = family.predict(noised, cond, {})
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_lumina_full_fine_tune_saves_the_sd_scripts_file(tmp_path, tiny_lumina, demo_data, capsys):
    from sd_scripts import lumina_train_network, train_network
    from sd_scripts.families.lumina.weights import load_transformer

    out = tmp_path / "out"
    _run("--pretrained_model_name_or_path", tiny_lumina["transformer"], *_parts(tiny_lumina),
         "--train_data_dir", demo_data, "--output_dir", str(out), "--output_name", "ft", "--resolution", "64",
         "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "2", "--caption_extension", ".txt",
         "--gemma2_max_token_length", "32", "--save_precision", "float", "--max_data_loader_n_workers", "0",
         "--gradient_checkpointing", module="sd_scripts.lumina_train")
    tensors, meta = _tensors(out / "ft.safetensors")
    assert "layers.0.attention.qkv.weight" in tensors and "norm_final.weight" in tensors
    assert not any(k.startswith("model.") for k in tensors)  # bare keys, as sd-scripts' lumina_train saves
    assert meta["modelspec.architecture"] == "lumina-2"
    base, tuned = load_transformer(tiny_lumina["transformer"]), load_transformer(str(out / "ft.safetensors"))
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any("layers.0.attn.to_q" in k for k in changed)
    # another family's option, the generic script: one-line errors
    common = ["--pretrained_model_name_or_path", tiny_lumina["transformer"], *_parts(tiny_lumina),
              "--train_data_dir", demo_data, "--output_dir", str(tmp_path / "o")]
    assert lumina_train_network.main([*common, "--v_parameterization"]) == 1
    assert "'v_parameterization'" in capsys.readouterr().err
    assert train_network.main(common) == 1
    assert "lumina_train_network" in capsys.readouterr().err
