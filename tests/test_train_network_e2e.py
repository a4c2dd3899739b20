"""End to end: real `accelerate launch -m sd_scripts.train_network` runs on tiny models, checked from the outside."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, accelerate_cmd, subprocess_env
from sd_scripts.training.events import read_events

pytestmark = pytest.mark.timeout(600)


def write_run_toml(path, **values) -> str:
    from sd_scripts.options import dump_toml

    path.write_text(dump_toml(values, "network"))
    return str(path)


def run_trainer(cmd, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def lora_tensors(path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_sd1_single_file_lora_run(tmp_path, tiny_sd1, demo_data):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nsks dog on grass --w 64 --h 64 --s 2 --d 7\nohwx cat --n blurry --w 64 --h 64 --s 2\n")
    out = tmp_path / "out"
    events_file = tmp_path / "job" / "events.jsonl"
    cfg = write_run_toml(
        tmp_path / "run.toml", pretrained_model_name_or_path=tiny_sd1.single_file, train_data_dir=demo_data,
        output_dir=str(out), output_name="demo", resolution="64", enable_bucket=True, min_bucket_reso=64,
        max_bucket_reso=128, network_dim=4, network_alpha=2.0, learning_rate=1e-3, max_train_steps=6,
        caption_extension=".txt", cache_latents=True, sample_prompts=str(prompts), sample_every_n_steps=3,
        save_every_n_steps=4, seed=1, network_args=["conv_dim=2", "conv_alpha=1"], events_file=str(events_file))
    run_trainer(accelerate_cmd("--config_file", cfg))

    final = out / "demo.safetensors"
    tensors, meta = lora_tensors(final)
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") for n in names)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
    assert any("resnets" in n for n in names), "conv_dim adds ResNet modules"
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] and float(tensors[f"{name}.alpha"]) in (2.0, 1.0)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k), "training moved the up weights"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_steps"] == "6" and "sshs_model_hash" in meta
    assert json.loads(meta["ss_tag_frequency"])
    assert (out / "demo-step00000004.safetensors").exists()

    events = read_events(str(events_file))
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and events[-1]["status"] == "completed"
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 6
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and all(os.path.isfile(p) for e in samples for p in e["paths"])
    assert len(samples[0]["paths"]) == 2
    saves = [e for e in events if e["type"] == "save"]
    assert {s["kind"] for s in saves} >= {"step", "final"} and str(final) in events[-1]["outputs"]
    pngs = sorted((out / "sample").glob("demo_*.png"))
    assert len(pngs) == 4  # 2 prompts at steps 3 and 6


def test_lora_loads_in_diffusers_and_changes_output(tmp_path, tiny_sd1, demo_data):
    """The trained file loads with diffusers' own kohya loader and changes what the U-Net predicts."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    cfg = write_run_toml(
        tmp_path / "run.toml", pretrained_model_name_or_path=tiny_sd1.diffusers_dir, train_data_dir=demo_data,
        output_dir=str(out), output_name="lora", resolution="64", network_dim=4, network_alpha=4.0,
        learning_rate=5e-3, max_train_steps=4, caption_extension=".txt", seed=3)
    run_trainer(accelerate_cmd("--config_file", cfg))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1.diffusers_dir, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        before = pipe.unet(latents, 500, cond).sample
        pipe.load_lora_weights(str(out / "lora.safetensors"))
        after = pipe.unet(latents, 500, cond).sample
    assert not torch.allclose(before, after)


def test_overfitting_one_image_lowers_the_loss(tmp_path, tiny_sd1):
    from PIL import Image

    data = tmp_path / "data" / "1_sks"
    data.mkdir(parents=True)
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    for x in range(0, 64, 16):
        img.paste((20, 20, 220), (x, 0, x + 8, 64))
    img.save(data / "a.png")
    events_file = tmp_path / "events.jsonl"
    cfg = write_run_toml(
        tmp_path / "run.toml", pretrained_model_name_or_path=tiny_sd1.single_file, train_data_dir=str(data.parent),
        output_dir=str(tmp_path / "out"), resolution="64", network_dim=8, network_alpha=8.0, learning_rate=1e-2,
        max_train_steps=80, cache_latents=True, seed=0, min_timestep=400, max_timestep=401,
        network_train_unet_only=True, events_file=str(events_file))
    run_trainer(accelerate_cmd("--config_file", cfg))
    losses = [e["loss"] for e in read_events(str(events_file)) if e["type"] == "progress"]
    assert len(losses) >= 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_sd2_v_prediction_run(tmp_path, tiny_sd2v, demo_data):
    out = tmp_path / "out"
    events_file = tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd2v.single_file, "--v2", "--v_parameterization",
        "--train_data_dir", demo_data, "--output_dir", str(out), "--output_name", "v", "--resolution", "64",
        "--caption_extension", ".txt", "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "3",
        "--events_file", str(events_file)))
    tensors, meta = lora_tensors(out / "v.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.prediction_type"] == "v"
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    start = read_events(str(events_file))[0]
    assert start["model_family"] == "sd2" and start["v_prediction"] is True


