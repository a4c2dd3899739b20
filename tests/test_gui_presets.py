"""kohya_gui.presets: bundled presets, save/load round trip, migration, secrets, kohya_ss JSON import."""
import json
import os
import sys

import pytest

from kohya_gui import presets
from kohya_gui.command import AccelerateSettings, build_command, split_accelerate
from sd_scripts import options

BUNDLED = ["SD1.5 LoRA", "SD1.5 LoRA low VRAM", "SDXL LoRA", "Demo (tiny model, CPU)"]


def test_bundled_lora_presets_load_cleanly_and_build_a_command(tmp_path):
    names = presets.list_presets("lora", user_dir=str(tmp_path))
    assert set(BUNDLED) <= set(names)
    for name in names:
        values = presets.load_preset("lora", name, user_dir=str(tmp_path), demo_dir=str(tmp_path / "demo"),
                                     make_demo=False)
        assert values.unknown_keys == [], (name, values.unknown_keys)
        rest, accel = split_accelerate(values)
        cmd = build_command("lora", rest, accel, str(tmp_path / "job"))
        assert "--config_file" in cmd.argv


def test_bundled_preset_files_have_a_version_and_only_changed_keys():
    folder = os.path.join(presets.BUNDLED_DIR, "lora")
    for entry in os.listdir(folder):
        data = json.load(open(os.path.join(folder, entry)))
        assert data["schema_version"] == presets.SCHEMA_VERSION and data["kind"] == "lora"
        for key, value in data["values"].items():
            if key in options.BY_NAME:
                assert value != options.BY_NAME[key].default, (entry, key)


def test_demo_preset_points_at_the_demo_folder(tmp_path):
    values = presets.load_preset("lora", "Demo (tiny model, CPU)", user_dir=str(tmp_path),
                                 demo_dir=str(tmp_path / "demo"), make_demo=False)
    assert values["pretrained_model_name_or_path"] == str(tmp_path / "demo" / "model" / "tiny-sd1.safetensors")
    assert values["train_data_dir"] == str(tmp_path / "demo" / "dataset" / "train")
    assert values["accelerate.cpu"] is True and values["mixed_precision"] == "no"


