"""Latent caching in memory and on disk: write, reuse, and invalidation when the image, VAE or bucket changes."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts.data.config_types import DatasetConfig, SubsetConfig
from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.latent_cache import legacy_npz_path, npz_path


class FakeVAE:
    """Real-shaped stand-in: [B,3,H,W] -> [B,4,H/8,W/8] by average pooling (the VAE itself is not under test)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 3
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def save(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "2_x"
    path.mkdir()
    save(str(path / "a.png"), (64, 64), 0)
    save(str(path / "b.png"), (96, 64), 1)
    return str(path)


def dataset(folder, resolution=64, **subset_kw):
    subset = SubsetConfig(folder, num_repeats=2, **subset_kw)
    return TrainDataset([DatasetConfig(resolution=(resolution, resolution), batch_size=2, subsets=[subset])], seed=0)


def cache(ds, vae_id="vae-1", to_disk=True, **kw):
    return ds.cache_latents(FakeVAE(), vae_id=vae_id, to_disk=to_disk, batch_size=4, **kw)


def test_in_memory_cache_serves_unscaled_latents(folder):
    ds = dataset(folder)
    report = cache(ds, to_disk=False)
    assert (report.encoded, report.reused) == (2, 0)
    assert not [n for n in os.listdir(folder) if n.endswith(".npz")]
    batch = ds[0]
    assert "images" not in batch and batch["latents"].shape == (2, 4, 8, 8)
    assert batch["latents"].dtype == torch.float32
    # the same numbers as encoding the fitted image directly
    ref = dataset(folder)
    ref.set_epoch(1)
    images = ref[0]["images"]
    assert torch.allclose(batch["latents"], FakeVAE()(images), atol=1e-6)


def test_disk_cache_written_then_reused(folder):
    assert cache(dataset(folder)).encoded == 2
    path = npz_path(os.path.join(folder, "b.png"), (96, 64))
    assert os.path.basename(path) == "b_0096x0064_sd.npz"
    with np.load(path) as data:
        assert data["latents"].shape == (4, 8, 8) and data["latents"].dtype == np.float32
        assert data["original_size"].tolist() == [96, 64] and data["crop_ltrb"].tolist() == [16, 0, 80, 64]
        assert "latents_flipped" not in data.files
    again = cache(dataset(folder))
    assert (again.encoded, again.reused) == (0, 2)


def test_changed_image_is_re_encoded(folder):
    cache(dataset(folder))
    time.sleep(0.01)
    save(os.path.join(folder, "a.png"), (64, 64), 99)  # same size, new content
    report = cache(dataset(folder))
    assert (report.encoded, report.reused) == (1, 1)


def test_touched_but_identical_image_is_reused(folder):
    cache(dataset(folder))
    path = os.path.join(folder, "a.png")
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert cache(dataset(folder)).reused == 2


def test_changed_vae_is_re_encoded(folder):
    cache(dataset(folder))
    assert cache(dataset(folder), vae_id="vae-2").encoded == 2


def test_changed_resolution_is_re_encoded(folder):
    cache(dataset(folder))
    report = cache(dataset(folder, resolution=128))
    assert report.encoded == 2
    assert dataset(folder, resolution=128).cache_latents(FakeVAE(), vae_id="vae-1", to_disk=True,
                                                          batch_size=1).reused == 2


def test_flip_aug_caches_both_and_needs_them(folder):
    cache(dataset(folder))
    ds = dataset(folder, flip_aug=True)
    assert cache(ds).encoded == 2  # old files lack latents_flipped
    with np.load(npz_path(os.path.join(folder, "a.png"), (64, 64))) as data:
        assert data["latents_flipped"].shape == (4, 8, 8)
        assert np.allclose(data["latents_flipped"], data["latents"][:, :, ::-1], atol=1e-6)
    assert cache(dataset(folder, flip_aug=True)).reused == 2


def test_skip_check_trusts_existing_files(folder):
    cache(dataset(folder))
    assert cache(dataset(folder), vae_id="other", skip_check=True).reused == 2


def test_non_main_process_does_not_write(folder):
    report = cache(dataset(folder), is_main_process=False)
    assert report.encoded == 2 and not [n for n in os.listdir(folder) if n.endswith(".npz")]


def test_legacy_npz_wins(folder):
    legacy = legacy_npz_path(os.path.join(folder, "a.png"))
    np.savez(legacy, latents=np.full((4, 8, 8), 7.0, dtype=np.float32), original_size=np.array([64, 64]),
             crop_ltrb=np.array([0, 0, 64, 64]))
    ds = dataset(folder)
    assert cache(ds).reused == 1
    record = next(r for r in ds.records if r.path.endswith("a.png"))
    assert float(record.latents.mean()) == 7.0


def test_color_aug_and_random_crop_are_not_cached(folder):
    for kw in ({"color_aug": True}, {"random_crop": True}):
        ds = dataset(folder, **kw)
        report = cache(ds)
        assert (report.encoded, report.skipped) == (0, 2)
        assert "images" in ds[0]


def test_corrupt_cache_file_is_remade(folder):
    cache(dataset(folder))
    with open(npz_path(os.path.join(folder, "a.png"), (64, 64)), "wb") as f:
        f.write(b"garbage")
    assert cache(dataset(folder)).encoded == 1
