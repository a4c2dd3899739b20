"""debug_dataset lists what the dataset yields and trains nothing; in_json / dataset_repeats reach the network
trainer's dataset (the fine-tune metadata JSON reader)."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.dataset_config import load_datasets
from sd_scripts.options import parse_args

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "train" / "2_sks dog"
    folder.mkdir(parents=True)
    for name, size in (("a", (64, 64)), ("b", (96, 64))):
        Image.new("RGB", size, (200, 30, 30)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a photo of sks dog", encoding="utf-8")
    return tmp_path


def test_debug_dataset_lists_every_batch_and_trains_nothing(tiny_sd1, images, capsys):
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    out = images / "out"
    args = parse_args("network", ["--pretrained_model_name_or_path", tiny_sd1.single_file, "--output_dir", str(out),
                                  "--train_data_dir", str(images / "train"), "--caption_extension", ".txt",
                                  "--resolution", "64", "--flip_aug", "--debug_dataset", "--events_file",
                                  str(out / "events.jsonl")])
    trainer = Trainer(args, NetworkMethod(args))
    assert trainer.run() == "completed"
    assert not hasattr(trainer, "bundle") and not hasattr(trainer, "optimizer")  # no model, no training
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors")]
    listing = [json.loads(line) for line in (out / "debug_dataset" / "debug_dataset.jsonl").read_text().splitlines()]
    items = [item for batch in listing for item in batch["items"]]
    assert len(listing) == 4 and len(items) == 4  # 2 images x 2 repeats, batch size 1
    by_image = {os.path.basename(i["image"]): i for i in items}
    assert by_image["a.png"]["caption"] == "a photo of sks dog" and by_image["b.png"]["caption"] == "sks dog"
    assert all(b["bucket"] == [64, 64] for b in listing)
    crops = {(os.path.basename(i["image"]), i["flipped"], tuple(i["crop_ltrb"])) for i in items}
    for name, flipped, crop in crops:  # 96x64 -> resized 96x64, centred crop 16..80 (mirrored: the same window)
        assert crop == ((16, 0, 80, 64) if name == "b.png" else (0, 0, 64, 64))
    assert os.path.isfile(out / "debug_dataset" / items[0]["png"])
    printed = capsys.readouterr().out
    assert "a.png" in printed and "caption: a photo of sks dog" in printed and "crop (16, 0, 80, 64)" in printed
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "done" and events[-1]["status"] == "completed" and events[-1]["step"] == 0


def test_in_json_and_dataset_repeats_for_the_network_trainer(images):
    meta = images / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a red dog", "tags": "red"}, "b.png": {"tags": "wide, red"}}),
                    encoding="utf-8")
    args = parse_args("network", ["--pretrained_model_name_or_path", "x", "--output_dir", "out", "--in_json",
                                  str(meta), "--train_data_dir", str(images / "train" / "2_sks dog"),
                                  "--dataset_repeats", "3", "--resolution", "64"])
    (subset,) = load_datasets(args, 64)[0].subsets
    assert subset.metadata_file == str(meta) and subset.num_repeats == 3
    ds = TrainDataset(load_datasets(args, 64), seed=0)
    assert sorted(r.caption for r in ds.records) == ["a red dog, red", "wide, red"]
    assert ds.summary().num_train_images == 6
    for trainer in ("ti", "finetune"):
        assert parse_args(trainer, ["--in_json", str(meta), "--dataset_repeats", "2"]).dataset_repeats == 2
