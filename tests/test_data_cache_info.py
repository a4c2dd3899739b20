"""cache_info: image sizes and captions kept in `<image_dir>/metadata_cache.json` in sd-scripts' layout, trusted only
while the image and caption files are unchanged."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from sd_scripts.data import subset_images as si
from sd_scripts.data.dataset_config import load_datasets
from sd_scripts.options import parse_args


def subset_for(root, *extra):
    args = parse_args("network", ["--pretrained_model_name_or_path", "x", "--output_dir", "out", "--train_data_dir",
                                  str(root), "--caption_extension", ".txt", *extra])
    return load_datasets(args, 64)[0].subsets[0]


def test_cache_info_writes_sd_scripts_layout_and_is_reused_until_a_file_changes(tmp_path, monkeypatch):
    folder = tmp_path / "2_cat"
    folder.mkdir()
    for name, size in (("a", (64, 96)), ("b", (80, 64))):
        Image.new("RGB", size).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("a cat", encoding="utf-8")
    subset = subset_for(tmp_path, "--cache_info")
    assert subset.cache_info
    first = si.subset_images(subset)
    data = json.loads((folder / "metadata_cache.json").read_text(encoding="utf-8"))
    assert data[str(folder / "a.png")]["caption"] == "a cat" and data[str(folder / "a.png")]["resolution"] == [64, 96]
    assert data[str(folder / "b.png")] == {**data[str(folder / "b.png")], "caption": "cat", "resolution": [80, 64]}

    reads = []
    real = si.read_image_size
    monkeypatch.setattr(si, "read_image_size", lambda p: reads.append(os.path.basename(p)) or real(p))
    assert si.subset_images(subset) == first and reads == []  # all from the cache
    (folder / "a.txt").write_text("a black cat", encoding="utf-8")
    os.utime(folder / "a.txt", ns=(1, 1))  # a different mtime than the cached one, whatever the clock says
    Image.new("RGB", (96, 64)).save(folder / "b.png")
    again = {img.path: img for img in si.subset_images(subset)}
    assert reads == ["a.png", "b.png"]
    assert again[str(folder / "a.png")].caption == "a black cat" and again[str(folder / "b.png")].size == (96, 64)
    # without cache_info nothing is written or read
    os.remove(folder / "metadata_cache.json")
    si.subset_images(subset_for(tmp_path))
    assert not (folder / "metadata_cache.json").exists()
