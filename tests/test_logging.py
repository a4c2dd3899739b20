"""Logging, trackers, console log, output_config, modelspec extras and Hugging Face Hub uploads / resume.

One in-process LoRA run (2 steps, tiny SD 1.x) with every logging, metadata and Hub option on is checked from its
files: TensorBoard's event file (with the log_tracker_config suffix) and hparams, the offline wandb run (loss,
config, run name, tags), the console log file, the metadata of the saved LoRA, and what the local Hub stand-in
(tests/hub_standin.py) received: the LoRA at huggingface_path_in_repo, the state folder, with the token from HF_TOKEN.
A second run resumes from that state on the Hub. The secrets given (wandb_api_key on the command line, HF_TOKEN in
the environment) appear in none of the files a run writes.
"""
from __future__ import annotations

import base64
import glob
import io
import json
import os
import sys

import pytest
from PIL import Image
from safetensors import safe_open

from hub_standin import HubStandIn
from sd_scripts import options
from sd_scripts.training.events import read_events

pytestmark = pytest.mark.timeout(300)

WANDB_KEY = "wandbkey-0123456789abcdef0123456789abcdef"
HF_TOKEN = "hf_secret_token_for_the_standin"


@pytest.fixture
def hub(monkeypatch):
    """The Hub stand-in, with huggingface_hub pointed at it (HF_ENDPOINT is read at import, so the constants)."""
    import huggingface_hub.constants as constants

    with HubStandIn() as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            standin.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
        yield standin


@pytest.fixture
def entry_env(monkeypatch):
    """What a trainer process changes in its own process (environment, sys.argv, log handlers), undone afterwards."""
    from sd_scripts.training.console_log import remove_console_logging

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "placeholder")  # restored after the run sets it
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    yield
    remove_console_logging()


@pytest.fixture
def two_images(tmp_path):
    """Two 64 px images in one concept folder: the runs here check files, not learning (and cache 2 latents)."""
    folder = tmp_path / "data" / "1_sks dog"
    folder.mkdir(parents=True)
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("sks dog\n")
    return str(folder.parent)


def _train(argv: list[str]) -> int:
    from sd_scripts.train_network import main

    sys.argv[:] = ["train_network.py", *argv]
    return main(argv)


def _base_args(tiny_sd1, data, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", data,
            "--output_dir", str(out), "--output_name", "lg", "--resolution", "64", "--caption_extension", ".txt",
            "--cache_latents", "--max_data_loader_n_workers", "0", "--seed", "1", "--learning_rate", "1e-3",
            "--network_dim", "2", *extra]


def _files_text(root) -> bytes:
    data = b""
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data += f.read()
    return data


