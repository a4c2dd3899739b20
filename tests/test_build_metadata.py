"""build_metadata: the fine-tuning JSON from caption and tag files, merged with an existing one."""
from __future__ import annotations

import json
import os

from PIL import Image

from sd_scripts.data.config_types import SubsetConfig
from sd_scripts.data.subset_images import subset_images
from sd_scripts.tools.build_metadata import build_metadata, main


def make_folder(root):
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(root / f"{name}.png")
    (root / "a.caption").write_text("a red circle\nignored second line\n")
    (root / "a.txt").write_text("red, circle\n")
    (root / "b.txt").write_text("blue, square\n")
    return root


def test_build_captions_and_tags(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    metadata, counts = build_metadata(str(folder))
    assert metadata == {"a": {"caption": "a red circle", "tags": "red, circle"}, "b": {"tags": "blue, square"}}
    assert counts == {"images": 3, "captions": 1, "tags": 2, "skipped": 1}
    full, _ = build_metadata(str(folder), full_path=True, tag_extension=None)
    assert list(full) == [os.path.abspath(folder / "a.png")]


def test_cli_merges_into_existing_json_and_the_dataset_reads_it(tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs")
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"c": {"caption": "kept from before"}, "a": {"caption": "old"}}))
    assert main(["--train_data_dir", str(folder), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["c"] == {"caption": "kept from before"}
    assert data["a"] == {"caption": "a red circle", "tags": "red, circle"}
    assert "3 entries" in capsys.readouterr().out
    images = subset_images(SubsetConfig(image_dir=str(folder), metadata_file=str(out)))
    assert [(os.path.basename(i.path), i.caption) for i in images] == [
        ("a.png", "a red circle, red, circle"), ("b.png", "blue, square"), ("c.png", "kept from before")]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--train_data_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "m.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--train_data_dir", str(tmp_path / "empty"), "--out", str(tmp_path / "m.json")]) == 1
    assert not (tmp_path / "m.json").exists()
