"""Every training config kohya_ss ships (its presets/ and test/config/ JSON files, tests/data/kohya_ss/shipped/, see
the README there) imports with nothing that carries a setting dropped, and its command builds and passes the
trainer's own option check (the schema reading the run TOML, then the family's refusals).

What an import may leave out, each with the reason in its report: a field of another model family's kohya_ss widgets
or of another tab (kohya_ss does not pass it either), an option the family has no use for (sd-scripts ignores it
too), and an invalid value sd-scripts refuses as well (some of kohya_ss's own test configs have bucket_reso_steps 1)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from kohya_gui import presets
from kohya_gui.command import build_command, split_accelerate
from test_gui_presets import _accounted, trainer_check

SHIPPED = Path(__file__).parent / "data" / "kohya_ss" / "shipped"
NOT_DROPPED = ("kohya_ss does not use it either", "does not apply to", "not used for ", "sd-scripts refuses it too")


def _configs() -> list[str]:
    return sorted(str(p.relative_to(SHIPPED)) for p in SHIPPED.rglob("*.json"))


def _kind(relative: str) -> str:
    """The kohya_ss tab a config belongs to, as ours: its presets folder, else its test file's name. kohya_ss's
    DreamBooth tab on SD3 runs sd3_train: our fine-tune kind (it reads the same concept folders)."""
    folder, name = os.path.basename(os.path.dirname(relative)), os.path.basename(relative)
    if folder == "dreambooth" and "sd3" in name:
        return "finetune"
    if folder in ("lora", "dreambooth", "finetune"):
        return folder
    for prefix, kind in (("TI-", "ti"), ("dreambooth", "dreambooth"), ("finetune", "finetune")):
        if name.startswith(prefix):
            return kind
    return "lora"


def test_every_shipped_config_is_here():
    assert len(_configs()) == 68  # kohya_ss 45088f04: 37 presets + 31 test configs (its caption metadata left out)


@pytest.mark.parametrize("relative", _configs())
def test_shipped_config_imports_and_passes_the_trainer_check(relative, tmp_path):
    path, kind = str(SHIPPED / relative), _kind(relative)
    report: dict = {}
    values, unknown = presets.import_kohya_json(path, kind, report=report)
    _accounted(path, kind, report, values, unknown)
    dropped = [u for u in unknown if not any(reason in u for reason in NOT_DROPPED)]
    assert not dropped, f"{relative}: settings dropped: {dropped}"
    rest, accel = split_accelerate(values)
    cmd = build_command(kind, rest, accel, str(tmp_path / "job"))
    assert trainer_check(cmd, tmp_path) is None
