"""End to end on the tiny SDXL: real `accelerate launch -m sd_scripts.train_db` and `-m sd_scripts.fine_tune` runs
that train the U-Net and both text encoders and save single-file SDXL checkpoints, checked from the outside (our
loader and diffusers' StableDiffusionXLPipeline.from_single_file)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from conftest import accelerate_cmd
from sd_scripts.tools.build_metadata import main as build_metadata_main
from test_train_db_e2e import check_events, read_single_file, run_trainer

pytestmark = pytest.mark.timeout(600)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TE1, TE2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


@pytest.fixture(scope="session")
def tiny_sdxl_full(tiny_root):
    from sd_scripts.tools.tiny_model import build_tiny_model

    return build_tiny_model(str(tiny_root / "sdxl_full"), family="sdxl", layout="single", seed=0)


def changed_parts(base: dict, trained: dict) -> set[str]:
    """The parts with a tensor that differs from the base (cast like the saved file, for save_precision)."""
    return {p for p in (UNET, TE1, TE2, VAE) for k in base
            if k.startswith(p) and not torch.equal(base[k].to(trained[k].dtype), trained[k])}


def check_sdxl_checkpoint(path, base_path) -> tuple[dict, dict, set[str]]:
    """The saved file has the base file's keys, loads with our loader and with diffusers' from_single_file (same
    weights), and carries the SDXL checkpoint metadata. Returns (tensors, metadata, changed parts)."""
    from diffusers import StableDiffusionXLPipeline

    from sd_scripts.models.loading import load_model
    from sd_scripts.families.sd.saving import diffusers_config_dir

    base, _ = read_single_file(base_path)
    tensors, meta = read_single_file(path)
    assert set(tensors) == set(base)
    bundle = load_model(str(path))
    assert bundle.family == "sdxl" and bundle.text_encoder_2 is not None
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=diffusers_config_dir("sdxl", False,
                                                                                            bundle=bundle),
                                                      local_files_only=True)
    for theirs, ours in ((pipe.unet, bundle.unet), (pipe.text_encoder, bundle.text_encoder),
                         (pipe.text_encoder_2, bundle.text_encoder_2)):
        mine, loaded = ours.state_dict(), theirs.state_dict()
        shared = [k for k in loaded if k in mine]
        assert len(shared) >= len(mine) - 2, "diffusers loaded the same modules"
        for key in shared:
            torch.testing.assert_close(loaded[key].float(), mine[key].float())
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and "ss_network_module" not in meta
    return tensors, meta, changed_parts(base, tensors)


def test_dreambooth_sdxl_with_class_images_and_text_encoders(tmp_path, tiny_sdxl_full):
    data = tmp_path / "img" / "1_sks dog"
    data.mkdir(parents=True)
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of sks dog, {'red' if i == 0 else 'green'}\n")
    reg = tmp_path / "reg" / "1_dog"
    reg.mkdir(parents=True)
    Image.new("RGB", (64, 64), (120, 90, 60)).save(reg / "own.png")
    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sdxl_full.single_file, "--train_data_dir", str(data.parent),
        "--reg_data_dir", str(reg.parent), "--num_class_images", "2", "--class_prompt", "a photo of a dog",
        "--output_dir", str(out), "--output_name", "dbxl", "--resolution", "64", "--caption_extension", ".txt",
        "--learning_rate", "1e-4", "--max_train_steps", "2", "--stop_text_encoder_training", "1",
        "--gradient_checkpointing", "--seed", "1", "--events_file", str(events_file), module="sd_scripts.train_db"))

    assert sorted(os.listdir(reg)) == ["class_00001.png", "own.png"], "one class image from the SDXL pipeline"
    assert Image.open(reg / "class_00001.png").size == (64, 64)
    final = out / "dbxl.safetensors"
    _, meta, changed = check_sdxl_checkpoint(final, tiny_sdxl_full.single_file)
    assert changed == {UNET, TE1, TE2}, "U-Net and both text encoders trained (first step), VAE untouched"
    assert meta["ss_steps"] == "2" and meta["ss_stop_text_encoder_training"] == "1"
    events = check_events(events_file, final=str(final))
    assert events[0]["trainer"] == "dreambooth" and events[0]["model_family"] == "sdxl"
    assert events[0]["num_reg_images"] == 2


def test_fine_tune_sdxl_with_in_json_and_buckets(tmp_path, tiny_sdxl_full):
    images = tmp_path / "images"
    images.mkdir()
    for i, (colour, name) in enumerate((((220, 40, 40), "red"), ((40, 70, 220), "blue"))):
        Image.new("RGB", (96, 64) if i else (64, 64), colour).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.caption").write_text(f"a {name} square\n")
    meta_json = tmp_path / "meta.json"
    assert build_metadata_main(["--train_data_dir", str(images), "--out", str(meta_json)]) == 0
    assert json.loads(meta_json.read_text())["01"]["caption"] == "a blue square"

    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sdxl_full.single_file, "--in_json", str(meta_json),
        "--train_data_dir", str(images), "--train_text_encoder", "--learning_rate", "1e-3",
        "--learning_rate_te", "5e-4", "--output_dir", str(out), "--output_name", "ftxl", "--resolution", "64",
        "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
        "--max_train_steps", "2", "--save_precision", "fp16", "--seed", "4", "--events_file", str(events_file),
        module="sd_scripts.fine_tune"))

    final = out / "ftxl.safetensors"
    tensors, meta, changed = check_sdxl_checkpoint(final, tiny_sdxl_full.single_file)
    assert changed == {UNET, TE1, TE2}, "U-Net and both text encoders trained, VAE untouched"
    assert tensors[UNET + "input_blocks.0.0.weight"].dtype == torch.float16, "save_precision fp16"
    assert meta["ss_train_text_encoder"] == "True"
    events = check_events(events_file, final=str(final))
    assert events[0]["trainer"] == "finetune" and events[0]["model_family"] == "sdxl"
