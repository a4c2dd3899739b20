"""The on-disk latent cache: `<stem>_<WWWW>x<HHHH>_sd.npz` next to each image (FORMATS.md "Latent cache on disk").

Besides the keys other tools read (latents, original_size, crop_ltrb, latents_flipped, alpha_mask), each file
records what it was made from: the image (bytes, mtime and sha256), the VAE id, how the image was fitted to its
bucket and where its loss mask came from (`mask_source`: the alpha channel, or a mask image with its bytes, mtime and
sha256). A file is reused only when all of these still match; otherwise it is re-encoded and replaced. The loss mask
is kept under sd-scripts' key `alpha_mask` ([H, W] in 0..1 at the bucket's pixel size) whatever its source.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(frozen=True)
class CacheKey:
    """What the latents of one image depend on, besides the image file itself."""

    vae_id: str
    bucket: Size  # (w, h)
    resized_size: Size  # (w, h)
    crop_ltrb: tuple[int, int, int, int]
    interpolation: str
    need_flipped: bool
    mask: str = ""  # where the loss mask comes from: "" (none), "alpha" or "file:<mask image path>"

    @property
    def need_mask(self) -> bool:
        return bool(self.mask)

    @property
    def fit(self) -> str:
        return f"bucket={self.bucket} resized={self.resized_size} crop={self.crop_ltrb} interp={self.interpolation}"


@dataclass
class CachedLatents:
    """Latents of one image (float32, unscaled), as held in memory and written to disk."""

    latents: np.ndarray  # [C, h, w]
    original_size: Size  # (w, h)
    crop_ltrb: tuple[int, int, int, int]
    latents_flipped: np.ndarray | None = None
    mask: np.ndarray | None = None  # the loss mask [H, W] in 0..1 (file key `alpha_mask`)


def mask_source(alpha_mask: bool, mask_path: str | None) -> str:
    """CacheKey.mask of an image: its mask image, its alpha channel, or none."""
    if mask_path:
        return "file:" + os.path.abspath(mask_path)
    return "alpha" if alpha_mask else ""


def npz_path(image_path: str, original_size: Size, suffix: str = "_sd") -> str:
    """`<stem>_<WWWW>x<HHHH><suffix>.npz` next to the image (suffix '_sd' for SD1/SD2, '_sdxl' for SDXL)."""
    stem = os.path.splitext(image_path)[0]
    return f"{stem}_{original_size[0]:04d}x{original_size[1]:04d}{suffix}.npz"


def legacy_npz_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".npz"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_unchanged(data, path: str, prefix: str = "image") -> bool:
    """Same size and mtime, or (after a copy or touch) the same content hash."""
    stat = os.stat(path)
    size, mtime, sha = (f"{prefix}_bytes", f"{prefix}_mtime_ns", f"{prefix}_sha256")
    if not {size, mtime, sha} <= set(data.files) or int(data[size]) != stat.st_size:
        return False
    return int(data[mtime]) == stat.st_mtime_ns or str(data[sha]) == file_sha256(path)


def _mask_unchanged(data, key: CacheKey) -> bool:
    if not key.need_mask:
        return True
    if "mask_source" not in data.files or str(data["mask_source"]) != key.mask:
        return False
    if key.mask.startswith("file:"):
        path = key.mask[len("file:"):]
        return os.path.isfile(path) and _file_unchanged(data, path, "mask")
    return True


def _from_npz(data, key: CacheKey) -> CachedLatents:
    return CachedLatents(
        latents=np.asarray(data["latents"], dtype=np.float32),
        original_size=tuple(int(v) for v in data["original_size"]),
        crop_ltrb=tuple(int(v) for v in data["crop_ltrb"]) if "crop_ltrb" in data else key.crop_ltrb,
        latents_flipped=np.asarray(data["latents_flipped"], dtype=np.float32) if key.need_flipped else None,
        mask=np.asarray(data["alpha_mask"], dtype=np.float32) if key.need_mask else None)


def _has_needed_keys(data, key: CacheKey) -> bool:
    names = set(data.files)
    return ("latents" in names and (not key.need_flipped or "latents_flipped" in names)
            and (not key.need_mask or "alpha_mask" in names))


def _latent_fits_bucket(latents: np.ndarray, bucket: Size) -> bool:
    h, w = latents.shape[-2:]
    return h > 0 and w > 0 and bucket[1] % h == 0 and bucket[0] % w == 0 and bucket[1] // h == bucket[0] // w


def load_cached(image_path: str, original_size: Size, key: CacheKey, *, suffix: str = "_sd",
                skip_check: bool = False) -> CachedLatents | None:
    """The cached latents of an image when a valid file exists (a legacy `<stem>.npz` wins), else None."""
    legacy = legacy_npz_path(image_path)
    if os.path.isfile(legacy):
        found = _read(legacy, key, image_path, legacy_file=True, skip_check=skip_check)
        if found is not None:
            return found
    path = npz_path(image_path, original_size, suffix)
    if not os.path.isfile(path):
        return None
    return _read(path, key, image_path, legacy_file=False, skip_check=skip_check)


def _read(path: str, key: CacheKey, image_path: str, *, legacy_file: bool, skip_check: bool) -> CachedLatents | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not _has_needed_keys(data, key) or not _latent_fits_bucket(data["latents"], key.bucket):
                return None
            if skip_check or legacy_file:
                return _from_npz(data, key)
            if not {"vae_id", "fit", "image_bytes", "image_mtime_ns", "image_sha256"} <= set(data.files):
                return None
            if str(data["vae_id"]) != key.vae_id or str(data["fit"]) != key.fit:
                return None
            if not _file_unchanged(data, image_path) or not _mask_unchanged(data, key):
                return None
            return _from_npz(data, key)
    except (OSError, ValueError, KeyError, EOFError) as e:  # a truncated or foreign file is re-made
        logger.warning("latent cache %s is unreadable (%s); it will be re-made", path, e)
        return None


def save_cached(image_path: str, cached: CachedLatents, key: CacheKey, *, suffix: str = "_sd") -> str:
    """Write the cache file atomically (temp file + rename); returns its path."""
    path = npz_path(image_path, cached.original_size, suffix)
    stat = os.stat(image_path)
    arrays = dict(latents=cached.latents.astype(np.float32), original_size=np.array(cached.original_size),
                  crop_ltrb=np.array(cached.crop_ltrb), vae_id=np.array(key.vae_id), fit=np.array(key.fit),
                  bucket=np.array(key.bucket), image_bytes=np.array(stat.st_size, dtype=np.int64),
                  image_mtime_ns=np.array(stat.st_mtime_ns, dtype=np.int64),
                  image_sha256=np.array(file_sha256(image_path)))
    if cached.latents_flipped is not None:
        arrays["latents_flipped"] = cached.latents_flipped.astype(np.float32)
    if cached.mask is not None:
        arrays["alpha_mask"] = cached.mask.astype(np.float32)
        arrays["mask_source"] = np.array(key.mask)
        if key.mask.startswith("file:"):
            mask_path = key.mask[len("file:"):]
            mask_stat = os.stat(mask_path)
            arrays.update(mask_bytes=np.array(mask_stat.st_size, dtype=np.int64),
                          mask_mtime_ns=np.array(mask_stat.st_mtime_ns, dtype=np.int64),
                          mask_sha256=np.array(file_sha256(mask_path)))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
