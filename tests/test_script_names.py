"""Every sd-scripts trainer script we re-implement has a module of the same name, so `X.py` in a command line becomes
`-m sd_scripts.X`; a family's own script takes that family's models only, naming the right script otherwise."""
from __future__ import annotations

import importlib

import pytest

from sd_scripts.families import all_families

GENERIC = ("train_network", "train_db", "fine_tune", "train_textual_inversion")


def _scripts() -> list[str]:
    names = list(GENERIC)
    for spec in all_families().values():
        names += [s for s in spec.scripts if s not in names]
    return names


@pytest.mark.parametrize("script", _scripts())
def test_each_script_name_is_a_module_with_help(script, capsys):
    module = importlib.import_module(f"sd_scripts.{script}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert f"usage: {script}" in capsys.readouterr().out


def test_sdxl_scripts_refuse_an_sd1_model_naming_the_generic_one(capsys, tiny_sd1, demo_data, tmp_path):
    from sd_scripts import sdxl_train, sdxl_train_network

    args = ["--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", str(demo_data),
            "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "1"]
    for module, script in ((sdxl_train_network, "sdxl_train_network"), (sdxl_train, "sdxl_train")):
        assert module.main(args) == 1
        err = capsys.readouterr().err
        assert f"but {script} trains Stable Diffusion XL models" in err and "generic script" in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors"))


def test_fine_tune_keeps_needing_metadata_where_sd_scripts_does(tmp_path):
    """sd-scripts' fine_tune reads in_json only; sdxl_train / sd3_train / flux_train also read concept folders."""
    from sd_scripts.options import OptionError, parse_args
    from sd_scripts.training.full_methods import FineTuneMethod, FolderFineTuneMethod

    base = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path), "--train_data_dir",
            str(tmp_path)]
    with pytest.raises(OptionError, match="in_json"):
        FineTuneMethod(parse_args("finetune", base))
    with pytest.raises(OptionError, match="reg_data_dir"):
        FineTuneMethod(parse_args("finetune", [*base, "--in_json", "m.json", "--reg_data_dir", str(tmp_path)]))
    FolderFineTuneMethod(parse_args("finetune", [*base, "--reg_data_dir", str(tmp_path)]))
