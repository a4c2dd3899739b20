"""The torch Dataset the training loop iterates: one item is one batch of a single bucket.

Built from `load_datasets(...)`'s DatasetConfigs. Images are drawn once per repeat, regularisation images balanced
against them; the batch order is a pure function of (seed, epoch), so DataLoader workers agree on it without
talking. Epoch, step and max steps live in shared memory, so `set_epoch` / `set_step` also reach live workers.
Use `make_data_loader` (batch_size=1 at the DataLoader level, `collate_batch` unwraps it).
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DatasetError
from .augment import flip_horizontal, flipped_crop, hue_shift
from .batching import balance_reg_repeats, plan_batches, repeat_draws
from .buckets import cover_size, fit_to_bucket, make_buckets, no_upscale_bucket, select_bucket
from .captions import process_caption
from .config_types import DatasetConfig, SubsetConfig
from .face_crop import face_crop_placement, face_from_name
from .images import load_image
from .latent_cache import CacheKey, CachedLatents, load_cached, mask_source, save_cached
from .masks import load_mask
from .subset_images import SubsetImage, subset_images

logger = logging.getLogger(__name__)

Size = tuple[int, int]
Encode = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ImageRecord:
    """One distinct image of the dataset, placed in its bucket, with its latents once cached."""

    path: str
    caption: str
    dataset_index: int
    subset_index: int  # into TrainDataset.subsets
    original_size: Size  # (w, h)
    resized_size: Size  # (w, h) before the crop
    bucket: Size  # (w, h)
    latents: torch.Tensor | None = None  # [C, h, w] float32, unscaled
    latents_flipped: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # the cached loss mask [H, W] in 0..1 (alpha channel or mask image)
    cached_crop: tuple[int, int, int, int] | None = None
    mask_path: str | None = None  # its mask image (conditioning_data_dir)


@dataclass
class CacheReport:
    """What cache_latents did: images encoded now, reused from disk, and left uncached (color_aug/random_crop)."""

    encoded: int = 0
    reused: int = 0
    skipped: int = 0


@dataclass
class DatasetSummary:
    """Numbers for the 'start' event and the ss_* metadata."""

    num_train_images: int  # train images x repeats
    num_reg_images: int  # reg images x repeats, before balancing
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # {dir name: {lowercase tag: count}}
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # {dir name: {n_repeats, img_count}}
    buckets: dict[Size, int] = field(default_factory=dict)  # {(w, h): draws per epoch}
    num_batches: int = 0
    dataset_config: list[dict] | None = None  # per-dataset description for ss_datasets (dataset TOML runs only)


def collate_batch(items: list[dict]) -> dict:
    """DataLoader collate_fn: the dataset already returns whole batches."""
    return items[0]


def make_data_loader(dataset: "TrainDataset", num_workers: int = 0, persistent_workers: bool = False) -> DataLoader:
    """The DataLoader for a TrainDataset: batch order comes from the dataset (set_epoch), so no sampler shuffle."""
    return DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_batch, num_workers=num_workers,
                      persistent_workers=persistent_workers and num_workers > 0)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class TrainDataset(Dataset):
    """Batches of one bucket each; see the module docstring. `split` is 'train' or 'validation'."""

    def __init__(self, configs: list[DatasetConfig], *, seed: int | None = None, max_train_steps: int = 0,
                 prior_loss_weight: float = 1.0, split: str = "train", bucket_step: int | None = None):
        # bucket_step is accepted for callers that pass the family's step; each DatasetConfig carries its own.
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        self.configs = configs
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2 ** 31)
        self.prior_loss_weight = prior_loss_weight
        self.split = split
        self.subsets: list[tuple[int, SubsetConfig]] = [(d, s) for d, ds in enumerate(configs) for s in ds.subsets]
        self.records: list[ImageRecord] = []
        self.draws: list[list[int]] = []  # per dataset: record ids, once per repeat
        self._subset_images: dict[int, list[int]] = defaultdict(list)
        self._raw_reg_draws = 0
        for d, ds in enumerate(configs):
            self.draws.append(self._build_dataset(d, ds))
        if not any(self.draws):
            what = "validation images (is validation_split set?)" if split == "validation" else "training images"
            raise DatasetError(f"no {what} in the configured folders: add images to the concept folders")
        self._epoch = multiprocessing.Value("i", 1, lock=False)
        self._step = multiprocessing.Value("q", 0, lock=False)
        self._max_steps = multiprocessing.Value("q", max_train_steps, lock=False)
        self._plan_epoch = -1
        self._plan: list[list[int]] = []
        self._num_batches = sum(math.ceil(n / configs[d].batch_size) for d, counts in enumerate(self._bucket_counts())
                                for n in counts.values())

    # ---- building
    def _build_dataset(self, d: int, ds: DatasetConfig) -> list[int]:
        buckets = None
        if ds.enable_bucket and not ds.bucket_no_upscale:
            buckets = make_buckets(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)
        train_ids, train_reps, reg_ids, reg_reps = [], [], [], []
        for subset_index, (sd, subset) in enumerate(self.subsets):
            if sd != d or (subset.is_reg and self.split == "validation"):
                continue
            images = self._split_images(subset_images(subset), ds, subset)
            ids = [self._add_record(img, d, subset_index, ds, buckets) for img in images]
            self._subset_images[subset_index] = ids
            repeats = 1 if self.split == "validation" else subset.num_repeats
            (reg_ids if subset.is_reg else train_ids).extend(ids)
            (reg_reps if subset.is_reg else train_reps).extend([repeats] * len(ids))
        draws = repeat_draws(train_ids, train_reps)
        self._raw_reg_draws += sum(reg_reps)
        if reg_ids:
            draws += repeat_draws(reg_ids, balance_reg_repeats(reg_reps, len(draws)))
        return draws

    def _split_images(self, images: list[SubsetImage], ds: DatasetConfig, subset: SubsetConfig) -> list[SubsetImage]:
        if ds.validation_split <= 0 or subset.is_reg:
            return images if self.split == "train" else []
        order = list(range(len(images)))
        vseed = ds.validation_seed if ds.validation_seed is not None else self.seed
        random.Random(f"validation:{vseed}:{subset.image_dir}").shuffle(order)
        held_out = set(order[:round(len(images) * ds.validation_split)])  # sd-scripts' count of held-out images
        keep_held_out = self.split == "validation"
        return [img for i, img in enumerate(images) if (i in held_out) == keep_held_out]

    def _add_record(self, img: SubsetImage, d: int, subset_index: int, ds: DatasetConfig,
                    buckets: list[Size] | None) -> int:
        if buckets is None and ds.enable_bucket:  # bucket_no_upscale
            resized, bucket = no_upscale_bucket(img.size, ds.resolution, ds.bucket_reso_steps)
            if min(bucket) < ds.bucket_reso_steps:
                raise DatasetError(f"image {img.path} is {img.size[0]}x{img.size[1]}, smaller than "
                                   f"bucket_reso_steps {ds.bucket_reso_steps} on one side: enlarge or remove it")
        else:
            bucket = select_bucket(img.size, buckets or [ds.resolution])
            resized = cover_size(img.size, bucket)
        self.records.append(ImageRecord(img.path, img.caption, d, subset_index, img.size, resized, bucket,
                                        mask_path=img.mask_path))
        return len(self.records) - 1

    def _bucket_counts(self) -> list[Counter]:
        return [Counter(self.records[i].bucket for i in draws) for draws in self.draws]

    # ---- epoch / step state (shared with DataLoader workers)
    def fixed_captions(self) -> list[str] | None:
        """Every caption a draw can give, when no subset varies its captions (else None).

        Lets a trainer with a frozen text encoder encode them all once and then release the encoder.
        """
        captions = set()
        for rec in self.records:
            opts = self.subsets[rec.subset_index][1].caption
            if not opts.is_deterministic:
                return None
            captions.add(process_caption(rec.caption, opts, random.Random(0), 1, 0, self._max_steps.value))
        return sorted(captions)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (1-based, as in sd-scripts): a new batch order and epoch-based caption dropout."""
        self._epoch.value = epoch

    def set_step(self, step: int) -> None:
        """The global optimizer step, for token warmup."""
        self._step.value = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Total steps: token_warmup_step below 1 is a fraction of these."""
        self._max_steps.value = max_train_steps

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def batch_plan(self, epoch: int) -> list[list[int]]:
        """Record ids of every batch of `epoch`, in order (a pure function of seed and epoch)."""
        rng = random.Random(f"{self.seed}:batches:{epoch}")
        batches = []
        for d, draws in enumerate(self.draws):
            batches += plan_batches(draws, [r.bucket for r in self.records], self.configs[d].batch_size, rng)
        rng.shuffle(batches)
        return batches

    def _current_plan(self) -> tuple[int, list[list[int]]]:
        epoch = self._epoch.value
        if epoch != self._plan_epoch:
            self._plan, self._plan_epoch = self.batch_plan(epoch), epoch
        return epoch, self._plan

    # ---- items
    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, index: int) -> dict:
        epoch, plan = self._current_plan()
        if not 0 <= index < len(plan):
            raise IndexError(index)
        ids = plan[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        step, max_steps = self._step.value, self._max_steps.value
        use_latents = all(self.records[i].latents is not None for i in ids)
        tensors, masks, crops, captions, flips = [], [], [], [], []
        any_mask = any(self.subsets[self.records[i].subset_index][1].has_mask for i in ids)
        for i in ids:
            rec = self.records[i]
            subset = self.subsets[rec.subset_index][1]
            flip = subset.flip_aug and rng.random() < 0.5
            tensor, mask, crop = (self._cached_item(rec, flip) if use_latents else self._image_item(rec, subset, flip, rng))
            tensors.append(tensor)
            masks.append(mask if mask is not None else torch.ones(rec.bucket[1], rec.bucket[0]))
            crops.append(crop)
            flips.append(flip)
            captions.append(process_caption(rec.caption, subset.caption, rng, epoch, step, max_steps))
        records = [self.records[i] for i in ids]
        batch = {
            "latents" if use_latents else "images": torch.stack(tensors),
            "captions": captions,
            "loss_weights": torch.tensor([self.prior_loss_weight if self.subsets[r.subset_index][1].is_reg else 1.0
                                          for r in records], dtype=torch.float32),
            "original_sizes_hw": [(r.original_size[1], r.original_size[0]) for r in records],
            "crop_top_lefts": [(c[1], c[0]) for c in crops],
            "crops_ltrb": crops,  # the real crop window in the resized image (debug_dataset lists it)
            "flipped": flips,
            "target_sizes_hw": [(r.bucket[1], r.bucket[0]) for r in records],
            "network_multipliers": torch.tensor([self.configs[r.dataset_index].network_multiplier for r in records],
                                                dtype=torch.float32),
            "image_paths": [r.path for r in records],
        }
        if any_mask:  # [B, H, W] in 0..1: the loss of each pixel is weighted by it (training/loss.py)
            batch["loss_masks"] = torch.stack(masks)
        return batch

    def _cached_item(self, rec: ImageRecord, flip: bool):
        crop = rec.cached_crop
        mask = rec.mask
        if flip:
            crop = flipped_crop(crop, rec.resized_size[0])
            mask = mask.flip(-1) if mask is not None else None
            return rec.latents_flipped, mask, crop
        return rec.latents, mask, crop

    def _interpolation(self, rec: ImageRecord, subset: SubsetConfig) -> str | None:
        return subset.resize_interpolation or self.configs[rec.dataset_index].resize_interpolation

    def _face_crop(self, rec: ImageRecord, subset: SubsetConfig):
        """The face of a face_crop_aug_range image (its name holds the box), when that applies (no bucketing)."""
        if subset.face_crop_aug_range is None or self.configs[rec.dataset_index].enable_bucket:
            return None
        return face_from_name(rec.path)

    def _fit(self, rec: ImageRecord, subset: SubsetConfig, rng: random.Random | None, random_crop: bool,
             face_crop: bool = False):
        image = load_image(rec.path)
        mask = load_mask(rec.mask_path, rec.path, image.size) if rec.mask_path else None
        resized, crop_left_top = rec.resized_size, None
        face = self._face_crop(rec, subset) if face_crop else None
        if face is not None:
            resized, crop_left_top = face_crop_placement(image.size, face, rec.bucket, subset.face_crop_aug_range,
                                                         random_crop, rng or random.Random())
        return fit_to_bucket(image, rec.bucket, random_crop=random_crop, rng=rng,
                             resize_interpolation=self._interpolation(rec, subset), resized_size=resized,
                             with_alpha=subset.alpha_mask, mask=mask, crop_left_top=crop_left_top)

    def _image_item(self, rec: ImageRecord, subset: SubsetConfig, flip: bool, rng: random.Random):
        fitted = self._fit(rec, subset, rng, subset.random_crop, face_crop=True)
        pixels, alpha, crop = fitted.pixels, fitted.alpha, fitted.crop_ltrb
        if subset.color_aug:
            pixels = hue_shift(pixels, rng)
        if flip:
            pixels, crop = flip_horizontal(pixels), flipped_crop(crop, fitted.resized_size[0])
            alpha = flip_horizontal(alpha) if alpha is not None else None
        return pixels_to_tensor(pixels), torch.from_numpy(alpha) if alpha is not None else None, crop

    # ---- latent cache
    def cache_latents(self, encode: Encode, *, vae_id: str, to_disk: bool, batch_size: int,
                      is_main_process: bool = True, skip_check: bool = False, npz_suffix: str = "_sd") -> CacheReport:
        """Encode every image once (`encode`: images [B,3,H,W] in [-1,1] -> unscaled latents) and keep the latents
        in memory; with `to_disk`, reuse valid `.npz` files and (main process only) write new ones.
        Subsets with color_aug or random_crop stay uncached (a warning says so)."""
        report = CacheReport()
        todo: dict[tuple, list[int]] = defaultdict(list)
        warned: set[int] = set()
        for rid, rec in enumerate(self.records):
            subset = self.subsets[rec.subset_index][1]
            if subset.color_aug or subset.random_crop or self._face_crop(rec, subset) is not None:
                report.skipped += 1
                if rec.subset_index not in warned:
                    warned.add(rec.subset_index)
                    logger.warning("latents of %s are not cached: color_aug, random_crop and face_crop_aug_range "
                                   "change the pixels on every draw", subset.image_dir or subset.metadata_file)
                continue
            key = self._cache_key(rec, subset, vae_id)
            found = load_cached(rec.path, rec.original_size, key, suffix=npz_suffix,
                                skip_check=skip_check) if to_disk else None
            if found is not None:
                self._keep(rec, found)
                report.reused += 1
            else:
                todo[(rec.bucket, subset.flip_aug)].append(rid)
        for (_, flip), rids in sorted(todo.items()):
            for start in range(0, len(rids), batch_size):
                chunk = [self.records[r] for r in rids[start:start + batch_size]]
                for rec, cached in zip(chunk, self._encode_chunk(chunk, encode, flip)):
                    self._keep(rec, cached)
                    if to_disk and is_main_process:
                        subset = self.subsets[rec.subset_index][1]
                        save_cached(rec.path, cached, self._cache_key(rec, subset, vae_id), suffix=npz_suffix)
                report.encoded += len(chunk)
        logger.info("latents: %d encoded, %d reused from disk, %d not cached", report.encoded, report.reused,
                    report.skipped)
        return report

    def _cache_key(self, rec: ImageRecord, subset: SubsetConfig, vae_id: str) -> CacheKey:
        over_w, over_h = rec.resized_size[0] - rec.bucket[0], rec.resized_size[1] - rec.bucket[1]
        crop = (over_w // 2, over_h // 2, over_w // 2 + rec.bucket[0], over_h // 2 + rec.bucket[1])
        return CacheKey(vae_id=vae_id, bucket=rec.bucket, resized_size=rec.resized_size, crop_ltrb=crop,
                        interpolation=self._interpolation(rec, subset) or "default", need_flipped=subset.flip_aug,
                        mask=mask_source(subset.alpha_mask, rec.mask_path))

    def _encode_chunk(self, chunk: list[ImageRecord], encode: Encode, flip: bool) -> list[CachedLatents]:
        fitted = [self._fit(rec, self.subsets[rec.subset_index][1], None, False) for rec in chunk]
        pixels = [f.pixels for f in fitted]
        with torch.no_grad():
            latents = encode(torch.stack([pixels_to_tensor(p) for p in pixels])).float().cpu().numpy()
            flipped = None
            if flip:
                flipped = encode(torch.stack([pixels_to_tensor(flip_horizontal(p)) for p in pixels]))
                flipped = flipped.float().cpu().numpy()
        return [CachedLatents(latents=latents[i], original_size=f.original_size, crop_ltrb=f.crop_ltrb,
                              latents_flipped=flipped[i] if flipped is not None else None, mask=f.alpha)
                for i, f in enumerate(fitted)]

    @staticmethod
    def _keep(rec: ImageRecord, cached: CachedLatents) -> None:
        rec.latents = torch.from_numpy(np.ascontiguousarray(cached.latents))
        rec.latents_flipped = (torch.from_numpy(np.ascontiguousarray(cached.latents_flipped))
                               if cached.latents_flipped is not None else None)
        rec.mask = torch.from_numpy(np.ascontiguousarray(cached.mask)) if cached.mask is not None else None
        rec.cached_crop = tuple(cached.crop_ltrb)

    # ---- summary
    def summary(self) -> DatasetSummary:
        """Counts for the 'start' event and the ss_* metadata (directories by folder name, as sd-scripts)."""
        tags: dict[str, Counter] = {}
        dirs: dict[str, dict[str, int]] = {}
        num_train = 0
        for subset_index, ids in self._subset_images.items():
            subset = self.subsets[subset_index][1]
            name = os.path.basename(os.path.normpath(subset.image_dir or subset.metadata_file))
            counter = tags.setdefault(name, Counter())
            for rid in ids:
                for line in self.records[rid].caption.split("\n"):
                    counter.update(t.strip().lower() for t in line.split(subset.caption.separator) if t.strip())
            entry = dirs.setdefault(name, {"n_repeats": subset.num_repeats, "img_count": 0})
            entry["img_count"] += len(ids)
            if not subset.is_reg:
                num_train += len(ids) * (1 if self.split == "validation" else subset.num_repeats)
        buckets: Counter = Counter()
        for counts in self._bucket_counts():
            buckets.update(counts)
        return DatasetSummary(num_train_images=num_train, num_reg_images=self._raw_reg_draws,
                              tag_frequency={k: dict(v) for k, v in tags.items()}, dataset_dirs=dirs,
                              buckets=dict(sorted(buckets.items())), num_batches=len(self),
                              dataset_config=self._datasets_description())

    def _datasets_description(self) -> list[dict] | None:
        """kohya-style ss_datasets entries, when the datasets came from a dataset TOML."""
        if not any(ds.source for ds in self.configs):
            return None
        out = []
        for d, ds in enumerate(self.configs):
            counts = Counter(self.records[i].bucket for i in self.draws[d])
            subsets = [{"image_dir": os.path.basename(os.path.normpath(s.image_dir or s.metadata_file)),
                        "img_count": len(self._subset_images.get(i, [])), "num_repeats": s.num_repeats,
                        "is_reg": s.is_reg, "class_tokens": s.class_tokens, "flip_aug": s.flip_aug,
                        "color_aug": s.color_aug, "random_crop": s.random_crop,
                        "shuffle_caption": s.caption.shuffle, "keep_tokens": s.caption.keep_tokens,
                        "resize_interpolation": s.resize_interpolation, "alpha_mask": s.alpha_mask}
                       for i, (sd, s) in enumerate(self.subsets) if sd == d]
            out.append({"batch_size_per_device": ds.batch_size, "resolution": list(ds.resolution),
                        "enable_bucket": ds.enable_bucket, "min_bucket_reso": ds.min_bucket_reso,
                        "max_bucket_reso": ds.max_bucket_reso, "bucket_reso_steps": ds.bucket_reso_steps,
                        "bucket_no_upscale": ds.bucket_no_upscale,
                        "bucket_info": {f"{w}x{h}": n for (w, h), n in sorted(counts.items())},
                        "resize_interpolation": ds.resize_interpolation,
                        "subsets": subsets})
        return out