def test_two_processes_on_cpu(tmp_path, tiny_sd1, demo_data):
    out = tmp_path / "out"
    events_file = tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", demo_data,
        "--output_dir", str(out), "--output_name", "ddp", "--resolution", "64", "--caption_extension", ".txt",
        "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "4", "--cache_latents",
        "--validation_split", "0.3", "--validate_every_n_steps", "2", "--max_validation_steps", "2",
        "--events_file", str(events_file), num_processes=2))
    tensors, meta = lora_tensors(out / "ddp.safetensors")
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    events = read_events(str(events_file))
    assert events[0]["num_processes"] == 2
    assert events[-1]["status"] == "completed"
    # the trainer compares the trained weights of both processes before saving: they must not have drifted apart
    assert not [e for e in events if e["type"] == "warning" and "processes" in e["message"]]
    # the validation loss: each process scores one of the two held-out batches, the main process reports the mean
    validations = [e for e in events if e["type"] == "validation"]
    assert [(e["kind"], e["step"]) for e in validations] == [("step", 2), ("step", 4), ("epoch", 4)]
    assert all(e["loss"] is not None and e["batches"] == 2 for e in validations)
    assert events[0]["num_validation_images"] == 4


def test_sd_scripts_command_line_runs_as_written(tmp_path, tiny_sd1, demo_data):
    """A typical kohya sd-scripts SD1.5 LoRA command line, pointed at the tiny model."""
    prompts = tmp_path / "prompt.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --s 2\n")
    out = tmp_path / "out"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", demo_data,
        "--output_dir", str(out), "--resolution", "64,64", "--network_module", "networks.lora",
        "--network_dim", "8", "--network_alpha", "4", "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--max_train_steps", "3", "--mixed_precision", "no",
        "--save_model_as", "safetensors", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
        "--caption_extension", ".txt", "--cache_latents", "--gradient_checkpointing", "--sdpa",
        "--output_name", "cli"))
    tensors, meta = lora_tensors(out / "cli.safetensors")
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert list((out / "sample").glob("cli_*.png"))


def test_sigint_saves_and_reports_stopped(tmp_path, tiny_sd1, demo_data):
    out = tmp_path / "out"
    events_file = tmp_path / "events.jsonl"
    cmd = accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", demo_data,
        "--output_dir", str(out), "--output_name", "stopped", "--resolution", "64", "--caption_extension", ".txt",
        "--network_dim", "4", "--max_train_steps", "100000", "--events_file", str(events_file))
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(e["type"] == "progress" and e["step"] >= 3 for e in read_events(str(events_file))):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no progress within 120 s")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        deadline = time.time() + 60
        while time.time() < deadline:
            events = read_events(str(events_file))
            if events and events[-1]["type"] == "done":
                break
            time.sleep(0.2)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = read_events(str(events_file))[-1]
    assert done["type"] == "done" and done["status"] == "stopped", done
    tensors, meta = lora_tensors(out / "stopped.safetensors")
    assert tensors and int(meta["ss_steps"]) >= 3


