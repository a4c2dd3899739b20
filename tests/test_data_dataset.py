"""TrainDataset: repeats, regularisation balancing, bucketed batches, epoch order, captions and batch contents."""
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts.data.batching import balance_reg_repeats
from sd_scripts.data.captions import CaptionOptions
from sd_scripts.data.config_types import DatasetConfig, SubsetConfig
from sd_scripts.data.dataset import TrainDataset, make_data_loader


def images(folder, sizes, captions=None):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
        if captions:
            with open(os.path.join(folder, f"{i}.txt"), "w", encoding="utf-8") as f:
                f.write(captions[i])
    return folder


@pytest.mark.parametrize("reg_repeats,train_draws,expected", [
    ([1, 1, 1], 2, [1, 1, 0]),  # surplus reg image unused
    ([2, 2], 3, [2, 2]),
    ([1], 5, [5]),
    ([1, 1], 5, [3, 2]),  # round-robin after the first pass
    ([3, 1], 0, [0, 0]),
    ([], 4, []),
    ([1, 1, 1], 10, [4, 3, 3]),
])
def test_balance_reg_repeats(reg_repeats, train_draws, expected):
    assert balance_reg_repeats(reg_repeats, train_draws) == expected
    if reg_repeats and train_draws:
        assert sum(expected) >= train_draws


def test_reg_balancing_counts_and_loss_weights(tmp_path):
    train = SubsetConfig(images(str(tmp_path / "5_dog"), [(64, 64)] * 2), num_repeats=5, class_tokens="sks dog")
    reg = SubsetConfig(images(str(tmp_path / "1_dog"), [(64, 64)] * 3), num_repeats=1, class_tokens="dog",
                       is_reg=True)
    ds = TrainDataset([DatasetConfig(resolution=(64, 64), batch_size=4, subsets=[train, reg])], seed=0,
                      prior_loss_weight=0.5)
    draws = Counter(ds.records[i].path for i in ds.draws[0])
    assert [draws[os.path.join(train.image_dir, f"{i}.png")] for i in range(2)] == [5, 5]
    assert [draws[os.path.join(reg.image_dir, f"{i}.png")] for i in range(3)] == [4, 3, 3]
    assert len(ds) == 5  # 20 draws of one bucket, 4 per batch
    summary = ds.summary()
    assert (summary.num_train_images, summary.num_reg_images) == (10, 3)
    assert summary.dataset_dirs == {"5_dog": {"n_repeats": 5, "img_count": 2},
                                    "1_dog": {"n_repeats": 1, "img_count": 3}}
    assert summary.tag_frequency == {"5_dog": {"sks dog": 2}, "1_dog": {"dog": 3}}
    weights = torch.cat([ds[i]["loss_weights"] for i in range(len(ds))])
    assert sorted(weights.tolist()) == [0.5] * 10 + [1.0] * 10


def bucketed(tmp_path, batch_size=2, **subset_kw):
    folder = images(str(tmp_path / "3_x"), [(64, 64), (64, 64), (150, 50), (50, 150), (140, 50)],
                    captions=["a, b, c"] * 5)
    subset = SubsetConfig(folder, num_repeats=3, class_tokens="x", caption_extension=".txt", **subset_kw)
    config = DatasetConfig(resolution=(64, 64), batch_size=batch_size, enable_bucket=True, min_bucket_reso=32,
                           max_bucket_reso=128, bucket_reso_steps=32, subsets=[subset])
    return config


def test_batches_are_single_bucket_and_cover_every_draw(tmp_path):
    ds = TrainDataset([bucketed(tmp_path)], seed=3)
    # buckets 32x96, 32x128, 64x64, 96x32, 128x32: 64x64 x6 draws -> 3 batches; 96x32 x6 -> 3; 32x96 x3 -> 2
    assert len(ds) == len(ds.batch_plan(1)) == 8
    seen = Counter()
    for i in range(len(ds)):
        batch = ds[i]
        assert len(set(batch["target_sizes_hw"])) == 1
        h, w = batch["target_sizes_hw"][0]
        assert batch["images"].shape[1:] == (3, h, w) and batch["images"].dtype == torch.float32
        assert float(batch["images"].min()) >= -1 and float(batch["images"].max()) <= 1
        seen.update(batch["image_paths"])
    assert set(seen.values()) == {3} and len(seen) == 5


def test_epoch_order_is_deterministic_and_changes(tmp_path):
    config = bucketed(tmp_path)
    a, b = TrainDataset([config], seed=7), TrainDataset([config], seed=7)
    assert a.batch_plan(1) == b.batch_plan(1)
    assert a.batch_plan(1) != a.batch_plan(2)
    a.set_epoch(2)
    assert a[0]["image_paths"] == [a.records[i].path for i in a.batch_plan(2)[0]]


