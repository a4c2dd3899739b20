"""kohya_gui.command: values -> run TOML + argv, for every kind; literal values, no shell, clear field errors."""
import json
import os
import subprocess
import sys

import pytest

from kohya_gui import command
from kohya_gui.command import AccelerateSettings, CommandError, build_command, format_command
from sd_scripts import options

EVIL = ["; touch {sentinel}", "$(touch {sentinel})", "`touch {sentinel}`", "it's \"quoted\" and spaced  ",
        "a\\b\\\\c", "ünïcödé ✓", "--not_a_flag", "${HOME} & | > <"]


def _readback(cmd, tmp_path):
    os.makedirs(os.path.dirname(cmd.toml_path), exist_ok=True)
    with open(cmd.toml_path, "w", encoding="utf-8") as f:
        f.write(cmd.toml_text)
    return vars(options.parse_args(cmd.trainer, ["--config_file", cmd.toml_path]))


@pytest.mark.parametrize("kind", sorted(command.KIND_TO_TRAINER))
def test_every_kind_builds_an_accelerate_module_launch(kind, tmp_path):
    job = tmp_path / "job 1"
    values = {"pretrained_model_name_or_path": str(tmp_path / "model.safetensors"), "learning_rate": "1e-4",
              "max_train_steps": 10.0, "train_data_dir": str(tmp_path / "img"), "output_dir": str(tmp_path / "o"),
              "resolution": "640,448", "mixed_precision": "bf16"}
    cmd = build_command(kind, values, AccelerateSettings(), str(job), python="/py/bin/python")
    trainer = command.KIND_TO_TRAINER[kind]
    assert cmd.argv[:3] == ["/py/bin/python", "-m", "accelerate.commands.launch"]
    i = cmd.argv.index("-m", 3)
    assert cmd.argv[i + 1] == command.TRAINER_MODULES[trainer]
    assert cmd.argv[i + 2:] == ["--config_file", str(job / "run.toml"), "--events_file", str(job / "events.jsonl"),
                                "--control_dir", str(job)]
    assert cmd.argv[cmd.argv.index("--mixed_precision") + 1] == "bf16"
    back = _readback(cmd, tmp_path)
    assert back["learning_rate"] == 1e-4 and back["max_train_steps"] == 10 and back["resolution"] == "640,448"
    assert back["mixed_precision"] == "bf16" and back["train_data_dir"] == str(tmp_path / "img")


