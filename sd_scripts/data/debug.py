"""debug_dataset: what the dataset yields, batch by batch, for one epoch, without a model and without training.

sd-scripts shows each image in a window; headless, each batch is printed (step, bucket, and per image: file, caption,
crop window, flip, loss weight, mask coverage) and written to `<out_dir>/debug_dataset.jsonl`, with the first
`max_images` fitted images (and their loss masks) saved as PNGs next to it, so they can be looked at.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
from PIL import Image


def _save_png(array: np.ndarray, path: str, mode: str) -> None:
    tmp = path + ".tmp"
    Image.fromarray(array, mode).save(tmp, format="PNG")
    os.replace(tmp, path)


def describe_batch(batch: dict, step: int) -> dict[str, Any]:
    """One batch as plain data: its bucket (w, h) and, per image, what the trainer would see."""
    h, w = batch["target_sizes_hw"][0]
    masks = batch.get("loss_masks")
    items = []
    for i, path in enumerate(batch["image_paths"]):
        item = {"image": path, "caption": batch["captions"][i], "crop_ltrb": list(batch["crops_ltrb"][i]),
                "flipped": bool(batch["flipped"][i]), "original_size": list(batch["original_sizes_hw"][i][::-1]),
                "loss_weight": float(batch["loss_weights"][i]),
                "network_multiplier": float(batch["network_multipliers"][i])}
        if masks is not None:
            item["mask_mean"] = round(float(masks[i].mean()), 4)
        items.append(item)
    return {"step": step, "bucket": [w, h], "latents_cached": "latents" in batch, "items": items}


def list_batches(dataset, out_dir: str | None, *, epoch: int = 1, max_images: int = 64, echo=print) -> list[dict]:
    """Every batch of `epoch` described (describe_batch), echoed line by line; with `out_dir`, written to
    `debug_dataset.jsonl` there (atomically) with the first `max_images` images as PNGs."""
    dataset.set_epoch(epoch)
    echo(f"debug_dataset: epoch {epoch}, {len(dataset)} batches (nothing is trained)")
    batches, saved = [], 0
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    for index in range(len(dataset)):
        batch = dataset[index]
        described = describe_batch(batch, index + 1)
        batches.append(described)
        echo(f"step {index + 1}/{len(dataset)}  bucket {described['bucket'][0]}x{described['bucket'][1]}")
        for i, item in enumerate(described["items"]):
            mask = f"  mask {item['mask_mean']:.2f}" if "mask_mean" in item else ""
            echo(f"  {item['image']}  crop {tuple(item['crop_ltrb'])}  flipped {item['flipped']}  "
                 f"weight {item['loss_weight']:g}{mask}  caption: {item['caption']}")
            if out_dir and "images" in batch and saved < max_images:
                stem = f"{index + 1:05d}_{i}_{os.path.splitext(os.path.basename(item['image']))[0]}"
                pixels = ((batch["images"][i].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255)
                _save_png(pixels.astype(np.uint8), os.path.join(out_dir, stem + ".png"), "RGB")
                item["png"] = stem + ".png"
                if batch.get("loss_masks") is not None:
                    mask_pixels = (batch["loss_masks"][i].numpy() * 255).round().clip(0, 255).astype(np.uint8)
                    _save_png(mask_pixels, os.path.join(out_dir, stem + "_mask.png"), "L")
                saved += 1
    if out_dir:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=out_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for described in batches:
                f.write(json.dumps(described, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(out_dir, "debug_dataset.jsonl"))
    return batches
