"""Class (regularisation) images for DreamBooth, generated with the base model.

Every '<repeats>_<class tokens>' folder in `reg_data_dir` that holds fewer than `num_class_images` images gets the
missing ones, made from the class prompt (`class_prompt`, else the folder's class tokens). Image i of a folder has the
seed derived from (seed, folder name, i), so a re-run makes the same images and an interrupted run resumes where it
stopped. Files are `class_<i:05d>.png`, each written to a hidden temp file and moved into place. SD 1.x/2.x models
use the StableDiffusionPipeline (clip_skip applies), SDXL models the StableDiffusionXLPipeline.

The DreamBooth trainer calls `ensure_class_images` before reading the dataset; as a tool:

    python -m sd_scripts.tools.class_images --pretrained_model_name_or_path MODEL --reg_data_dir REG \\
        --num_class_images 200 [--class_prompt "a photo of a dog"] [--resolution 512] [--steps 30] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

from ..data.folders import parse_concept_name
from ..data.images import list_images
from ..errors import DatasetError, UserError

log = logging.getLogger(__name__)


@dataclass
class ClassFolder:
    """One regularisation concept folder and what it still needs."""

    path: str
    prompt: str
    existing: int
    missing: int


def plan_class_images(reg_data_dir: str, num_class_images: int, class_prompt: str | None = None) -> list[ClassFolder]:
    """The concept folders of `reg_data_dir` with how many images each lacks (0 when it has enough)."""
    if not reg_data_dir or not os.path.isdir(reg_data_dir):
        raise DatasetError(f"reg_data_dir {reg_data_dir!r} does not exist: create it with a '<repeats>_<class>' "
                           f"folder (e.g. '1_dog') for the generated class images")
    folders = []
    for name in sorted(os.listdir(reg_data_dir)):
        path = os.path.join(reg_data_dir, name)
        parsed = parse_concept_name(name)
        if not os.path.isdir(path) or name.startswith(".") or parsed is None:
            continue
        existing = len(list_images(path))
        prompt = class_prompt or parsed[1]
        folders.append(ClassFolder(path, prompt, existing, max(0, num_class_images - existing)))
    if not folders:
        raise DatasetError(f"reg_data_dir {reg_data_dir} has no '<repeats>_<class tokens>' folder: create one, e.g. "
                           f"{os.path.join(reg_data_dir, '1_dog')}, to receive the generated class images")
    return folders


def image_seed(seed: int, folder: str, index: int) -> int:
    """The seed of class image `index` of `folder` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{os.path.basename(os.path.normpath(folder))}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _free_names(folder: str, start: int, count: int) -> list[tuple[int, str]]:
    """(index, path) for `count` new files class_<i>.png from index `start`, skipping names already taken."""
    out, index = [], start
    while len(out) < count:
        path = os.path.join(folder, f"class_{index:05d}.png")
        if not os.path.exists(path):
            out.append((index, path))
        index += 1
    return out