def test_one_run_with_every_logging_metadata_and_hub_option(tmp_path, tiny_sd1, two_images, hub, entry_env):
    out, logs = tmp_path / "out", tmp_path / "logs"
    tracker_cfg = tmp_path / "trackers.toml"
    tracker_cfg.write_text('[wandb]\ntags = ["tiny-run"]\nnotes = "from log_tracker_config"\n'
                           '[tensorboard]\nfilename_suffix = ".from_cfg"\n')
    thumb = tmp_path / "thumb.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(thumb)
    console = tmp_path / "console" / "train.log"
    events = tmp_path / "events.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog --w 64 --h 64 --s 1 --d 3\n")
    rc = _train(_base_args(
        tiny_sd1, two_images, out, "--max_train_steps", "2",
        "--logging_dir", str(logs), "--log_prefix", "pre_", "--log_with", "all", "--log_tracker_name", "myproject",
        "--log_tracker_config", str(tracker_cfg), "--wandb_run_name", "my-run", "--wandb_api_key", WANDB_KEY,
        "--log_config", "--console_log_file", str(console), "--console_log_simple", "--console_log_level", "DEBUG",
        "--metadata_title", "T", "--metadata_trigger_phrase", "sks dog", "--metadata_usage_hint", "weight 0.8",
        "--metadata_thumbnail", str(thumb), "--metadata_merged_from", "a, b", "--metadata_preprocessor", "canny",
        "--metadata_is_negative_embedding", "False", "--metadata_license", "MIT",
        "--huggingface_repo_id", "me/tiny-lora", "--huggingface_path_in_repo", "runs/one", "--async_upload",
        "--save_state", "--save_state_to_huggingface", "--events_file", str(events),
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"))
    assert rc == 0
    assert os.environ["WANDB_API_KEY"] == WANDB_KEY and WANDB_KEY not in " ".join(sys.argv)  # env, not argv

    # --- scalars still flow into our event stream
    evs = read_events(str(events))
    progress = [e for e in evs if e["type"] == "progress"]
    assert progress and all(isinstance(e["loss"], float) for e in progress)
    assert evs[-1]["type"] == "done" and evs[-1]["status"] == "completed"
    assert not [e for e in evs if e["type"] == "warning" and "Hub" in e["message"]]

    # --- TensorBoard: <logging_dir>/<log_prefix><time>/<project>/, file suffix from log_tracker_config, hparams
    (run_dir,) = glob.glob(str(logs / "pre_*"))
    (tb_file,) = glob.glob(os.path.join(run_dir, "myproject", "events.out.tfevents.*.from_cfg"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(tb_file))
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss/current")] == [1, 2]
    (hparams_file,) = glob.glob(os.path.join(run_dir, "myproject", "*", "hparams.yml"))  # accelerate's layout
    hparams = open(hparams_file).read()
    assert "network_dim: 2" in hparams and "log_with: all" in hparams

    # --- wandb (offline) in the run folder: name, tags, notes, config and the loss
    (wandb_run,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    record = open(wandb_run, "rb").read()
    for expected in (b"my-run", b"tiny-run", b"from log_tracker_config", b"myproject", b"loss/current",
                     b"network_dim", b"global_step", b"sample_0", b"sks dog"):
        assert expected in record, expected
    assert glob.glob(os.path.join(os.path.dirname(wandb_run), "files", "media", "images", "sample_0_*.png"))

    # --- the console log went to the file, messages only
    text = console.read_text()
    assert "saved " + str(out / "lg.safetensors") in text
    assert "Stored initial configuration hyperparameters" in text  # accelerate's DEBUG line: console_log_level
    assert not any(line.startswith(("INFO", "DEBUG")) or line[:2].isdigit() and line[2:3] == ":"
                   for line in text.splitlines())

    # --- modelspec extras in the file
    with safe_open(str(out / "lg.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "T" and meta["modelspec.trigger_phrase"] == "sks dog"
    assert meta["modelspec.usage_hint"] == "weight 0.8" and meta["modelspec.merged_from"] == "a, b"
    assert meta["modelspec.preprocessor"] == "canny" and meta["modelspec.is_negative_embedding"] == "False"
    assert meta["modelspec.license"] == "MIT"
    prefix = "data:image/png;base64,"
    assert meta["modelspec.thumbnail"].startswith(prefix)
    assert Image.open(io.BytesIO(base64.b64decode(meta["modelspec.thumbnail"][len(prefix):]))).size == (8, 8)
    assert not [k for k in meta if k.startswith(("ss_huggingface", "ss_wandb", "ss_metadata_", "ss_log_"))]

    # --- the Hub stand-in: the LoRA at path_in_repo, the state folder, a private repo, the HF_TOKEN token
    repo = hub.repos["me/tiny-lora"]
    assert repo.private and repo.repo_type == "model"
    with open(out / "lg.safetensors", "rb") as f:
        assert repo.files["runs/one/lg.safetensors"] == f.read()
    state = out / "lg-state"
    assert {p for p in repo.files if p.startswith("runs/one/lg-state/")} == \
        {f"runs/one/lg-state/{name}" for name in os.listdir(state)} >= {"runs/one/lg-state/train_state.json"}
    assert repo.files["runs/one/lg-state/optimizer.bin"] == (state / "optimizer.bin").read_bytes()
    assert {auth for method, path, auth in hub.requests if "/me/tiny-lora" in path or "create" in path} == \
        {f"Bearer {HF_TOKEN}"}

    # --- no secret in anything the run wrote
    for root in (out, logs, console.parent, events):
        written = _files_text(root) if os.path.isdir(root) else open(root, "rb").read()
        assert WANDB_KEY.encode() not in written and HF_TOKEN.encode() not in written, root

    # --- resume_from_huggingface: the state folder comes back from the Hub and training goes on from step 2
    events2 = tmp_path / "events2.jsonl"
    rc = _train(_base_args(tiny_sd1, two_images, tmp_path / "out2", "--max_train_steps", "3",
                           "--resume", "me/tiny-lora/runs/one/lg-state:main", "--resume_from_huggingface",
                           "--events_file", str(events2)))
    assert rc == 0
    evs2 = read_events(str(events2))
    assert [e["step"] for e in evs2 if e["type"] == "progress"] == [3]
    assert os.path.isfile(tmp_path / "out2" / "hub_resume" / "process0" / "me--tiny-lora" / "runs" / "one" /
                          "lg-state" / "train_state.json")


def test_a_failed_upload_is_a_warning_naming_the_repo_and_the_file_stays(tmp_path, hub):
    import argparse

    from sd_scripts.training.hub import HubUploader

    hub.fail_uploads = True
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    warnings = []
    args = argparse.Namespace(huggingface_repo_id="me/broken", huggingface_repo_type=None,
                              huggingface_path_in_repo=None, huggingface_token=None,
                              huggingface_repo_visibility="public", async_upload=True)
    uploader = HubUploader(args, warn=lambda message, hint="": warnings.append((message, hint)))
    uploader.upload(str(model))
    uploader.close()
    ((message, hint),) = warnings
    assert "me/broken" in message and str(model) in message and str(model) in hint
    assert model.read_bytes() == b"weights" and hub.repos["me/broken"].files == {}
    assert not hub.repos["me/broken"].private  # huggingface_repo_visibility public


def test_upload_to_a_dataset_repo_with_its_own_token_in_the_background(tmp_path, hub):
    import argparse
    import time

    from sd_scripts.training.hub import HubUploader

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    args = argparse.Namespace(huggingface_repo_id="me/data", huggingface_repo_type="dataset",
                              huggingface_path_in_repo=None, huggingface_token="hf_from_option",
                              huggingface_repo_visibility=None, async_upload=True)
    uploader = HubUploader(args, warn=lambda message, hint="": pytest.fail(message))
    hub.commits_open.clear()  # the Hub is slow: async_upload returns at once
    started = time.time()
    uploader.upload(str(model))
    assert time.time() - started < 5 and ("me/data" not in hub.repos or hub.repos["me/data"].files == {})
    hub.commits_open.set()
    uploader.close()
    assert hub.repos["me/data"].repo_type == "dataset" and hub.files("me/data") == {"m.safetensors": b"weights"}
    assert {auth for _, path, auth in hub.requests if "me/data" in path or "create" in path} == \
        {"Bearer hf_from_option"}


def test_output_config_writes_the_options_without_secrets_or_defaults_and_exits(tmp_path, entry_env):
    from sd_scripts.train_network import main

    target = tmp_path / "written"  # sd-scripts adds .toml
    argv = ["--output_dir", str(tmp_path / "o"), "--network_dim", "8", "--wandb_api_key", WANDB_KEY,
            "--huggingface_token", HF_TOKEN, "--log_with", "wandb", "--output_config", "--config_file", str(target)]
    assert main(argv) == 0
    text = (tmp_path / "written.toml").read_text()
    assert "network_dim = 8" in text and 'log_with = "wandb"' in text
    assert WANDB_KEY not in text and HF_TOKEN not in text and "output_config =" not in text
    assert "learning_rate" not in text  # defaults left out
    assert not (tmp_path / "o").exists()  # nothing trained
    ns = options.parse_args("network", ["--config_file", str(target)])
    assert ns.network_dim == 8 and ns.log_with == "wandb"
    assert main(argv) == 1  # the file exists now: refused, not overwritten
    assert (tmp_path / "written.toml").read_text() == text


@pytest.mark.parametrize("argv, words", [
    (["--log_with", "tensorboard"], ["log_with", "logging_dir"]),
    (["--huggingface_repo_id", "no-slash"], ["huggingface_repo_id", "user/name"]),
    (["--huggingface_repo_type", "models"], ["huggingface_repo_type"]),
    (["--huggingface_repo_visibility", "pubic"], ["huggingface_repo_visibility", "public"]),
    (["--metadata_thumbnail", "/nowhere/t.png"], ["metadata_thumbnail"]),
    (["--output_config"], ["output_config", "config_file"]),
    (["--console_log_level", "LOUD"], ["console_log_level"]),
])
def test_bad_values_are_errors_naming_the_option(argv, words):
    with pytest.raises(options.OptionError) as e:
        options.parse_args("network", argv)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_option_combinations_checked_before_training(tmp_path):
    import argparse

    from sd_scripts.training import hub, trackers

    def ns(**kw):
        base = {o.name: o.default for o in options.OPTIONS}
        base.update(kw)
        return argparse.Namespace(**base)

    with pytest.raises(options.OptionError, match="save_state_to_huggingface.*huggingface_repo_id"):
        hub.check_options(ns(save_state_to_huggingface=True))
    with pytest.raises(options.OptionError, match="resume_from_huggingface.*resume"):
        hub.check_options(ns(resume_from_huggingface=True))
    with pytest.raises(options.OptionError, match="resume"):
        hub.check_options(ns(resume_from_huggingface=True, resume="onlyrepo"))
    assert hub.parse_resume_spec("u/r/a/b-state:v1:dataset") == ("u/r", "a/b-state", "v1", "dataset")
    assert any("async_upload" in w for w in hub.check_options(ns(async_upload=True)))
    cfg = tmp_path / "t.toml"
    cfg.write_text("entity = 'x'\n")
    with pytest.raises(options.OptionError, match="log_tracker_config.*table"):
        trackers.check_options(ns(log_tracker_config=str(cfg), logging_dir="l"))
    cfg.write_text("[wandbb]\nentity = 'x'\n")
    with pytest.raises(options.OptionError, match=r"log_tracker_config.*\[wandbb\]"):
        trackers.check_options(ns(log_tracker_config=str(cfg), logging_dir="l"))
    assert any("wandb_run_name" in w for w in trackers.check_options(ns(wandb_run_name="x", logging_dir="l")))


def test_gui_passes_secrets_only_through_the_childs_environment(tmp_path, monkeypatch):
    """The GUI's command has no secret in run.toml, the argv, job.json or the stored log; the child gets them as
    WANDB_API_KEY / HF_TOKEN."""
    from kohya_gui.command import AccelerateSettings, build_command
    from kohya_gui.jobs import JobManager

    values = {"pretrained_model_name_or_path": "m.safetensors", "output_dir": str(tmp_path / "o"),
              "train_data_dir": str(tmp_path), "wandb_api_key": WANDB_KEY, "huggingface_token": HF_TOKEN,
              "log_with": "wandb"}
    from kohya_gui.components.widgets import make_widget

    for name in ("wandb_api_key", "huggingface_token"):  # masked in the form
        assert make_widget(options.BY_NAME[name], None, "t").type == "password"
    cmd = build_command("lora", values, AccelerateSettings(), str(tmp_path / "job"))
    assert cmd.env == {"WANDB_API_KEY": WANDB_KEY, "HF_TOKEN": HF_TOKEN}
    assert WANDB_KEY not in cmd.toml_text + " ".join(cmd.argv) and HF_TOKEN not in cmd.toml_text

    seen = tmp_path / "child_env.txt"
    fake_python = tmp_path / "python"  # stands in for the interpreter: records its environment, prints the key
    fake_python.write_text(f'#!/bin/sh\nprintf "%s|%s" "$WANDB_API_KEY" "$HF_TOKEN" > "{seen}"\n'
                           'echo "key is $WANDB_API_KEY"\n')
    fake_python.chmod(0o755)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    manager = JobManager(str(tmp_path / "jobs"), python=str(fake_python), grace_s=1)
    try:
        job = manager.create("lora", values, AccelerateSettings())
        manager.start_next()
        import time

        for _ in range(100):
            manager.tick()
            if manager.get(job.id).status != "running":
                break
            time.sleep(0.05)
        job = manager.get(job.id)
    finally:
        manager.close()
    assert seen.read_text() == f"{WANDB_KEY}|{HF_TOKEN}"
    assert "key is ***" in job.log_tail
    for name in os.listdir(job.folder):
        if name != "log.txt":  # the raw log is the child's own output; the GUI shows the redacted tail
            data = open(os.path.join(job.folder, name), "rb").read()
            assert WANDB_KEY.encode() not in data and HF_TOKEN.encode() not in data, name
    assert json.load(open(os.path.join(job.folder, "job.json")))["values"].get("wandb_api_key") is None


def test_config_toml_never_holds_secrets(tmp_path):
    from kohya_gui import gui_config

    path = tmp_path / "config.toml"
    path.write_text(f'[hub]\nhuggingface_token = "{HF_TOKEN}"\nhuggingface_repo_id = "me/x"\n')
    cfg = gui_config.load_gui_config(str(path))
    assert cfg.values["hub"] == {"huggingface_repo_id": "me/x"}
    assert any("huggingface_token" in p and "HF_TOKEN" in p for p in cfg.problems)
    assert "wandb_api_key =" not in gui_config.default_config_text()


def test_preflight_takes_a_hub_resume_for_what_it_is(tmp_path):
    from kohya_gui.preflight import _check_paths

    checks = []
    _check_paths("network", {"resume": "me/repo/run-state", "resume_from_huggingface": True}, checks)
    assert not [c for c in checks if c.field == "resume"]
    _check_paths("network", {"resume": str(tmp_path / "missing-state")}, checks)
    assert [c for c in checks if c.field == "resume"]


def test_wandb_failing_to_start_is_an_error_saying_what_to_do(tmp_path):
    """wandb's own start-up errors (here: its error for a missing API key) become one user error; others pass.
    (A real online wandb.init is not tried: in a process where a run already logged in it would reach the network.)"""
    import argparse
    from types import SimpleNamespace

    import wandb

    from sd_scripts.training.trackers import Trackers

    base = {o.name: o.default for o in options.OPTIONS}
    trackers = Trackers(argparse.Namespace(**{**base, "log_with": "wandb", "logging_dir": str(tmp_path / "logs")}))

    def failing(error):
        def init_trackers(*args, **kwargs):
            raise error
        return SimpleNamespace(is_main_process=True, init_trackers=init_trackers)

    with pytest.raises(options.OptionError, match="log_with.*No API key.*WANDB_API_KEY.*WANDB_MODE=offline"):
        trackers.start(failing(wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")))
    with pytest.raises(RuntimeError, match="not wandb's"):
        trackers.start(failing(RuntimeError("not wandb's")))
