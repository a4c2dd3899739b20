"""kohya_gui.gui_config: config.toml checked against the schema; the committed file documents every option."""
import os

from kohya_gui import gui_config
from kohya_gui.command import AccelerateSettings
from sd_scripts import options


def test_committed_config_toml_is_up_to_date_and_documents_every_option():
    with open(gui_config.DEFAULT_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == gui_config.default_config_text(), "run: python -m kohya_gui.gui_config --write"
    for opt in options.OPTIONS:
        if opt.secret:  # documented, but never as a key of the file
            assert f"# {opt.name}: a secret" in committed and f"{opt.name} =" not in committed, opt.name
        elif opt.name not in ("events_file", "control_dir"):
            assert f"# {opt.name} = " in committed, opt.name
    for section in list(options.GROUPS) + ["gui", "accelerate_launch", "lora", "dreambooth", "finetune", "ti"]:
        assert f"[{section}]" in committed or section == "logging" and "[logging]" in committed


def test_committed_config_loads_cleanly_and_so_does_every_line_uncommented(tmp_path):
    cfg = gui_config.load_gui_config(gui_config.DEFAULT_PATH)
    assert cfg.problems == [] and cfg.unknown_keys == []
    text = "\n".join(line[2:] if line.startswith("# ") and " = " in line and "(unset)" not in line else line
                     for line in gui_config.default_config_text().splitlines())
    path = tmp_path / "all.toml"
    path.write_text(text)
    cfg = gui_config.load_gui_config(str(path))
    assert cfg.problems == [], cfg.problems
    assert cfg.defaults_for("lora")["network_dim"] == 16  # the kind section wins over the option groups


def test_unknown_keys_and_sections_are_reported_by_name(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[training]\nlearning_rte = 1e-4\nmax_train_steps = 5\n[gui]\nport = 1\n'
                    '[accelerate_launch]\nnum_gpus = 2\n[sdxl]\nno_half_vae = true\n[lora]\nnetwork_dim = 0\n')
    cfg = gui_config.load_gui_config(str(path))
    assert set(cfg.unknown_keys) == {"training.learning_rte", "gui.port", "accelerate_launch.num_gpus", "sdxl"}
    assert any("network_dim" in p for p in cfg.problems)  # a bad value is reported too
    assert cfg.values["training"] == {"max_train_steps": 5}


def test_defaults_layering_and_settings(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[gui]\njobs_dir = "/abs/jobs"\ndemo_dir = "rel"\n[accelerate_launch]\nnum_processes = 2\n'
                    'multi_gpu = true\n[optimizer]\nlearning_rate = 0.5\n[dreambooth]\nlearning_rate = 0.25\n'
                    '[caption]\ncaption_extention = ".cap"\n')
    cfg = gui_config.load_gui_config(str(path))
    assert cfg.problems == []
    assert cfg.defaults_for("lora")["learning_rate"] == 0.5  # group section beats the built-in kind default
    assert cfg.defaults_for("dreambooth")["learning_rate"] == 0.25  # [kind] beats the group section
    assert cfg.defaults_for("ti")["caption_extension"] == ".cap"  # sd-scripts spelling accepted
    assert "network_dim" not in cfg.defaults_for("dreambooth")
    assert cfg.defaults_for("finetune")["max_train_steps"] == 1600  # schema default
    assert cfg.accelerate() == AccelerateSettings(num_processes=2, multi_gpu=True)
    assert cfg.path_setting("jobs_dir") == "/abs/jobs"
    assert cfg.path_setting("demo_dir") == os.path.join(gui_config.REPO_ROOT, "rel")
    assert gui_config.load_gui_config(str(tmp_path / "missing.toml")).gui("server_port") == 7860


def test_invalid_toml_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[gui\n")
    assert "not valid TOML" in gui_config.load_gui_config(str(path)).problems[0]