def test_ensure_demo_runs_the_tiny_model_tool_once(tmp_path, monkeypatch):
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "tiny-sd1.safetensors"), "w").close()
        os.makedirs(os.path.join(argv[argv.index("--dataset") + 1], "train"), exist_ok=True)
        return type("R", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(presets.subprocess, "run", fake_run)
    model = str(tmp_path / "demo" / "model" / "tiny-sd1.safetensors")
    notes = presets.ensure_demo(str(tmp_path / "demo"), model)
    assert calls[0][:3] == [sys.executable, "-m", "sd_scripts.tools.tiny_model"] and "made the demo" in notes[0]
    assert calls[0][calls[0].index("--family") + 1] == "sd1"
    assert presets.ensure_demo(str(tmp_path / "demo"), model) == [] and len(calls) == 1
    with pytest.raises(presets.PresetError, match="tiny-<variant>"):
        presets.ensure_demo(str(tmp_path / "demo"), str(tmp_path / "demo" / "model" / "other.safetensors"))


def test_finetune_demo_builds_its_metadata_json_where_the_preset_reads_it(tmp_path, monkeypatch):
    """Loading the fine-tune demo makes <demo>/dataset/meta.json (the real build_metadata tool, argv only) from the
    captions of the preset's train_data_dir, once; the tiny model tool is faked here."""
    demo = tmp_path / "demo"
    real_run = presets.subprocess.run
    calls = []

    def fake_tiny_model(argv, **kw):
        calls.append(argv)
        if argv[2] != "sd_scripts.tools.tiny_model":
            return real_run(argv, **kw)
        os.makedirs(argv[argv.index("--out") + 1], exist_ok=True)
        open(os.path.join(argv[argv.index("--out") + 1], "tiny-sd1.safetensors"), "w").close()
        images = os.path.join(argv[argv.index("--dataset") + 1], "train", "10_sks dog")
        os.makedirs(images)
        for i, caption in enumerate(["a photo of sks dog, red", "a photo of sks dog, blue"]):
            open(os.path.join(images, f"{i:02d}.png"), "wb").close()
            open(os.path.join(images, f"{i:02d}.txt"), "w").write(caption + "\n")
        open(os.path.join(images, "02.png"), "wb").close()  # no caption: left out
        return type("R", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(presets.subprocess, "run", fake_tiny_model)
    values = presets.load_preset("finetune", "Demo (tiny model, CPU)", user_dir=str(tmp_path), demo_dir=str(demo))
    assert values["in_json"] == str(demo / "dataset" / "meta.json")
    assert values["train_data_dir"] == str(demo / "dataset" / "train" / "10_sks dog")
    build = calls[1]
    assert build[:3] == [sys.executable, "-m", "sd_scripts.tools.build_metadata"]
    assert build[build.index("--train_data_dir") + 1] == values["train_data_dir"]
    assert build[build.index("--out") + 1] == values["in_json"]
    assert build[build.index("--caption_extension") + 1] == ".txt" and build[build.index("--tag_extension") + 1] == ""
    assert json.load(open(values["in_json"])) == {"00": {"caption": "a photo of sks dog, red"},
                                                   "01": {"caption": "a photo of sks dog, blue"}}
    assert any("meta.json" in n for n in values.notes)
    again = presets.load_preset("finetune", "Demo (tiny model, CPU)", user_dir=str(tmp_path), demo_dir=str(demo))
    assert len(calls) == 2 and again.notes == []
    # other kinds' demos write no metadata
    presets.load_preset("lora", "Demo (tiny model, CPU)", user_dir=str(tmp_path), demo_dir=str(demo))
    assert len(calls) == 2


def test_demo_metadata_is_only_written_inside_the_demo_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(presets.subprocess, "run", lambda *a, **k: pytest.fail("ran a tool"))
    values = {"in_json": str(tmp_path / "elsewhere" / "meta.json"), "train_data_dir": str(tmp_path / "train")}
    assert presets.ensure_demo_metadata(str(tmp_path / "demo"), values) == []
    assert presets.ensure_demo_metadata(str(tmp_path / "demo"), {"train_data_dir": "x"}) == []


def test_save_stores_only_changes_and_never_secrets_and_loads_back(tmp_path):
    form = options.defaults("network")
    form.update(learning_rate=3e-4, network_dim=64.0, sample_prompts_text="a dog", output_dir="/o")
    form["accelerate.num_processes"] = 2
    form["accelerate.num_machines"] = 1  # a default: not stored
    form["hf_token"] = "hf_secret"
    path = presets.save_preset("lora", "My preset / v2", form, user_dir=str(tmp_path))
    stored = json.load(open(path))
    assert stored["values"] == {"learning_rate": 3e-4, "network_dim": 64, "sample_prompts_text": "a dog",
                                "output_dir": "/o", "accelerate.num_processes": 2}
    assert "hf_secret" not in open(path).read()
    assert "My preset / v2" in presets.list_presets("lora", user_dir=str(tmp_path))
    loaded = presets.load_preset("lora", "My preset / v2", user_dir=str(tmp_path))
    assert loaded["learning_rate"] == 3e-4 and loaded["network_dim"] == 64 and loaded["max_train_steps"] == 1600
    with pytest.raises(presets.PresetError, match="learning_rte"):
        presets.save_preset("lora", "bad", {"learning_rte": 1}, user_dir=str(tmp_path))


def test_old_unversioned_presets_migrate_and_unknown_keys_are_reported(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "old.json").write_text(json.dumps({"name": "Old", "caption_extention": ".cap", "learning_rate": "1e-4",
                                                 "network_dim": 8, "sdxl_no_half_vae": True, "clip_skip": "abc"}))
    loaded = presets.load_preset("lora", "Old", user_dir=str(tmp_path))
    assert loaded["caption_extension"] == ".cap" and loaded["learning_rate"] == 1e-4 and loaded["network_dim"] == 8
    assert "sdxl_no_half_vae" in loaded.unknown_keys and "clip_skip (invalid value)" in loaded.unknown_keys
    assert "migrated" in loaded.notes[0]
    # a preset belongs to its training kind: the LoRA preset is not offered to DreamBooth from the same folder
    assert "Old" not in presets.list_presets("dreambooth", user_dir=str(tmp_path))
    with pytest.raises(presets.PresetError, match="no dreambooth preset named 'Old'"):
        presets.load_preset("dreambooth", "Old", user_dir=str(tmp_path))
    with pytest.raises(presets.PresetError, match="no lora preset"):
        presets.load_preset("lora", "Nope", user_dir=str(tmp_path))


KOHYA = {
    "LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": 4, "rank_dropout": 0, "module_dropout": 0.1,
    "epoch": 4, "max_train_epochs": "", "max_train_steps": "0", "max_resolution": "768,512",
    "train_batch_size": 4, "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.01 betas=0.9,0.99",
    "learning_rate": 0.0001, "unet_lr": 0.0001, "text_encoder_lr": 5e-05, "lr_warmup": 10,
    "lr_scheduler_power": "", "clip_skip": "2", "max_token_length": "75", "keep_tokens": "0", "seed": "1234",
    "xformers": "sdpa", "save_every_n_steps": 0, "network_dropout": 0, "vae_batch_size": 0, "mixed_precision": "bf16",
    "save_precision": "fp16", "caption_extension": ".txt", "pretrained_model_name_or_path": "/models/sd15.safetensors",
    "train_data_dir": "/data/img", "output_dir": "/out", "output_name": "x", "lora_network_weights": "",
    "sample_prompts": "a dog --w 512", "sample_every_n_steps": 20, "sample_sampler": "euler_a",
    "num_processes": 2, "multi_gpu": True, "gpu_ids": "", "main_process_port": 0, "num_cpu_threads_per_process": 2,
    "extra_accelerate_launch_args": "", "sdxl": False, "model_list": "custom", "wandb_api_key": "abc123",
    "huggingface_token": "", "use_wandb": False, "multires_noise_iterations": 8, "noise_offset_type": "Multires",
    "stop_text_encoder_training": 0, "sdxl_no_half_vae": False, "network_dim": 16, "network_alpha": 8,
}


def test_import_kohya_json_maps_renamed_keys(tmp_path):
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps(KOHYA))
    values, unknown = presets.import_kohya_json(str(path))
    assert values["max_train_epochs"] == 4 and "max_train_steps" not in values
    assert values["resolution"] == "768,512" and values["optimizer_type"] == "AdamW8bit"
    assert values["optimizer_args"] == ["weight_decay=0.01", "betas=0.9,0.99"]
    assert values["network_args"] == ["module_dropout=0.1", "conv_dim=8", "conv_alpha=4"]
    assert values["lr_warmup_steps"] == 0.1 and values["sdpa"] is True and "xformers" not in values
    assert values["clip_skip"] == 2 and values["max_token_length"] == 75 and values["seed"] == 1234
    assert values["sample_prompts_text"] == "a dog --w 512"
    assert values["accelerate.num_processes"] == 2 and values["accelerate.multi_gpu"] is True
    assert "save_every_n_steps" not in values and "network_dropout" not in values and "vae_batch_size" not in values
    assert "network_weights" not in values
    assert "multires_noise_iterations" in unknown and "wandb_api_key (secret, not imported)" in unknown
    assert "abc123" not in json.dumps(values)
    assert "stop_text_encoder_training" not in unknown and "use_wandb" not in unknown  # 0/false: no setting lost
    rest, accel = split_accelerate(values)
    assert accel.num_processes == 2
    build_command("lora", rest, accel, str(tmp_path / "job"))  # the import is launchable as is


def test_import_for_a_kind_reports_options_that_do_not_apply(tmp_path):
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps({"network_dim": 16, "learning_rate": 1e-6, "LoRA_type": "LyCORIS/LoHa"}))
    values, unknown = presets.import_kohya_json(str(path), kind="dreambooth")
    assert values == {"learning_rate": 1e-6}
    assert "network_dim (does not apply to dreambooth)" in unknown
    assert any(u.startswith("LoRA_type") for u in unknown)


