"""Bundled textual-inversion presets (presets/ti): they load cleanly, store only changes, and the demo is runnable."""
import json
import os

from kohya_gui import presets
from kohya_gui.command import build_command, split_accelerate
from sd_scripts import options
from sd_scripts.options import parse_args

BUNDLED = ["SD1.5 embedding", "SD1.5 style embedding (templates)", "Demo (tiny model, CPU)"]


def test_bundled_ti_presets_load_cleanly_and_build_a_command(tmp_path):
    names = presets.list_presets("ti", user_dir=str(tmp_path))
    assert set(BUNDLED) <= set(names)
    for name in names:
        values = presets.load_preset("ti", name, user_dir=str(tmp_path), demo_dir=str(tmp_path / "demo"),
                                     make_demo=False)
        assert values.unknown_keys == [], (name, values.unknown_keys)
        rest, accel = split_accelerate(values)
        cmd = build_command("ti", rest, accel, str(tmp_path / name.replace(" ", "_")))
        assert "sd_scripts.train_textual_inversion" in cmd.argv and "--config_file" in cmd.argv


def test_ti_preset_files_have_a_version_and_only_changed_keys():
    folder = os.path.join(presets.BUNDLED_DIR, "ti")
    for entry in os.listdir(folder):
        data = json.load(open(os.path.join(folder, entry)))
        assert data["schema_version"] == presets.SCHEMA_VERSION and data["kind"] == "ti"
        for key, value in data["values"].items():
            if key in options.BY_NAME:
                assert value != options.BY_NAME[key].default, (entry, key)
                assert options.BY_NAME[key].applies_to("ti"), (entry, key)


def test_demo_preset_is_a_valid_ti_run(tmp_path):
    values = presets.load_preset("ti", "Demo (tiny model, CPU)", user_dir=str(tmp_path),
                                 demo_dir=str(tmp_path / "demo"), make_demo=False)
    assert values["pretrained_model_name_or_path"] == str(tmp_path / "demo" / "model" / "tiny-sd1.safetensors")
    assert values["accelerate.cpu"] is True and values["token_string"] == "demotok"
    rest, _ = split_accelerate(values)
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(options.dump_toml({k: v for k, v in rest.items() if k in options.BY_NAME}, "ti"))
    args = parse_args("ti", ["--config_file", str(run_toml)])
    assert args.use_object_template and args.num_vectors_per_token == 2 and args.learning_rate == 0.005
