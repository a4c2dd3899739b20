"""End to end: build the metadata JSON, then a real `accelerate launch -m sd_scripts.fine_tune` on the tiny model."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import accelerate_cmd
from sd_scripts.tools.build_metadata import main as build_metadata_main
from test_train_db_e2e import TE, UNET, changed_prefixes, check_events, check_full_checkpoint, read_single_file, \
    run_trainer

pytestmark = pytest.mark.timeout(600)


def test_fine_tune_with_in_json(tmp_path, tiny_sd1):
    images = tmp_path / "images"
    images.mkdir()
    for i, (colour, name) in enumerate((((220, 40, 40), "red"), ((40, 70, 220), "blue"), ((40, 170, 60), "green"))):
        Image.new("RGB", (64, 64) if i else (96, 64), colour).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.caption").write_text(f"a {name} square\n")
        (images / f"{i:02d}.txt").write_text(f"{name}, square, plain\n")
    meta_json = tmp_path / "meta.json"
    assert build_metadata_main(["--train_data_dir", str(images), "--out", str(meta_json)]) == 0
    assert json.loads(meta_json.read_text())["01"] == {"caption": "a blue square", "tags": "blue, square, plain"}

    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd1.single_file, "--in_json", str(meta_json),
        "--train_data_dir", str(images), "--dataset_repeats", "2", "--train_text_encoder",
        "--learning_rate", "1e-4", "--learning_rate_te", "5e-5", "--output_dir", str(out), "--output_name", "ft",
        "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
        "--max_train_steps", "3", "--mixed_precision", "bf16", "--save_precision", "fp16", "--seed", "4",
        "--events_file", str(events_file), module="sd_scripts.fine_tune"))

    final = out / "ft.safetensors"
    tensors, meta = check_full_checkpoint(final, tiny_sd1.single_file)
    base, _ = read_single_file(tiny_sd1.single_file)
    assert changed_prefixes(base, tensors) >= {UNET, TE}
    assert tensors[UNET + "input_blocks.0.0.weight"].dtype == torch.float16, "save_precision fp16"
    tag_frequency = json.loads(meta["ss_tag_frequency"])["images"]
    assert tag_frequency["square"] == 3 and tag_frequency["a blue square"] == 1
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 2, "img_count": 3}}
    events = check_events(events_file, final=str(final))
    assert events[0]["trainer"] == "finetune" and events[0]["num_train_images"] == 6