@pytest.mark.timeout(300)
def test_sdxl_demo_preset_builds_its_tiny_sdxl_and_trains(tmp_path):
    """The SDXL demo makes a real tiny SDXL next to the SD1 demo's dataset, and the command it builds trains."""
    import subprocess

    from sd_scripts.training.events import read_events

    demo = tmp_path / "demo"
    values = presets.load_preset("lora", "Demo SDXL (tiny model, CPU)", user_dir=str(tmp_path), demo_dir=str(demo))
    assert values["pretrained_model_name_or_path"] == str(demo / "model-sdxl" / "tiny-sdxl.safetensors")
    assert (demo / "model-sdxl" / "tiny-sdxl.safetensors").is_file() and (demo / "dataset" / "train").is_dir()
    values["max_train_steps"] = 2
    rest, accel = split_accelerate(values)
    job = tmp_path / "job"
    job.mkdir()
    cmd = build_command("lora", rest, accel, str(job))
    (job / "run.toml").write_text(cmd.toml_text)
    if cmd.prompts_path:
        open(cmd.prompts_path, "w").write(cmd.prompts_text)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd.argv, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(str(job / "events.jsonl"))
    assert events[0]["model_family"] == "sdxl" and events[-1]["status"] == "completed"
    assert (demo / "output" / "demo_sdxl_lora.safetensors").is_file()
