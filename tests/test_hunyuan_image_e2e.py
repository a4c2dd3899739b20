"""End to end: real `accelerate launch -m sd_scripts.hunyuan_image_train_network` runs on the tiny HunyuanImage-2.1
model (64 px, 3 steps), checked from the outside: the LoRA file's sd-scripts names and metadata, the sample image,
the cache files with sd-scripts' names and keys, and the file read back changing the DiT's output."""
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
MODULE = "sd_scripts.hunyuan_image_train_network"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd_scripts.families.hunyuan_image.tiny import build_tiny_hunyuan
    from sd_scripts.tools.tiny_model import make_demo_dataset

    root = tmp_path_factory.mktemp("hunyuan_e2e")
    paths = build_tiny_hunyuan(str(root / "model"), layout="both", blocks=(3, 4))  # 4 single blocks: swap 2
    return paths, make_demo_dataset(str(root / "data"))


def _run(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run(accelerate_cmd(*args, module=MODULE), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _common(tmp_path, data) -> list[str]:
    return ["--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--output_name", "lora",
            "--resolution", "64", "--max_train_steps", "3", "--network_module", "networks.lora_hunyuan_image",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--seed", "1",
            "--caption_extension", ".txt", "--max_data_loader_n_workers", "0"]


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_lora_from_single_files_with_samples(tmp_path, tiny):
    from sd_scripts.families import family_class
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    paths, data = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a photo of sks dog holding a sign "HI" --w 96 --h 64 --d 1 --s 2 --l 4\n')
    parts = ["--text_encoder", paths["text_encoder"], "--byt5", paths["byt5"], "--vae", paths["vae"]]
    _run("--pretrained_model_name_or_path", paths["pretrained_model_name_or_path"], *parts,
         *_common(tmp_path, data), "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
         "--timestep_sampling", "shift", "--train_batch_size", "2")  # captions of different lengths, padded
    path = tmp_path / "out" / "lora.safetensors"
    tensors, meta = _tensors(path)
    names = {k.split(".")[0] for k in tensors}
    assert len(names) == 3 * 10 + 4 * 3
    assert {"lora_unet_double_blocks_2_txt_attn_qkv", "lora_unet_single_blocks_3_linear1",
            "lora_unet_single_blocks_0_modulation_linear", "lora_unet_double_blocks_0_img_mod_linear"} <= names
    assert not any(n.startswith("lora_te") for n in names)  # sd-scripts' HunyuanImage LoRA: the DiT only
    assert all(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k)
    assert meta["modelspec.architecture"] == "hunyuan-image-2.1/lora"
    assert meta["modelspec.implementation"] == "diffusers"  # as sd-scripts' files of this family say
    assert meta["ss_base_model_version"] == "hunyuan-image-2.1"
    assert meta["ss_network_module"] == "networks.lora_hunyuan_image"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_discrete_flow_shift"] == "5.0"
    assert meta["ss_model_prediction_type"] == "raw"
    samples = list((tmp_path / "out" / "sample").glob("*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (96, 64)

    # read back through our loader: the file changes the DiT's prediction
    bundle = load_model(paths["pretrained_model_name_or_path"], text_encoder=paths["text_encoder"],
                        byt5=paths["byt5"], vae=paths["vae"])
    family = family_class(bundle.family)(bundle, None)
    noised = family.noised(torch.randn(1, 64, 2, 2), torch.Generator().manual_seed(0), timesteps=torch.tensor([600]))
    cond = family.encode_captions(["a photo of sks dog"], train_text_encoder=False)
    with torch.no_grad():
        base = family.predict(noised, cond, {})
        net = lora.create_network_from_weights(str(path), unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                               family=bundle.family)
        net.apply_to()
        tuned = family.predict(noised, cond, {})
    assert (tuned - base).abs().max() > 1e-3


def test_lora_from_the_diffusers_folder_cached_block_swap(tmp_path, tiny):
    """A HunyuanImagePipeline folder; text-encoder outputs and latents cached to disk with sd-scripts' file names and
    keys; block swap with gradient checkpointing; split_qkv (one down projection per fused part)."""
    paths, data = tiny
    _run("--pretrained_model_name_or_path", paths["diffusers"], *_common(tmp_path, data),
         "--cache_text_encoder_outputs_to_disk", "--cache_latents", "--cache_latents_to_disk", "--blocks_to_swap",
         "2", "--gradient_checkpointing", "--network_args", "split_qkv=True")
    te_files = sorted(Path(data).glob("*/*_hi_te.npz"))
    assert len(te_files) == 13 and len(list(Path(data).glob("*/*_0064x0064_hi.npz"))) >= 1
    with np.load(te_files[0]) as npz:
        assert {"vlm_embed", "vlm_mask", "byt5_embed", "byt5_mask", "ocr_mask"} <= set(npz.files)
        assert npz["vlm_embed"].shape[1] == 64 and npz["byt5_embed"].shape == (128, 32)
    tensors, _ = _tensors(tmp_path / "out" / "lora.safetensors")
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 64)  # 3 parts x rank 4
    assert tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 64)  # q, k, v, mlp
