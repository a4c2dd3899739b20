"""Tiny random-weight models of every registered family, and a demo dataset, for tests and the demo presets.

Each family package builds its own tiny models (`families/<package>/tiny.py`, listed by the registry's
`tiny_variants()`) in the file layouts its users have, with the real tokenizers; this module holds the seeded
weight helpers they share, the command line, and the demo dataset. The same seed gives identical bytes.

    python -m sd_scripts.tools.tiny_model --family VARIANT --out DIR [--layout single|diffusers|both] [--dataset DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
from dataclasses import dataclass


@dataclass
class TinyModelPaths:
    """Where build_tiny_model wrote the model (None for a layout not asked for)."""

    single_file: str | None
    diffusers_dir: str | None


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_tensor(seed: int, name: str, shape, is_norm_weight: bool = False):
    """A seeded tensor for parameter `name`: N(0, 1/fan_in) for matrices, small values around 1 (norm weights) or 0
    (other vectors), so a mix-up of any two tensors changes the results."""
    import torch

    g = torch.Generator().manual_seed(_seed_for(seed, name))
    values = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        return values / math.sqrt(math.prod(shape[1:]))
    return values * 0.1 + (1.0 if is_norm_weight else 0.0)


def init_module(module, seed: int, component: str) -> None:
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_weights = {f"{n}.weight" if n else "weight" for n, m in module.named_modules() if isinstance(m, norms)}
    state = {}
    for name, param in module.state_dict().items():
        canonical = name if not component.startswith("text") or name.startswith("text_model.") else "text_model." + name
        state[name] = random_tensor(seed, f"{component}:{canonical}", param.shape, name in norm_weights)
    module.load_state_dict(state, strict=True, assign=True)


def build_tiny_model(out_dir: str, family: str, v_prediction: bool = False, layout: str = "both",
                     seed: int = 0, **variant) -> TinyModelPaths:
    """Write a tiny model of `family` under out_dir (single file and/or diffusers folder, as the family's users
    have them); the family package's builder does the work. `variant`: the builder's own keyword arguments (a
    FamilySpec.tiny_variants entry, e.g. which model type of the family)."""
    from ..families import tiny_builder

    if layout not in ("single", "diffusers", "both"):
        raise ValueError(f"layout must be single, diffusers or both, not {layout!r}")
    return tiny_builder(family)(out_dir, family=family, v_prediction=v_prediction, layout=layout, seed=seed,
                                **variant)


# ---------------------------------------------------------------- demo dataset

_DEMO_CONCEPTS = {"10_sks dog": ("sks dog", 7), "5_ohwx cat": ("ohwx cat", 6)}
_SIZES = [(64, 64), (96, 64), (64, 96)]
_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
            "purple": (140, 50, 170), "orange": (240, 140, 30)}


def make_demo_dataset(out_dir: str, seed: int = 0) -> str:
    """A kohya-convention dataset under out_dir/train: '10_sks dog' and '5_ohwx cat' with mixed-aspect PNGs and
    .txt captions; the last image of each folder has no caption (class-token fallback). Returns the train folder."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    train = os.path.join(out_dir, "train")
    for folder, (token, count) in _DEMO_CONCEPTS.items():
        path = os.path.join(train, folder)
        os.makedirs(path, exist_ok=True)
        for i in range(count):
            w, h = _SIZES[i % len(_SIZES)]
            colour_name, colour = rng.choice(sorted(_COLOURS.items()))
            background = tuple(rng.randrange(256) for _ in range(3))
            image = Image.new("RGB", (w, h), background)
            draw = ImageDraw.Draw(image)
            x0, y0 = rng.randrange(w // 3), rng.randrange(h // 3)
            shape = "circle" if i % 2 == 0 else "square"
            box = (x0, y0, x0 + w // 2, y0 + h // 2)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
            stem = os.path.join(path, f"{i:02d}")
            image.save(stem + ".png")
            if i < count - 1:
                with open(stem + ".txt", "w", encoding="utf-8") as f:
                    f.write(f"a photo of {token}, {colour_name} {shape}\n")
    return train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.tools.tiny_model",
                                     description="Write a tiny random-weight model (and a demo dataset).")
    from ..families import tiny_variants

    variants = tiny_variants()
    parser.add_argument("--family", choices=sorted(variants), default=next(iter(variants)))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layout", choices=("single", "diffusers", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", help="also write the demo dataset into this folder")
    args = parser.parse_args(argv)
    family, v = variants[args.family]
    from ..families import family_spec

    extra = {k: v for k, v in family_spec(family).tiny_variants[args.family].items() if k != "v_prediction"}
    paths = build_tiny_model(args.out, family, v, args.layout, args.seed, **extra)
    for label, path in (("single file", paths.single_file), ("diffusers folder", paths.diffusers_dir)):
        if path:
            print(f"{label}: {path}")
    if args.dataset:
        print(f"dataset: {make_demo_dataset(args.dataset, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
