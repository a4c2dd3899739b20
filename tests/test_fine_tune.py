"""Fine-tuning units: datasets from --in_json + --train_data_dir + --dataset_repeats, and the bundled presets.
The end-to-end run is in test_fine_tune_e2e.py."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.dataset_config import load_datasets
from sd_scripts.errors import DatasetError
from sd_scripts.options import parse_args
from sd_scripts.training.full_methods import FineTuneMethod
from test_train_db import check_bundled_presets


def ft_args(*extra: str):
    return parse_args("finetune", ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "out",
                                   "--resolution", "64", *extra])


def test_in_json_dataset_with_repeats(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (1, 2, 3)).save(images / f"{name}.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a cat", "tags": "cat, indoor"}, "b": {"tags": "dog"},
                                "missing": {"caption": "no such image"}}))
    args = ft_args("--in_json", str(meta), "--train_data_dir", str(images), "--dataset_repeats", "3")
    configs = load_datasets(args, bucket_step_default=64)
    assert len(configs) == 1 and len(configs[0].subsets) == 1
    subset = configs[0].subsets[0]
    assert subset.metadata_file == str(meta) and subset.num_repeats == 3 and not subset.is_reg
    dataset = TrainDataset(configs, seed=0)
    assert dataset.summary().num_train_images == 6
    assert sorted(r.caption for r in dataset.records) == ["a cat, cat, indoor", "dog"]


def test_in_json_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="build_metadata"):
        load_datasets(ft_args("--in_json", str(tmp_path / "nope.json"), "--train_data_dir", str(tmp_path)), 64)


def test_bundled_finetune_presets(tmp_path):
    names = check_bundled_presets("finetune", "finetune", FineTuneMethod, tmp_path, in_json="meta.json")
    assert {"SD1.5 fine-tune", "SD1.5 fine-tune, low VRAM", "Demo (tiny model, CPU)"} <= set(names)
