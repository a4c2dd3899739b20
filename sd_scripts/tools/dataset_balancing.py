"""Dataset balancing (kohya_ss Utilities > Dataset balancing): give every concept folder the repeats that make each
concept about the same number of image draws per epoch.

    python -m sd_scripts.tools.dataset_balancing TRAIN_DATA_DIR [--concept_repeats 1000] [--insecure] [--dry_run]

For each `<repeats>_<name>` folder of TRAIN_DATA_DIR holding N images: repeats = max(1, round(concept_repeats / N)),
and the folder is renamed `<repeats>_<name>`. A name starting with `{F}` (e.g. `{2.5}10_dog`) multiplies that
folder's share by F; the `{F}` is removed. Other folders are skipped unless `--insecure` (then they get the repeats
prefix too). A folder without images, or whose new name exists already, is left as it is (warned). `--dry_run`
prints the renames without doing them.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass

from ..data.images import list_images
from ..errors import UserError
from .tool_cli import ToolOption, require_dir, run_tool

log = logging.getLogger(__name__)

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("train_data_dir", str, None, "parent folder of the concept folders", positional=True, required=True,
               path="dir"),
    ToolOption("concept_repeats", int, 1000, "image draws per concept per epoch (images x repeats)"),
    ToolOption("insecure", bool, False, "also rename folders that are not '<repeats>_<name>'"),
    ToolOption("dry_run", bool, False, "print the renames only"),
)

_WEIGHT = re.compile(r"^\{(\d+(?:\.\d*)?)\}")
_REPEATS = re.compile(r"^\d+_")


@dataclass(frozen=True)
class Rename:
    old: str
    new: str
    images: int
    repeats: int


def plan_balancing(folder: str, concept_repeats: int, insecure: bool = False) -> list[Rename]:
    """The renames that balance `folder`'s concept folders (nothing is changed)."""
    require_dir(folder, "train_data_dir")
    if concept_repeats < 1:
        raise UserError(f"--concept_repeats must be a positive number, not {concept_repeats}")
    plan = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        weight = _WEIGHT.match(name)
        bare = name[weight.end():] if weight else name
        if not _REPEATS.match(bare) and not insecure:
            log.info("skipping %s: not a '<repeats>_<name>' folder (--insecure renames it too)", name)
            continue
        images = len(list_images(path))
        if images == 0:
            log.warning("%s has no images; left as it is", path)
            continue
        factor = float(weight.group(1)) if weight else 1.0
        repeats = max(1, round(concept_repeats / images * factor))
        rest = bare[_REPEATS.match(bare).end():] if _REPEATS.match(bare) else bare
        plan.append(Rename(name, f"{repeats}_{rest}", images, repeats))
    return plan


def run(args) -> None:
    plan = plan_balancing(args.train_data_dir, args.concept_repeats, args.insecure)
    for r in plan:
        old, new = (os.path.join(args.train_data_dir, n) for n in (r.old, r.new))
        print(f"{r.old} -> {r.new} ({r.images} images x {r.repeats} repeats)")
        if args.dry_run or r.old == r.new:
            continue
        if os.path.exists(new):
            log.warning("%s exists already; %s is left as it is", new, old)
            continue
        os.rename(old, new)


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.tools.dataset_balancing",
                    "Set each concept folder's repeats from its image count.", OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
