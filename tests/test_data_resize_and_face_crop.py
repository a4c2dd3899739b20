"""resize_interpolation (command line and dataset TOML) and face_crop_aug_range, seen in the pixels the dataset
yields."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.dataset_config import load_datasets
from sd_scripts.data.face_crop import face_crop_placement, face_from_name
from sd_scripts.options import OptionError, parse_args


def args_for(*argv):
    return parse_args("network", ["--pretrained_model_name_or_path", "x", "--output_dir", "out", *argv])


def pixels(batch, i=0) -> np.ndarray:
    """uint8 [H, W, 3] of a batch image (the dataset gives [-1, 1])."""
    return ((batch["images"][i].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


@pytest.fixture()
def noise_image(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8), "RGB").save(folder / "a.png")
    return tmp_path


def expected(path, flt, size=(107, 64)):
    """The image resized to cover 64x64 with `flt`, centre-cropped."""
    resized = np.array(Image.open(path).convert("RGB").resize(size, flt))
    left = (size[0] - 64) // 2
    return resized[:, left:left + 64]


def test_resize_interpolation_resizes_with_the_chosen_filter(noise_image, tmp_path):
    image = noise_image / "train" / "1_x" / "a.png"
    results = {}
    for name, flt in (("nearest", Image.Resampling.NEAREST), ("bilinear", Image.Resampling.BILINEAR)):
        configs = load_datasets(args_for("--train_data_dir", str(noise_image / "train"), "--resolution", "64",
                                         "--resize_interpolation", name), 64)
        got = pixels(TrainDataset(configs, seed=0)[0])
        # [-1, 1] float round trip: within one step of 8-bit
        assert np.abs(got.astype(int) - expected(image, flt).astype(int)).max() <= 1, name
        results[name] = got
    assert np.abs(results["nearest"].astype(int) - results["bilinear"].astype(int)).mean() > 5
    # a subset's own key wins over the dataset's and the command line's
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[general]\nresize_interpolation = 'nearest'\n[[datasets]]\nresolution = 64\n"
                    f"[[datasets.subsets]]\nimage_dir = '{image.parent}'\nresize_interpolation = 'bicubic'\n")
    configs = load_datasets(args_for("--dataset_config", str(toml)), 64)
    got = pixels(TrainDataset(configs, seed=0)[0])
    assert np.abs(got.astype(int) - expected(image, Image.Resampling.BICUBIC).astype(int)).max() <= 1
    with pytest.raises(OptionError, match="resize_interpolation"):
        args_for("--resize_interpolation", "magic")


def face_image(folder, name, size=(256, 256), face=(150, 100, 40, 40)):
    """A grey image with a red face box (cx, cy, w, h), named so its name tells the box."""
    cx, cy, w, h = face
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((255, 0, 0), (cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2))
    path = folder / f"{name}_{cx}_{cy}_{w}_{h}.png"
    image.save(path)
    return path


def red_box(image: np.ndarray):
    ys, xs = np.nonzero((image[..., 0] > 200) & (image[..., 1] < 60))
    return xs.mean(), ys.mean(), xs.max() - xs.min() + 1


def test_face_crop_keeps_the_face_centred_at_the_asked_size(tmp_path):
    folder = tmp_path / "train" / "1_face"
    folder.mkdir(parents=True)
    path = face_image(folder, "portrait")
    assert face_from_name(str(path)) == (150, 100, 40, 40) and face_from_name("a_b.png") is None
    configs = load_datasets(args_for("--train_data_dir", str(tmp_path / "train"), "--resolution", "64",
                                     "--face_crop_aug_range", "2.0,4.0"), 64)
    ds = TrainDataset(configs, seed=0)
    sizes = []
    for epoch in range(1, 9):
        ds.set_epoch(epoch)
        cx, cy, size = red_box(pixels(ds[0]))
        assert abs(cx - 31.5) <= 2.5 and abs(cy - 31.5) <= 2.5  # the face in the middle of the crop
        assert 64 / 4 - 1 <= size <= 64 / 2 + 1  # face between 1/4 and 1/2 of the crop side
        sizes.append(size)
    assert max(sizes) - min(sizes) >= 3  # the scale is drawn per epoch
    # the dataset TOML key (a pair of numbers) means the same
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{folder}'\n"
                    f"face_crop_aug_range = [3.0, 3.0]\n")
    (subset,) = load_datasets(args_for("--dataset_config", str(toml)), 64)[0].subsets
    assert subset.face_crop_aug_range == (3.0, 3.0)
    cx, cy, size = red_box(pixels(TrainDataset(load_datasets(args_for("--dataset_config", str(toml)), 64),
                                               seed=0)[0]))
    assert abs(size - 64 / 3) <= 1.5 and abs(cx - 31.5) <= 1.5
    # without face crop, the same image is fitted whole: the face is small and off centre
    plain = TrainDataset(load_datasets(args_for("--train_data_dir", str(tmp_path / "train"), "--resolution", "64"),
                                       64), seed=0)
    cx, cy, size = red_box(pixels(plain[0]))
    assert size <= 11 and cx > 35 and cy < 28


def test_face_crop_placement_with_random_crop_stays_inside_the_image():
    import random

    rng = random.Random(0)
    for _ in range(50):
        resized, (left, top) = face_crop_placement((256, 256), (150, 100, 40, 40), (64, 64), (2.0, 2.0), True, rng)
        assert resized == (205, 205)  # range 2..2: the face (40 px) is half the crop side: scale 0.8
        assert 0 <= left <= resized[0] - 64 and 0 <= top <= resized[1] - 64
    with pytest.raises(OptionError, match="face_crop_aug_range"):
        args_for("--face_crop_aug_range", "4,2")