def test_batch_fields(tmp_path):
    folder = images(str(tmp_path / "1_x"), [(300, 100)], captions=["tag1, tag2"])
    subset = SubsetConfig(folder, caption_extension=".txt", caption=CaptionOptions(prefix="pre"))
    ds = TrainDataset([DatasetConfig(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                                     bucket_reso_steps=32, network_multiplier=0.7, subsets=[subset])], seed=0)
    batch = ds[0]
    assert batch["captions"] == ["pre tag1, tag2"]
    assert batch["original_sizes_hw"] == [(100, 300)]
    assert batch["target_sizes_hw"] == [(32, 96)]
    assert batch["crop_top_lefts"] == [(0, 0)]
    assert torch.allclose(batch["network_multipliers"], torch.tensor([0.7]))
    assert "loss_masks" not in batch


def test_flip_aug_mirrors_pixels_and_crop(tmp_path):
    folder = str(tmp_path / "1_x")
    os.makedirs(folder)
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, 16:26] = 255  # white band at the left edge of the centred 64x64 crop
    Image.fromarray(pixels).save(os.path.join(folder, "a.png"))
    subset = SubsetConfig(folder, flip_aug=True, num_repeats=40)
    ds = TrainDataset([DatasetConfig(resolution=(64, 64), batch_size=1, subsets=[subset])], seed=0)
    lefts = set()
    for i in range(len(ds)):
        batch = ds[i]
        img = batch["images"][0]
        left_white = bool(img[:, 0, 0].mean() > 0)
        assert bool(img[:, 0, -1].mean() > 0) != left_white
        lefts.add((left_white, batch["crop_top_lefts"][0]))
    assert lefts == {(False, (0, 16)), (True, (0, 16))}  # both orientations seen; 96->64 crop is centred


def test_step_reaches_data_loader_workers(tmp_path):
    folder = images(str(tmp_path / "1_x"), [(64, 64)] * 2, captions=["k, a, b, c, d, e"] * 2)
    subset = SubsetConfig(folder, caption_extension=".txt",
                          caption=CaptionOptions(keep_tokens=1, token_warmup_step=10, token_warmup_min=1))
    ds = TrainDataset([DatasetConfig(resolution=(64, 64), batch_size=2, subsets=[subset])], seed=0)
    loader = make_data_loader(ds, num_workers=1, persistent_workers=True)
    (batch,) = list(loader)
    assert batch["captions"] == ["k, a", "k, a"]
    ds.set_step(100)
    ds.set_epoch(2)
    (batch,) = list(loader)
    assert [len(c.split(", ")) for c in batch["captions"]] == [6, 6]


def test_alpha_mask_batches(tmp_path):
    folder = str(tmp_path / "1_x")
    os.makedirs(folder)
    Image.new("RGBA", (64, 64), (1, 2, 3, 0)).save(os.path.join(folder, "a.png"))
    subset = SubsetConfig(folder, alpha_mask=True)
    ds = TrainDataset([DatasetConfig(resolution=(64, 64), subsets=[subset])], seed=0)
    batch = ds[0]
    assert batch["loss_masks"].shape == (1, 64, 64) and float(batch["loss_masks"].max()) == 0.0


def test_validation_split_holds_out_images(tmp_path):
    folder = images(str(tmp_path / "2_x"), [(64, 64)] * 10)
    config = DatasetConfig(resolution=(64, 64), validation_split=0.3, validation_seed=1,
                           subsets=[SubsetConfig(folder, num_repeats=2)])
    train = TrainDataset([config], seed=0)
    val = TrainDataset([config], seed=0, split="validation")
    train_paths = {r.path for r in train.records}
    val_paths = {r.path for r in val.records}
    assert len(train_paths) == 7 and len(val_paths) == 3 and not train_paths & val_paths
    assert len(train.draws[0]) == 14 and len(val.draws[0]) == 3  # validation images once each


def test_fixed_captions_lists_every_caption_only_when_draws_cannot_vary(tmp_path):
    folder = images(str(tmp_path / "2_x"), [(64, 64)] * 3, captions=["a, b", "c", "a, b"])
    plain = SubsetConfig(folder, num_repeats=2, class_tokens="x", caption_extension=".txt",
                         caption=CaptionOptions(prefix="p"))
    config = DatasetConfig(resolution=(64, 64), batch_size=1, subsets=[plain])
    assert TrainDataset([config], seed=0).fixed_captions() == ["p a, b", "p c"]
    shuffled = SubsetConfig(folder, num_repeats=2, class_tokens="x", caption_extension=".txt",
                            caption=CaptionOptions(shuffle=True))
    config = DatasetConfig(resolution=(64, 64), batch_size=1, subsets=[shuffled])
    assert TrainDataset([config], seed=0).fixed_captions() is None
