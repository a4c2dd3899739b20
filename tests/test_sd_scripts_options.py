"""Every option of sd-scripts' trainer scripts (48d368f, taken from each script's own argument parser and kept as
data in tests/data/sd_scripts_options/) is accepted by our script of the same name, with the same default (or a
default that means the same, listed below); options that cannot mean anything here are accepted and refused with the
reason when set (Option.refused, tests/test_compat_options.py).

NOT_YET lists what is still missing; it may only shrink: an entry that is accepted now fails the test, so whoever
adds an option removes it here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_scripts.options import BY_NAME

DATA = Path(__file__).parent / "data" / "sd_scripts_options"
KIND = {"train_network": "network", "sdxl_train_network": "network", "flux_train_network": "network",
        "sd3_train_network": "network", "train_db": "db", "fine_tune": "finetune", "sdxl_train": "finetune",
        "flux_train": "finetune", "sd3_train": "finetune", "train_textual_inversion": "ti",
        "sdxl_train_textual_inversion": "ti", "lumina_train_network": "network", "lumina_train": "finetune",
        "hunyuan_image_train_network": "network", "anima_train_network": "network",
        "anima_train": "finetune"}
ALIASES = {alias: o.name for o in BY_NAME.values() for alias in o.aliases}
# (sd-scripts' default, ours): the same meaning
SAME_MEANING = {
    "bucket_reso_steps": "None here = the family's own step (64 for SD 1.x/2.x, sd-scripts' default)",
    "caption_extention": "the misspelt alias of caption_extension, whose default is sd-scripts' '.caption'",
    "console_log_level": "None there = INFO",
    "optimizer_type": "'' there = AdamW",
    "resolution": "None there is refused at start; 512 is sd-scripts' documented default size",
    "save_model_as": "None there = safetensors",
    "model_type": "None here = what the model file says (flux or chroma); given, it must match",
    "network_dim": "None there = 4 in create_network",
    "network_module": "required there; networks.lora (or the family's own LoRA) here",
    "t5xxl_max_token_length": "None here = the family's: 256 for SD3 (sd3_* scripts' default), FLUX.1 256 schnell "
                              "/ 512 dev (flux_* scripts' None)",
    "timestep_sampling": "None here = the family's: sigma for FLUX.1 and HunyuanImage-2.1, shift for Lumina, "
                         "sigmoid for Anima (each script's default)",
    "model_prediction_type": "None here = the family's: sigma_scaled for FLUX.1, raw for Lumina and "
                             "HunyuanImage-2.1 (each script's)",
    "discrete_flow_shift": "None here = the family's: 3.0 for FLUX.1, 6.0 for Lumina, 5.0 for HunyuanImage-2.1, "
                           "1.0 for Anima (each script's)",
}
NOT_YET = {
}


def _scripts():
    return sorted(p.stem for p in DATA.glob("*.json"))


def _ours(name: str):
    return BY_NAME.get(name) or BY_NAME.get(ALIASES.get(name, ""))


def _accepted(name: str, kind: str) -> bool:
    if name == "config_file":  # read by parse_args itself
        return True
    option = _ours(name)
    return option is not None and kind in option.trainers


@pytest.mark.parametrize("script", _scripts())
def test_every_sd_scripts_option_is_accepted_with_its_default(script):
    data = json.loads((DATA / f"{script}.json").read_text())
    kind = KIND[script]
    missing = sorted(n for n in data["options"] if not _accepted(n, kind) and n not in NOT_YET)
    assert not missing, f"{script}: sd-scripts options our parser does not take: {missing}"
    for name, row in data["options"].items():
        ours = _ours(name)
        if ours is None or name in SAME_MEANING or row["action"] == "_StoreTrueAction":
            continue
        theirs = row["default"]
        same = theirs == ours.default or (isinstance(theirs, (int, float)) and isinstance(ours.default, (int, float))
                                          and float(theirs) == float(ours.default))
        assert same, f"{script}: option {name} defaults to {ours.default!r} here, {theirs!r} in sd-scripts"


def test_not_yet_only_lists_what_is_missing():
    accepted_now = sorted(n for n in NOT_YET if any(
        n in json.loads((DATA / f"{s}.json").read_text())["options"] and _accepted(n, KIND[s]) for s in _scripts()))
    assert not accepted_now, f"accepted now, remove from NOT_YET: {accepted_now}"
