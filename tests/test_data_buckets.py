"""Bucket list, bucket selection, bucket_no_upscale and fitting an image into its bucket (sd_scripts.data.buckets)."""
import random

import numpy as np
import pytest
from PIL import Image

from sd_scripts.data.buckets import cover_size, fit_to_bucket, make_buckets, no_upscale_bucket, select_bucket

SD_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
          (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
          (1024, 256)]


def test_bucket_list_512_min_256_max_1024_step_64():
    assert make_buckets((512, 512), 256, 1024, 64) == SD_512


@pytest.mark.parametrize("resolution,min_reso,max_reso,step,expected", [
    ((256, 256), 128, 256, 64, [(128, 256), (192, 256), (256, 192), (256, 256), (256, 128)]),
    ((64, 64), 64, 64, 64, [(64, 64)]),
    # non-square resolution: same area, square always present
    ((768, 512), 512, 768, 128, [(512, 512), (512, 768), (640, 512), (512, 640), (768, 512)]),
])
def test_bucket_list_small_cases(resolution, min_reso, max_reso, step, expected):
    assert make_buckets(resolution, min_reso, max_reso, step) == sorted(expected)


@pytest.mark.parametrize("size,bucket", [
    ((512, 512), (512, 512)),
    ((1000, 1000), (512, 512)),
    ((640, 384), (640, 384)),  # exact size
    ((1200, 800), (640, 384)),  # 1.5: 640/384=1.67 is closer than 576/448=1.29
    ((800, 1200), (384, 640)),
    ((300, 1200), (256, 1024)),
    ((2000, 500), (1024, 256)),
    ((5000, 100), (1024, 256)),  # beyond the widest bucket
])
def test_select_bucket(size, bucket):
    assert select_bucket(size, SD_512) == bucket


@pytest.mark.parametrize("size,resized,bucket", [
    ((300, 200), (300, 200), (256, 192)),  # small: never upscaled, floored to steps
    ((512, 512), (512, 512), (512, 512)),
    ((1024, 1024), (512, 512), (512, 512)),
    ((1000, 600), (640, 384), (640, 384)),
    ((1000, 700), (576, 403), (576, 384)),  # width snapped keeps the aspect better than height snapped
])
def test_no_upscale_bucket(size, resized, bucket):
    assert no_upscale_bucket(size, (512, 512), 64) == (resized, bucket)


@pytest.mark.parametrize("size,bucket,expected", [
    ((1200, 800), (640, 384), (640, 427)),  # 426.67 rounds up
    ((800, 1200), (384, 640), (427, 640)),
    ((100, 100), (512, 512), (512, 512)),
    ((511, 1023), (256, 512), (256, 513)),  # 512.5 rounds half up
])
def test_cover_size_rounds_half_up(size, bucket, expected):
    assert cover_size(size, bucket) == expected


def _gradient(w, h):
    x = np.tile(np.arange(w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    return Image.fromarray(x, "RGB")


def test_fit_centred_crop():
    fitted = fit_to_bucket(_gradient(1200, 800), (640, 384), random_crop=False, rng=None)
    assert fitted.pixels.shape == (384, 640, 3) and fitted.pixels.dtype == np.uint8
    assert fitted.original_size == (1200, 800)
    assert fitted.resized_size == (640, 427)
    assert fitted.crop_ltrb == (0, 21, 640, 405)


def test_fit_random_crop_offsets_vary_and_stay_inside():
    rng = random.Random(0)
    tops = set()
    for _ in range(20):
        fitted = fit_to_bucket(_gradient(400, 800), (256, 256), random_crop=True, rng=rng)
        left, top, right, bottom = fitted.crop_ltrb
        assert (left, right) == (0, 256) and 0 <= top <= 256 and bottom - top == 256
        tops.add(top)
    assert len(tops) > 5


def test_fit_no_upscale_crops_without_resizing():
    fitted = fit_to_bucket(_gradient(300, 200), (256, 192), random_crop=False, rng=None, resized_size=(300, 200))
    assert fitted.crop_ltrb == (22, 4, 278, 196)
    assert fitted.pixels[0, 0, 0] == 22  # the gradient's column 22 is the first one kept


def test_fit_alpha_channel():
    img = Image.new("RGBA", (64, 64), (255, 0, 0, 128))
    fitted = fit_to_bucket(img, (64, 64), random_crop=False, rng=None, with_alpha=True)
    assert fitted.alpha.shape == (64, 64) and abs(float(fitted.alpha.mean()) - 128 / 255) < 1e-6
    opaque = fit_to_bucket(_gradient(64, 64), (64, 64), random_crop=False, rng=None, with_alpha=True)
    assert float(opaque.alpha.min()) == 1.0
