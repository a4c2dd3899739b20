"""sd-scripts' `sdxl_merge_lora` command line, served by `merge_lora` (one tool for every model family; the
family is read from the files): `python networks/sdxl_merge_lora.py ...` runs as
`python -m sd_scripts.networks.sdxl_merge_lora ...`.
"""
from __future__ import annotations

from .merge_lora import OPTIONS, main as _main  # noqa: F401  (OPTIONS: the declared options, for forms)


def main(argv=None) -> int:
    return _main(argv, prog="sdxl_merge_lora")


if __name__ == "__main__":
    raise SystemExit(main())
