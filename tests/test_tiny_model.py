"""Tiny test models: deterministic bytes, loadable by diffusers offline, fast to run; the demo dataset layout."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from sd_scripts.tools.tiny_model import build_tiny_model, make_demo_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = build_tiny_model(str(tmp_path / "a"), "sd2", layout="both", seed=3)
    b = build_tiny_model(str(tmp_path / "b"), "sd2", layout="single", seed=3)
    c = build_tiny_model(str(tmp_path / "c"), "sd2", layout="single", seed=4)
    assert b.diffusers_dir is None
    assert _digest(a.single_file) == _digest(b.single_file) != _digest(c.single_file)
    weights = os.path.join(a.diffusers_dir, "unet", "diffusion_pytorch_model.safetensors")
    again = build_tiny_model(str(tmp_path / "d"), "sd2", layout="diffusers", seed=3)
    assert _digest(weights) == _digest(os.path.join(again.diffusers_dir, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("family,v", [("sd1", False), ("sd2", True)])
def test_diffusers_pipeline_loads_and_runs(tmp_path, family, v):
    from diffusers import StableDiffusionPipeline

    paths = build_tiny_model(str(tmp_path), family, v, layout="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(paths.diffusers_dir, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if v else "epsilon")
    assert pipe.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    if family == "sd2":
        assert pipe.unet.config.use_linear_projection and list(pipe.unet.config.attention_head_dim) == [2, 4]
        assert pipe.text_encoder.config.hidden_act == "gelu"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_training_step_updates_every_unet_weight(tmp_path):
    from sd_scripts.models.loading import load_model

    bundle = load_model(build_tiny_model(str(tmp_path), "sd1", layout="single").single_file)
    unet = bundle.unet.train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    latents, cond = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 32)
    loss = torch.nn.functional.mse_loss(unet(latents, torch.tensor([10, 500]), cond).sample, latents)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_demo_dataset(tmp_path):
    train = make_demo_dataset(str(tmp_path))
    assert sorted(os.listdir(train)) == ["10_sks dog", "5_ohwx cat"]
    sizes = set()
    for folder in os.listdir(train):
        files = os.listdir(os.path.join(train, folder))
        pngs = [f for f in files if f.endswith(".png")]
        captions = [f for f in files if f.endswith(".txt")]
        assert 6 <= len(pngs) <= 8 and len(captions) == len(pngs) - 1
        for png in pngs:
            with Image.open(os.path.join(train, folder, png)) as im:
                sizes.add(im.size)
        token = folder.split("_", 1)[1]
        with open(os.path.join(train, folder, captions[0]), encoding="utf-8") as f:
            assert token in f.read()
    assert {(64, 64), (96, 64), (64, 96)} <= sizes
    assert _digest(os.path.join(train, "10_sks dog", "00.png")) == _digest(
        os.path.join(make_demo_dataset(str(tmp_path / "again")), "10_sks dog", "00.png"))


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sd_scripts.tools.tiny_model", "--family", "sd2-v", "--out",
                          str(tmp_path / "m"), "--layout", "single", "--dataset", str(tmp_path / "d")],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert os.path.isfile(tmp_path / "m" / "tiny-sd2-v.safetensors")
    assert os.path.isdir(tmp_path / "d" / "train" / "5_ohwx cat")
    assert "tiny-sd2-v.safetensors" in out


def test_sdxl_pipeline_loads_and_runs(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    paths = build_tiny_model(str(tmp_path), "sdxl", layout="diffusers")
    pipe = StableDiffusionXLPipeline.from_pretrained(paths.diffusers_dir, local_files_only=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and list(unet.transformer_layers_per_block) == [1, 2]
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + \
        pipe.text_encoder_2.config.projection_dim
    assert pipe.text_encoder.config.hidden_act == "quick_gelu" and pipe.text_encoder_2.config.hidden_act == "gelu"
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token_id == 0
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_sdxl_training_step_updates_every_unet_weight(tmp_path):
    from sd_scripts.models.loading import load_model

    paths = build_tiny_model(str(tmp_path), "sdxl", layout="single", seed=1)
    again = build_tiny_model(str(tmp_path / "again"), "sdxl", layout="single", seed=1)
    assert _digest(paths.single_file) == _digest(again.single_file)
    bundle = load_model(paths.single_file)
    unet = bundle.unet.train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ids = [tok(["a dog", "x"], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in bundle.tokenizers]
    with torch.no_grad():
        out1 = bundle.text_encoder(ids[0], output_hidden_states=True)
        out2 = bundle.text_encoder_2(ids[1], output_hidden_states=True)
    cond = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    added = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    latents = torch.randn(2, 4, 8, 8)
    pred = unet(latents, torch.tensor([10, 500]), cond, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred, latents)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_cli_sdxl(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sd_scripts.tools.tiny_model", "--family", "sdxl", "--out",
                          str(tmp_path), "--layout", "diffusers"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert os.path.isfile(tmp_path / "tiny-sdxl" / "text_encoder_2" / "model.safetensors")
    assert "diffusers folder" in out and "tiny-sdxl" in out