def test_many_options_together(tmp_path, tiny_sd1, demo_data):
    """bf16 autocast, accumulation, epochs, restarts schedule, clip skip, long captions, noise options, per-epoch
    saves pruned to the last 2, samples at first and per epoch, then a second run continuing from the file."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("sks dog --w 64 --h 64 --s 1 --ss euler_a\n")
    out = tmp_path / "out"
    events_file = tmp_path / "events.jsonl"
    common = dict(pretrained_model_name_or_path=tiny_sd1.diffusers_dir, train_data_dir=demo_data,
                  resolution="64", caption_extension=".txt", enable_bucket=True, min_bucket_reso=64,
                  max_bucket_reso=128, train_batch_size=2, seed=5)
    cfg = write_run_toml(
        tmp_path / "run.toml", output_dir=str(out), output_name="many", mixed_precision="bf16",
        gradient_accumulation_steps=2, max_train_epochs=4, lr_scheduler="cosine_with_restarts",
        lr_scheduler_num_cycles=2, lr_warmup_steps=0.1, clip_skip=2, max_token_length=150, noise_offset=0.05,
        min_snr_gamma=5.0, save_every_n_epochs=1, save_last_n_epochs=2, sample_prompts=str(prompts),
        sample_at_first=True, sample_every_n_epochs=2, network_dim=4, network_alpha=4.0, learning_rate=1e-3,
        network_dropout=0.1, network_args=["rank_dropout=0.1", "module_dropout=0.1"], shuffle_caption=True,
        keep_tokens=1, caption_tag_dropout_rate=0.1, flip_aug=True, events_file=str(events_file), **common)
    run_trainer(accelerate_cmd("--config_file", cfg))
    events = read_events(str(events_file))
    start = events[0]
    assert start["total_epochs"] == 4 and start["total_steps"] == 4 * start["steps_per_epoch"]
    assert events[-1]["status"] == "completed" and events[-1]["epoch"] == 4
    epoch_files = sorted(p.name for p in out.glob("many-*.safetensors"))
    assert epoch_files == ["many-000002.safetensors", "many-000003.safetensors"]  # epoch 4 is the final file
    samples = [e for e in events if e["type"] == "sample"]
    assert [e["step"] for e in samples][0] == 0 and len(samples) == 3  # at first, after epochs 2 and 4
    assert len(list((out / "sample").glob("many_e000002_*.png"))) == 1
    lrs = [e["lr"] for e in events if e["type"] == "progress"]
    assert max(lrs) <= 1e-3 + 1e-12 and lrs[0] < 1e-3  # warmup, then cosine with restarts
    _, meta = lora_tensors(out / "many.safetensors")
    assert meta["ss_clip_skip"] == "2" and meta["ss_mixed_precision"] == "bf16"

    # continue from the file with ranks taken from it
    out2 = tmp_path / "out2"
    cfg2 = write_run_toml(tmp_path / "run2.toml", output_dir=str(out2), output_name="cont", max_train_steps=1,
                          network_weights=str(out / "many.safetensors"), dim_from_weights=True, unet_lr=0.0,
                          learning_rate=1e-3, **common)
    run_trainer(accelerate_cmd("--config_file", cfg2))
    first, _ = lora_tensors(out / "many.safetensors")
    second, _ = lora_tensors(out2 / "cont.safetensors")
    assert first.keys() == second.keys()
    # unet_lr 0: the U-Net's continued weights are the file's (a rate of 0 leaves a part untrained, as sd-scripts);
    # the text encoder's moved on from them
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith("lora_unet_"))
    assert any(not torch.equal(first[k], second[k]) for k in first if k.startswith("lora_te_"))


def test_control_folder_save_and_stop_requests(tmp_path, tiny_sd1, demo_data):
    from sd_scripts.training.control import request

    job = tmp_path / "job"
    job.mkdir()
    out = tmp_path / "out"
    events_file = job / "events.jsonl"
    cmd = accelerate_cmd(
        "--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", demo_data,
        "--output_dir", str(out), "--output_name", "ctl", "--resolution", "64", "--caption_extension", ".txt",
        "--max_train_steps", "100000", "--events_file", str(events_file), "--control_dir", str(job))
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def wait(predicate, what):
            deadline = time.time() + 120
            while time.time() < deadline:
                events = read_events(str(events_file))
                if predicate(events):
                    return events
                time.sleep(0.2)
            raise AssertionError(f"timed out waiting for {what}")

        wait(lambda ev: any(e["type"] == "progress" and e["step"] >= 2 for e in ev), "progress")
        request(str(job), "save")
        events = wait(lambda ev: any(e["type"] == "save" for e in ev), "save-now")
        saved = [e for e in events if e["type"] == "save"][0]
        assert saved["kind"] == "step" and os.path.isfile(saved["path"])
        request(str(job), "stop")
        events = wait(lambda ev: ev and ev[-1]["type"] == "done", "done")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert events[-1]["status"] == "stopped"
    assert (out / "ctl.safetensors").is_file()


def test_save_state_and_resume_continue_the_same_run(tmp_path, tiny_sd1, demo_data):
    """A run resumed from its step-2 state folder ends with the same LoRA as the run that went straight through."""
    common = ["--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir", demo_data,
              "--resolution", "64", "--caption_extension", ".txt", "--network_dim", "4", "--learning_rate", "1e-2",
              "--max_train_steps", "4", "--seed", "3", "--cache_latents", "--output_name", "r"]
    full = tmp_path / "full"
    run_trainer(accelerate_cmd(*common, "--output_dir", str(full), "--save_every_n_steps", "2", "--save_state"))
    state = full / "r-step00000002-state"
    assert (state / "train_state.json").is_file()
    resumed = tmp_path / "resumed"
    events_file = tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(*common, "--output_dir", str(resumed), "--resume", str(state),
                               "--events_file", str(events_file)))
    steps = [e["step"] for e in read_events(str(events_file)) if e["type"] == "progress"]
    assert steps[0] == 3 and steps[-1] == 4
    a, _ = lora_tensors(full / "r.safetensors")
    b, meta = lora_tensors(resumed / "r.safetensors")
    assert meta["ss_steps"] == "4"
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "the resumed run diverged from the straight one"
