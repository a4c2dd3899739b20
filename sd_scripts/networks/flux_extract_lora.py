"""sd-scripts' `flux_extract_lora` command line, served by `extract_lora_from_models` (one tool for every model
family; the family is read from the files): `python networks/flux_extract_lora.py ...` runs as
`python -m sd_scripts.networks.flux_extract_lora ...`.
"""
from __future__ import annotations

from .extract_lora_from_models import OPTIONS, main as _main  # noqa: F401  (OPTIONS: the declared options, for forms)


def main(argv=None) -> int:
    return _main(argv, prog="flux_extract_lora")


if __name__ == "__main__":
    raise SystemExit(main())
