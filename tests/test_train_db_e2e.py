"""End to end: real `accelerate launch -m sd_scripts.train_db` runs on the tiny SD1 model, checked from the outside."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO, accelerate_cmd, subprocess_env
from sd_scripts.training.events import read_events

pytestmark = pytest.mark.timeout(600)

UNET, TE, VAE = "model.diffusion_model.", "cond_stage_model.", "first_stage_model."


def run_trainer(cmd, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_single_file(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def changed_prefixes(base: dict, trained: dict) -> set[str]:
    return {p for p in (UNET, TE, VAE) for k in base if k.startswith(p) and not torch.equal(base[k], trained[k])}


def check_full_checkpoint(path, base_path) -> tuple[dict, dict]:
    """The saved file has the base file's keys, loads with our loader and with diffusers' from_single_file, and its
    U-Net differs from the base. Returns (tensors, metadata)."""
    from diffusers import StableDiffusionPipeline

    from sd_scripts.families.sd.loading import diffusers_config_dir, load_model

    base, _ = read_single_file(base_path)
    tensors, meta = read_single_file(path)
    assert set(tensors) == set(base)
    assert UNET in changed_prefixes(base, tensors)
    bundle = load_model(str(path))
    assert bundle.family == "sd1"
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=diffusers_config_dir(bundle.family, bundle.v_prediction, bundle=bundle),
        local_files_only=True, safety_checker=None, requires_safety_checker=False)
    key = "conv_in.weight"
    torch.testing.assert_close(pipe.unet.state_dict()[key].float(), bundle.unet.state_dict()[key].float())
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert {"modelspec.title", "modelspec.resolution", "modelspec.date", "modelspec.prediction_type"} <= set(meta)
    assert "ss_network_module" not in meta and meta["ss_base_model_version"] == "sd_v1"
    return tensors, meta


def check_events(events_file, *, final: str) -> list[dict]:
    events = read_events(str(events_file))
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and events[-1]["status"] == "completed"
    assert "progress" in types
    saves = [e for e in events if e["type"] == "save"]
    assert saves[-1]["kind"] == "final" and saves[-1]["path"] == final and final in events[-1]["outputs"]
    return events


def test_dreambooth_with_generated_class_images(tmp_path, tiny_sd1, demo_data):
    reg = tmp_path / "reg" / "1_dog"
    reg.mkdir(parents=True)
    Image.new("RGB", (64, 64), (120, 90, 60)).save(reg / "own.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog on grass --w 64 --h 64 --s 2 --d 3\n")
    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", demo_data,
        "--reg_data_dir", str(reg.parent), "--num_class_images", "2", "--class_prompt", "a photo of a dog",
        "--prior_loss_weight", "0.5", "--output_dir", str(out), "--output_name", "db", "--resolution", "64",
        "--caption_extension", ".txt", "--learning_rate", "1e-4", "--max_train_steps", "4",
        "--stop_text_encoder_training", "2", "--use_ema", "--ema_decay", "0.9", "--save_every_n_steps", "2",
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--seed", "1",
        "--events_file", str(events_file), module="sd_scripts.train_db"))

    assert sorted(os.listdir(reg)) == ["class_00001.png", "own.png"], "one class image generated, atomically"
    final = out / "db.safetensors"
    tensors, meta = check_full_checkpoint(final, tiny_sd1.single_file)
    base, _ = read_single_file(tiny_sd1.single_file)
    assert changed_prefixes(base, tensors) == {UNET, TE}, "U-Net and text encoder trained, VAE untouched"
    assert meta["ss_steps"] == "4" and meta["ss_use_ema"] == "True" and meta["ss_prior_loss_weight"] == "0.5"
    assert (out / "db-step00000002.safetensors").is_file()
    events = check_events(events_file, final=str(final))
    assert events[0]["trainer"] == "dreambooth" and events[0]["num_reg_images"] == 2
    samples = [p for e in events if e["type"] == "sample" for p in e["paths"]]
    assert len(samples) == 1 and os.path.isfile(samples[0])


def test_dreambooth_diffusers_folders_per_epoch_with_fused_backward(tmp_path, tiny_sd1):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    data = tmp_path / "img" / "1_sks"
    data.mkdir(parents=True)
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd1.diffusers_dir, "--train_data_dir", str(data.parent),
        "--output_dir", str(out), "--output_name", "db", "--resolution", "64", "--learning_rate", "1e-4",
        "--max_train_epochs", "2", "--save_every_n_epochs", "1", "--save_model_as", "diffusers_safetensors",
        "--fused_backward_pass", "--cache_latents", "--seed", "2", "--events_file", str(events_file),
        module="sd_scripts.train_db"))

    assert (out / "db-000001" / "model_index.json").is_file(), "per-epoch folder, named like every save"
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "db"), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    base = UNet2DConditionModel.from_pretrained(tiny_sd1.diffusers_dir, subfolder="unet", local_files_only=True)
    trained = pipe.unet.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in base.state_dict().items())
    events = check_events(events_file, final=str(out / "db"))
    assert events[-1]["step"] == 4 and {e["kind"] for e in events if e["type"] == "save"} == {"epoch", "final"}
