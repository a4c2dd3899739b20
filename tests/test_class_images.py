"""Class images for DreamBooth: which folders need how many, deterministic seeds, atomic PNGs, the CLI."""
from __future__ import annotations

import hashlib
import os

import pytest
from PIL import Image

from sd_scripts.errors import DatasetError
from sd_scripts.tools.class_images import ensure_class_images, image_seed, main, plan_class_images


@pytest.fixture(scope="module")
def tiny_bundle():
    from sd_scripts.families.sd.tiny import build_tiny_bundle

    return build_tiny_bundle("sd1", seed=0)


def make_reg(root, existing: int = 1):
    folder = root / "1_dog"
    folder.mkdir(parents=True)
    for i in range(existing):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"own_{i}.png")
    (root / "not a concept").mkdir()
    return folder


def digest(path) -> str:
    return hashlib.sha256(Image.open(path).tobytes()).hexdigest()


def test_plan_counts_missing_images(tmp_path):
    make_reg(tmp_path, existing=2)
    (tmp_path / "3_cat").mkdir()
    plan = plan_class_images(str(tmp_path), 3, None)
    assert [(os.path.basename(f.path), f.prompt, f.existing, f.missing) for f in plan] == [
        ("1_dog", "dog", 2, 1), ("3_cat", "cat", 0, 3)]
    assert {f.prompt for f in plan_class_images(str(tmp_path), 3, "a photo of a pet")} == {"a photo of a pet"}
    with pytest.raises(DatasetError, match="1_dog"):
        plan_class_images(str(tmp_path / "not a concept"), 3)


def test_seeds_are_stable_and_distinct():
    assert image_seed(0, "/a/1_dog", 3) == image_seed(0, "/other/1_dog/", 3)
    assert len({image_seed(0, "1_dog", i) for i in range(50)}) == 50
    assert image_seed(1, "1_dog", 0) != image_seed(0, "1_dog", 0)


def test_generates_only_the_missing_images_deterministically(tmp_path, tiny_bundle):
    runs = []
    for name in ("a", "b"):
        folder = make_reg(tmp_path / name, existing=1)
        paths = ensure_class_images(tiny_bundle, str(folder.parent), 3, resolution=(64, 64), steps=2, seed=5)
        assert [os.path.basename(p) for p in paths] == ["class_00001.png", "class_00002.png"]
        assert sorted(os.listdir(folder)) == ["class_00001.png", "class_00002.png", "own_0.png"], "no temp files"
        assert Image.open(paths[0]).size == (64, 64)
        runs.append([digest(p) for p in paths])
        assert ensure_class_images(tiny_bundle, str(folder.parent), 3, steps=2) == [], "enough images: nothing to do"
    assert runs[0] == runs[1], "same seed, same images"
    assert runs[0][0] != runs[0][1]


def test_cli(tmp_path, tiny_root, tiny_sd1, capsys):
    folder = make_reg(tmp_path / "reg", existing=0)
    argv = ["--pretrained_model_name_or_path", tiny_sd1.single_file, "--reg_data_dir", str(folder.parent),
            "--num_class_images", "1", "--resolution", "64", "--steps", "2"]
    assert main(argv) == 0
    assert os.listdir(folder) == ["class_00000.png"]
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    assert main(argv[:3] + [str(tmp_path / "missing"), "--num_class_images", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err
