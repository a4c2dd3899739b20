"""The optimizer and schedule options as users write them (command line, TOML, kohya_ss GUI JSON): sd-scripts'
spellings are read to the values the trainer uses."""
from __future__ import annotations

import json

import pytest

from kohya_gui import presets
from kohya_gui.command import build_command, split_accelerate
from sd_scripts import options


def test_sd_scripts_spellings_parse(tmp_path):
    args = options.parse_args("network", ["--optimizer_type", "prodigyplus.ProdigyPlusScheduleFree",
                                          "--lr_warmup_steps", "5%", "--lr_decay_steps", "30",
                                          "--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "40",
                                          "--lr_scheduler_args", "last_epoch=-1", "--use_lion_optimizer"])
    assert (args.optimizer_type, args.lr_warmup_steps, args.lr_decay_steps) == \
        ("prodigyplus.ProdigyPlusScheduleFree", 0.05, 30)
    assert args.lr_scheduler_timescale == 40 and args.lr_scheduler_args == ["last_epoch=-1"]
    assert args.use_lion_optimizer is True and args.lr_scheduler_type == ""
    toml = tmp_path / "run.toml"  # sd-scripts' TOML writes one number for text_encoder_lr, or a list
    toml.write_text("[optimizer]\ntext_encoder_lr = 5e-5\nlr_scheduler = 'warmup_stable_decay'\n"
                    "lr_scheduler_min_lr_ratio = 0.1\noptimizer_type = 'DAdaptAdam'\n")
    args = options.parse_args("network", ["--config_file", str(toml)])
    assert args.text_encoder_lr == [5e-5] and args.lr_scheduler_min_lr_ratio == 0.1
    toml.write_text("text_encoder_lr = [1e-4, 5e-5]\n")
    assert options.parse_args("network", ["--config_file", str(toml)]).text_encoder_lr == [1e-4, 5e-5]
    for bad, word in ((["--optimizer_type", "Adam W"], "optimizer_type"),
                      (["--lr_scheduler", "cosine_annealing"], "lr_scheduler"),
                      (["--lr_scheduler_min_lr_ratio", "2"], "lr_scheduler_min_lr_ratio")):
        with pytest.raises(options.OptionError, match=word):
            options.parse_args("network", bad)


@pytest.mark.parametrize("fields, expected, reported", [
    ({"learning_rate_te1": 1e-5, "learning_rate_te2": 2e-5}, [1e-5, 2e-5], []),
    ({"learning_rate_te1": 0, "learning_rate_te2": 2e-5}, [0.0, 2e-5], []),  # te1 0: that encoder is not trained
    ({"text_encoder_lr": 5e-5, "t5xxl_lr": 1e-5}, [5e-5, 1e-5], []),  # kohya_ss: [text_encoder_lr, t5xxl_lr]
    ({"text_encoder_lr": 5e-5, "learning_rate_te1": 1e-5}, [5e-5], ["learning_rate_te1"]),
    ({"t5xxl_lr": 1e-5}, None, ["t5xxl_lr"]),
])
def test_kohya_ss_text_encoder_rates_import_as_text_encoder_lr(tmp_path, fields, expected, reported):
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps({"learning_rate": 1e-4, "network_dim": 8, **fields}))
    report: dict = {}
    values, unknown = presets.import_kohya_json(str(path), "lora", report=report)
    assert values.get("text_encoder_lr") == expected
    assert [u.split(" (")[0] for u in unknown] == reported
    assert all(report[k] in ("imported", "reported") for k in fields)
    if expected:  # the run TOML the GUI writes gives the trainer the same rates
        rest, accel = split_accelerate(values)
        cmd = build_command("lora", {**rest, "pretrained_model_name_or_path": "/m.safetensors"}, accel,
                            str(tmp_path / "job"))
        toml = tmp_path / "run.toml"
        toml.write_text(cmd.toml_text)
        assert options.parse_args("network", ["--config_file", str(toml)]).text_encoder_lr == expected


def test_gui_memory_estimate_follows_the_optimizers_state_size():
    """The pre-flight estimate of a full fine-tune counts the optimizer's own state (registry.state_bytes, the
    figures benchmarks/optimizer_step.py measures): Adafactor's factored state < AdamW8bit's < AdamW's < Prodigy's."""
    from kohya_gui.preflight import estimate_memory_gb

    def gb(**values):
        return estimate_memory_gb("db", "sd1", values)

    assert gb(optimizer_type="Adafactor") < gb(optimizer_type="AdamW8bit") < gb() < gb(optimizer_type="Prodigy")
    assert gb(use_8bit_adam=True) == gb(optimizer_type="AdamW8bit") and gb(use_lion_optimizer=True) == gb(
        optimizer_type="Lion")
    assert gb(optimizer_type="pytorch_optimizer.CAME") == gb()  # not in the table: counted as AdamW


def test_gui_offers_the_known_optimizers_and_takes_any_other():
    import gradio as gr

    from kohya_gui.components.widgets import make_widget, to_option_value

    opt = options.BY_NAME["optimizer_type"]
    widget = make_widget(opt, "AdamW", "lora")
    assert isinstance(widget, gr.Dropdown) and widget.allow_custom_value
    offered = [c[1] if isinstance(c, tuple) else c for c in widget.choices]
    assert {"AdamW", "Prodigy", "Adafactor", "AdamWScheduleFree", "pytorch_optimizer.CAME"} <= set(offered)
    assert to_option_value(opt, "torch.optim.NAdam") == "torch.optim.NAdam"


def test_the_files_metadata_names_the_optimizer_the_flags_chose():
    from sd_scripts.training.metadata import build_training_metadata

    def ss_optimizer(*argv):
        args = options.parse_args("network", ["--output_dir", "out", *argv])
        return build_training_metadata(args, family="sd1", v_prediction=False, resolution=(512, 512),
                                       dataset_summary={}, total_steps=1, epoch=1, step=1, started_at=0.0,
                                       finished_at=1.0, sd_model_name="m")["ss_optimizer"]

    assert ss_optimizer("--use_8bit_adam") == "AdamW8bit"
    assert ss_optimizer("--use_lion_optimizer", "--optimizer_args", "weight_decay=0.1") == "Lion(weight_decay=0.1)"
    assert ss_optimizer("--optimizer_type", "Prodigy") == "Prodigy"


def test_help_prints_every_trainers_options():
    """argparse formats help with %: an option's help holding one ('10%') must not break --help."""
    for trainer in options.TRAINERS:
        text = options.build_parser(trainer).format_help()
        assert "--optimizer_type" in text and "'N%'" in text