def test_argv_is_understood_by_accelerates_own_parser(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    accel = AccelerateSettings(num_processes=2, multi_gpu=True, gpu_ids="0,1", main_process_port=29555,
                               extra_args=["--same_network"])
    cmd = build_command("lora", {}, accel, str(tmp_path / "j"))
    args = launch_command_parser().parse_args(cmd.argv[3:])
    assert args.module and args.training_script == "sd_scripts.train_network"
    assert (args.num_processes, args.multi_gpu, args.gpu_ids, args.main_process_port) == (2, True, "0,1", 29555)
    assert args.same_network
    assert args.training_script_args[0] == "--config_file"


def test_accelerate_config_file_only_passes_changed_settings(tmp_path):
    cmd = build_command("lora", {}, AccelerateSettings(config_file="/cfg/ds.yaml", num_processes=4), str(tmp_path))
    head = cmd.argv[3:cmd.argv.index("-m", 3)]
    assert head == ["--config_file", "/cfg/ds.yaml", "--num_processes", "4"]


def test_accelerate_mixed_precision_wins_and_reaches_the_toml(tmp_path):
    cmd = build_command("lora", {"mixed_precision": "no"}, AccelerateSettings(mixed_precision="fp16"), str(tmp_path))
    assert cmd.argv[cmd.argv.index("--mixed_precision") + 1] == "fp16"
    assert _readback(cmd, tmp_path)["mixed_precision"] == "fp16"


def test_injection_strings_stay_literal_and_nothing_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    texts = [t.replace("{sentinel}", str(sentinel)) for t in EVIL]
    job = tmp_path / texts[1]  # a job folder whose name is an injection attempt
    values = {"output_name": texts[0], "training_comment": texts[2], "metadata_title": texts[3],
              "metadata_author": texts[4], "metadata_tags": texts[5], "caption_prefix": texts[6],
              "pretrained_model_name_or_path": texts[7], "optimizer_args": ["weight_decay=0.01", texts[1]],
              "sample_prompts_text": "\n".join(texts)}
    with pytest.raises(CommandError, match="accelerate.extra_args"):  # never passed on to accelerate (issue 11)
        build_command("lora", values, AccelerateSettings(extra_args=[texts[0]]), str(job))
    cmd = build_command("lora", values, AccelerateSettings(), str(job))
    back = _readback(cmd, tmp_path)
    for key in ("output_name", "training_comment", "metadata_title", "metadata_author", "metadata_tags",
                "caption_prefix", "pretrained_model_name_or_path", "optimizer_args"):
        assert back[key] == values[key], key
    assert cmd.prompts_text.splitlines() == [t.rstrip() for t in texts]
    assert back["sample_prompts"] == str(job / "prompts.txt")
    # run the argv for real, with a recorder instead of accelerate: every element arrives as one literal argument
    record = tmp_path / "argv.json"
    argv = [sys.executable, "-c", "import json,sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w'))", str(record)]
    argv += cmd.argv[3:]
    subprocess.run(argv, check=True, timeout=30)
    assert json.loads(record.read_text())[1:] == cmd.argv[3:]
    assert not sentinel.exists()
    # and the printed command, run by a real shell, also passes the same literal arguments
    shell_line = format_command([sys.executable, "-c", "import json,sys; json.dump(sys.argv[1:], open(sys.argv[1], "
                                 "'w'))", str(record)] + cmd.argv[3:])
    subprocess.run(["bash", "-c", shell_line], check=True, timeout=30)
    assert json.loads(record.read_text())[1:] == cmd.argv[3:]
    assert not sentinel.exists()


def test_unknown_and_misplaced_keys_name_the_field(tmp_path):
    with pytest.raises(CommandError, match="learning_rte"):
        build_command("lora", {"learning_rte": 1}, AccelerateSettings(), str(tmp_path))
    with pytest.raises(CommandError, match="network_dim"):
        build_command("dreambooth", {"network_dim": 32}, AccelerateSettings(), str(tmp_path))
    # a default/unset value of a non-applicable option is harmless (the UI may send every widget)
    build_command("dreambooth", {"network_dim": 4, "network_weights": ""}, AccelerateSettings(), str(tmp_path))
    with pytest.raises(CommandError, match="kind"):
        build_command("flux", {}, AccelerateSettings(), str(tmp_path))


@pytest.mark.parametrize("key,value", [("output_name", "a\nb"), ("output_dir", "x\x00y"), ("caption_prefix", "a\rb"),
                                       ("optimizer_args", ["a=1\nb=2"]), ("sample_prompts_text", "ok\x00")])
def test_nul_and_newlines_in_single_line_fields_are_refused(key, value, tmp_path):
    with pytest.raises(CommandError) as err:
        build_command("lora", {key: value}, AccelerateSettings(), str(tmp_path))
    assert err.value.field == key


def test_multiline_fields_keep_their_lines(tmp_path):
    cmd = build_command("lora", {"metadata_description": "line 1\nline 2 \"q\""}, AccelerateSettings(), str(tmp_path))
    assert _readback(cmd, tmp_path)["metadata_description"] == "line 1\nline 2 \"q\""


def test_widget_values_are_converted_and_checked(tmp_path):
    cmd = build_command("lora", {"network_dim": 16.0, "seed": "", "clip_skip": "2", "shuffle_caption": "true",
                                 "network_args": "conv_dim=4 conv_alpha=1"}, AccelerateSettings(), str(tmp_path))
    back = _readback(cmd, tmp_path)
    assert (back["network_dim"], back["seed"], back["clip_skip"], back["shuffle_caption"]) == (16, None, 2, True)
    assert back["network_args"] == ["conv_dim=4", "conv_alpha=1"]
    with pytest.raises(CommandError, match="network_dim"):
        build_command("lora", {"network_dim": 2.5}, AccelerateSettings(), str(tmp_path))
    with pytest.raises(CommandError, match="network_dim"):
        build_command("lora", {"network_dim": 0}, AccelerateSettings(), str(tmp_path))
    with pytest.raises(CommandError, match="learning_rate"):
        build_command("lora", {"learning_rate": "fast"}, AccelerateSettings(), str(tmp_path))
    with pytest.raises(CommandError, match="num_processes"):
        build_command("lora", {}, AccelerateSettings(num_processes=0), str(tmp_path))


def test_no_prompts_means_no_prompt_file_and_job_options_come_from_the_job(tmp_path):
    cmd = build_command("lora", {"sample_prompts_text": "  \n# only a comment\n", "events_file": "/elsewhere.jsonl"},
                        AccelerateSettings(), str(tmp_path))
    assert cmd.prompts_text is None and cmd.prompts_path is None
    assert "events_file" not in cmd.toml_text and "sample_prompts" not in cmd.toml_text


def test_split_accelerate_and_from_dict():
    values, accel = command.split_accelerate({"learning_rate": 1.0, "accelerate.num_processes": 2,
                                              "accelerate.extra_args": "--same_network --rdzv_backend static"})
    assert values == {"learning_rate": 1.0}
    assert accel.num_processes == 2 and accel.extra_args == ["--same_network", "--rdzv_backend", "static"]
    with pytest.raises(CommandError, match="num_gpus"):
        AccelerateSettings.from_dict({"num_gpus": 2})


GUI_MODULES = ["kohya_gui.command", "kohya_gui.secrets", "kohya_gui.jobs", "kohya_gui.monitor", "kohya_gui.preflight",
               "kohya_gui.gui_config", "kohya_gui.presets", "kohya_gui.dataset_prep"]


def test_gui_modules_never_import_torch():
    code = ("import importlib, sys\n"
            f"for m in {GUI_MODULES!r}:\n    importlib.import_module(m)\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stdout + out.stderr


def test_several_processes_use_the_multi_process_launcher_even_on_cpu(tmp_path):
    """`accelerate launch --cpu --num_processes 2` would start ONE process; the trainer does CPU DDP by itself."""
    cmd = build_command("lora", {}, AccelerateSettings(cpu=True, num_processes=2), str(tmp_path))
    head = cmd.argv[:cmd.argv.index("-m", 3)]
    assert "--multi_gpu" in head and "--cpu" not in head
    single = build_command("lora", {}, AccelerateSettings(cpu=True), str(tmp_path))
    assert "--cpu" in single.argv and "--multi_gpu" not in single.argv
