"""kohya_ss configs of every LoRA type we train import as the network_module and network_args kohya_ss runs; the
others are refused naming the type. The imported values are checked by the trainers' own option parser and the
network module's network_args parser (so an arg the network would refuse fails here)."""
from __future__ import annotations

import json

import pytest

from kohya_gui import presets
from kohya_gui.lora_types import KOHYA_LORA_TYPES, REFUSED_LORA_TYPES

# kohya_ss fields as its GUI saves them (its defaults, some changed)
FIELDS = {
    "LyCORIS_preset": "full", "conv_dim": 8, "conv_alpha": 4, "use_tucker": True, "use_cp": False, "use_scalar": False,
    "rank_dropout": 0.1, "module_dropout": 0, "rank_dropout_scale": False, "train_norm": False, "bypass_mode": False,
    "dora_wd": True, "factor": 8, "decompose_both": False, "constrain": 0.0, "rescaled": False, "unit": 4,
    "train_on_input": True, "network_dim": 16, "network_alpha": 8,
    "pretrained_model_name_or_path": "/m/sd15.safetensors",
}

EXPECTED = {
    "LyCORIS/LoCon": ("lycoris.kohya", ["algo=locon", "preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=True",
                                        "rank_dropout=0.1", "bypass_mode=False", "dora_wd=True", "module_dropout=0",
                                        "use_scalar=False", "rank_dropout_scale=False", "train_norm=False"]),
    "LoCon": ("lycoris.kohya", None),
    "LyCORIS/LoHa": ("lycoris.kohya", None),
    "LyCORIS/LoKr": ("lycoris.kohya", ["algo=lokr", "preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=True",
                                       "rank_dropout=0.1", "bypass_mode=False", "dora_wd=True", "module_dropout=0",
                                       "factor=8", "use_cp=False", "use_scalar=False", "decompose_both=False",
                                       "rank_dropout_scale=False", "train_norm=False"]),
    "LyCORIS/iA3": ("lycoris.kohya", ["algo=ia3", "preset=full", "conv_dim=8", "conv_alpha=4", "train_on_input=True"]),
    "LyCORIS/GLoRA": ("lycoris.kohya", None),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", None),
    "LyCORIS/BOFT": ("lycoris.kohya", None),
    "LyCORIS/DyLoRA": ("lycoris.kohya", None),
    "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", ["algo=full", "preset=full", "rank_dropout=0.1",
                                                     "module_dropout=0", "rank_dropout_scale=False",
                                                     "train_norm=False"]),
    "Kohya LoHa": ("networks.loha", ["conv_dim=8", "conv_alpha=4", "use_tucker=True", "rank_dropout=0.1"]),
    "Kohya LoKr": ("networks.lokr", ["conv_dim=8", "conv_alpha=4", "use_tucker=True", "factor=8", "rank_dropout=0.1"]),
    "Standard": (None, ["rank_dropout=0.1"]),
    "Kohya LoCon": (None, ["rank_dropout=0.1", "conv_dim=8", "conv_alpha=4"]),
}
ALGO = {"LoCon": "locon", "LyCORIS/LoCon": "locon", "LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr",
        "LyCORIS/iA3": "ia3", "LyCORIS/GLoRA": "glora", "LyCORIS/Diag-OFT": "diag-oft", "LyCORIS/BOFT": "boft",
        "LyCORIS/DyLoRA": "dylora", "LyCORIS/Native Fine-Tuning": "full"}


@pytest.mark.parametrize("lora_type", sorted(set(KOHYA_LORA_TYPES) - {"Flux1"}))
def test_each_trained_lora_type_imports_as_its_network(tmp_path, lora_type):
    from sd_scripts.networks.registry import resolve_network_module
    from sd_scripts.options import parse_args

    path = tmp_path / "kohya.json"
    path.write_text(json.dumps(dict(FIELDS, LoRA_type=lora_type)))
    report: dict[str, str] = {}
    values, unknown = presets.import_kohya_json(str(path), report=report)
    module, args = EXPECTED[lora_type]
    assert values.get("network_module") == module
    if args is not None:
        assert values["network_args"] == args
    if module == "lycoris.kohya":
        assert values["network_args"][0] == f"algo={ALGO[lora_type]}"
    # nothing kohya_ss passes is lost: no used field is reported unknown
    assert not [u for u in unknown if u.split(" ")[0] in FIELDS]
    # the trainer's parser takes the values, and the network module accepts its args
    argv = ["--pretrained_model_name_or_path", "m", "--network_module", values.get("network_module", "networks.lora"),
            "--network_args", *values["network_args"]]
    parse_args("network", argv)
    network = resolve_network_module(values.get("network_module", "networks.lora"))
    if hasattr(network, "NETWORK_ARG_TYPES") and module is not None:
        from sd_scripts.networks.adapter_network import parse_typed_args

        parse_typed_args(values["network_args"], network.NETWORK_ARG_TYPES, module)


@pytest.mark.parametrize("lora_type", sorted(REFUSED_LORA_TYPES) + ["Made Up"])
def test_other_lora_types_are_refused_naming_the_type(tmp_path, lora_type):
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps(dict(FIELDS, LoRA_type=lora_type)))
    with pytest.raises(presets.PresetError, match=f"LoRA_type {lora_type!r} is not supported"):
        presets.import_kohya_json(str(path))