def _save_png(image, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def generate_class_images(family, *, folders: list[ClassFolder], width: int, height: int, seed: int = 0,
                          steps: int = 30, scale: float = 7.5, sampler: str = "ddim", device: Any = "cpu",
                          dtype: Any = None, clip_skip: int | None = None,
                          on_image: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Make the missing images of each folder with the family's in-memory model (a sd_scripts.families Family) and
    its sample pipeline; returns the new paths.

    Runs in eval mode under no_grad (autocast for half `dtype`); the caller's RNG states and module modes are kept.
    `on_image(path, done, total)` is called after each image. `clip_skip` applies where the family has it.
    """
    import torch

    from ..training.sampling import SamplePrompt, eval_mode, preserved_rng_states

    total = sum(f.missing for f in folders)
    if total == 0:
        return []
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    autocast = torch.autocast(device.type, dtype=dtype) if half else nullcontext()
    paths: list[str] = []
    with preserved_rng_states(), eval_mode(family.sample_modules(), device), torch.no_grad(), autocast:
        sampling = family.sample_pipeline(sampler, clip_skip=clip_skip)
        for folder in folders:
            if not folder.missing:
                continue
            prompt_kwargs = sampling.inputs(SamplePrompt(prompt=folder.prompt, negative_prompt=""), device)
            for index, path in _free_names(folder.path, folder.existing, folder.missing):
                generator = torch.Generator("cpu").manual_seed(image_seed(seed, folder.path, index))
                image = sampling.pipeline(**prompt_kwargs, width=width, height=height, num_inference_steps=steps,
                                          guidance_scale=scale, generator=generator, output_type="pil").images[0]
                _save_png(image, path)
                paths.append(path)
                if on_image:
                    on_image(path, len(paths), total)
        del sampling
    return paths


def ensure_class_images(bundle, reg_data_dir: str, num_class_images: int, *, class_prompt: str | None = None,
                        resolution: tuple[int, int] = (512, 512), seed: int = 0, steps: int = 30, scale: float = 7.5,
                        sampler: str = "ddim", device: Any = "cpu", dtype: Any = None,
                        clip_skip: int | None = None) -> list[str]:
    """Fill every reg concept folder up to `num_class_images` with images from `bundle` (a ModelBundle of any
    family, through that family's sample pipeline)."""
    folders = plan_class_images(reg_data_dir, num_class_images, class_prompt)
    total = sum(f.missing for f in folders)
    if not total:
        log.info("class images: every folder in %s holds %d or more images", reg_data_dir, num_class_images)
        return []
    for f in folders:
        if f.missing:
            log.info("class images: %s has %d, generating %d with prompt %r", f.path, f.existing, f.missing, f.prompt)

    def report(path: str, done: int, total: int) -> None:
        log.info("class image %d/%d: %s", done, total, path)

    width, height = resolution
    from ..families import family_class

    return generate_class_images(family_class(bundle.family)(bundle), folders=folders, width=width, height=height,
                                 seed=seed, steps=steps, scale=scale, sampler=sampler, device=device, dtype=dtype,
                                 clip_skip=clip_skip, on_image=report)


def main(argv: list[str] | None = None) -> int:
    from ..options import parse_resolution
    from ..training.sampling import SAMPLER_NAMES

    parser = argparse.ArgumentParser(prog="python -m sd_scripts.tools.class_images",
                                     description="Generate missing DreamBooth class images with the base model.")
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="single-file model or diffusers folder")
    parser.add_argument("--reg_data_dir", required=True, help="parent of '<repeats>_<class tokens>' folders")
    parser.add_argument("--num_class_images", type=int, required=True, help="images each folder should hold")
    parser.add_argument("--class_prompt", help="prompt (default: each folder's class tokens)")
    parser.add_argument("--resolution", default="512", help="SIZE or WIDTH,HEIGHT (default 512)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLER_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", help="VAE to use instead of the model's")
    parser.add_argument("--clip_skip", type=int)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        import torch

        from ..models.loading import load_model
        from ..training.methods import compute_dtype

        if args.num_class_images < 1:
            raise UserError("--num_class_images must be 1 or more")
        try:
            resolution = parse_resolution(args.resolution)
        except ValueError as e:
            raise UserError(f"--resolution: {e}") from None
        folders = plan_class_images(args.reg_data_dir, args.num_class_images, args.class_prompt)
        if not any(f.missing for f in folders):
            print(f"nothing to do: every folder holds {args.num_class_images} or more images")
            return 0
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = compute_dtype(args.mixed_precision)
        bundle = load_model(args.pretrained_model_name_or_path, vae=args.vae)
        for part in (bundle.denoiser, *bundle.text_encoders, bundle.vae):
            part.to(device)
        paths = ensure_class_images(bundle, args.reg_data_dir, args.num_class_images, class_prompt=args.class_prompt,
                                    resolution=resolution, seed=args.seed, steps=args.steps, scale=args.scale,
                                    sampler=args.sampler, device=device, dtype=dtype, clip_skip=args.clip_skip)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"generated {len(paths)} class image(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
