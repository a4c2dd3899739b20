"""LoRA training speed on this machine: steps/s, time to the first step and peak memory of a real run.

Workloads (random weights, deterministic, offline), the same set-up the sd-scripts baseline was measured with:
  tiny  the bench's tiny SD1-style model (U-Net 32/64 channels) at 64 px, rank 4
  sd15  the full SD 1.5 architecture (860M U-Net) at 256 px, rank 16
Both: batch 1, U-Net-only LoRA, fp32, AdamW, cached latents, `accelerate launch --cpu` with 2 threads,
16 images in one '10_sks dog' folder.

    .venv/bin/python benchmarks/train_lora.py --size tiny --steps 60
    .venv/bin/python benchmarks/train_lora.py --size sd15 --steps 12 --warmup 2
    .venv/bin/python benchmarks/train_lora.py --size tiny --disk-cache   # second run reuses the .npz cache

Prints one JSON line per run and a summary line. Timing comes from the trainer's --events_file (each progress event
carries its own wall-clock time); memory from polling the process tree's RSS every 0.1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=32)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
TINY_TE = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=49406,
               eos_token_id=49407, pad_token_id=1)
SIZES = {"tiny": dict(resolution=64, rank=4), "sd15": dict(resolution=256, rank=16)}


def build_workload(size: str, root: str) -> tuple[str, str]:
    """A diffusers folder with random weights and 16 captioned images; reused when present."""
    model_dir, data_dir = os.path.join(root, "model"), os.path.join(root, "train")
    if os.path.isfile(os.path.join(model_dir, "model_index.json")) and os.path.isdir(data_dir):
        return model_dir, data_dir
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_scripts.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    if size == "tiny":
        unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
        te = CLIPTextModel(CLIPTextConfig(**TINY_TE))
    else:
        from sd_scripts.families.sd.arch import bundled_config

        unet = UNet2DConditionModel.from_config(bundled_config("sd1", False, "unet"))
        vae = AutoencoderKL.from_config(bundled_config("sd1", False, "vae"))
        te = CLIPTextModel(CLIPTextConfig(**bundled_config("sd1", False, "text_encoder")))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=load_clip_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    _make_images(data_dir, SIZES[size]["resolution"])
    return model_dir, data_dir


def _make_images(data_dir: str, res: int) -> None:
    from PIL import Image, ImageDraw

    folder = os.path.join(data_dir, "10_sks dog")
    os.makedirs(folder, exist_ok=True)
    for i in range(16):
        w, h = [(res, res), (res * 5 // 4, res), (res, res * 5 // 4)][i % 3]
        img = Image.new("RGB", (w, h), ((i * 37) % 255, (i * 91) % 255, (i * 53) % 255))
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(255 - i * 10, 120, i * 12))
        img.save(os.path.join(folder, f"img{i:02d}.png"))
        with open(os.path.join(folder, f"img{i:02d}.txt"), "w") as f:
            f.write(f"sks dog, picture {i}, shape")


def _tree_rss_mb(pid: int) -> tuple[float, float]:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rss = []
    for p in procs:
        try:
            rss.append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return (max(rss) if rss else 0) / 2**20, sum(rss) / 2**20


def run_once(size: str, root: str, steps: int, warmup: int, threads: int, disk_cache: bool, tag: str) -> dict:
    model_dir, data_dir = build_workload(size, root)
    out = os.path.join(root, f"run-{tag}")
    os.makedirs(out, exist_ok=True)
    events = os.path.join(out, "events.jsonl")
    if os.path.exists(events):
        os.remove(events)
    cfg = SIZES[size]
    cmd = [os.path.join(REPO, ".venv", "bin", "accelerate"), "launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(threads), "-m", "sd_scripts.train_network",
           "--pretrained_model_name_or_path", model_dir, "--train_data_dir", data_dir, "--output_dir", out,
           "--output_name", "bench", "--resolution", str(cfg["resolution"]), "--network_module", "networks.lora",
           "--network_dim", str(cfg["rank"]), "--network_alpha", "1", "--network_train_unet_only",
           "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
           "--max_train_steps", str(steps), "--train_batch_size", "1", "--mixed_precision", "no", "--cache_latents",
           "--sdpa", "--save_model_as", "safetensors", "--caption_extension", ".txt", "--seed", "42",
           "--max_data_loader_n_workers", "0", "--events_file", events]
    if disk_cache:
        cmd.append("--cache_latents_to_disk")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak, peak_tree = 0.0, 0.0
        while proc.poll() is None:
            rss, tree = _tree_rss_mb(proc.pid)
            peak, peak_tree = max(peak, rss), max(peak_tree, tree)
            time.sleep(0.1)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed (rc={proc.returncode}); see {out}/log.txt")
    evs = [json.loads(line) for line in open(events) if line.strip()]
    step_time = {e["step"]: e["time"] for e in evs if e["type"] == "progress"}
    first = min(step_time)
    last = max(step_time)
    w = min((s for s in step_time if s >= warmup), default=first)
    steady = (last - w) / (step_time[last] - step_time[w]) if step_time[last] > step_time[w] else None
    start = next(e for e in evs if e["type"] == "start")
    return {"size": size, "tag": tag, "steps": steps, "steady_steps_per_s": steady,
            "s_per_step": 1 / steady if steady else None, "time_to_first_step_s": step_time[first] - t0,
            "setup_s": start["time"] - t0, "wall_s": wall, "peak_rss_mb": round(peak), "peak_tree_rss_mb":
            round(peak_tree), "final_loss": [e for e in evs if e["type"] == "progress"][-1]["loss"],
            "done": evs[-1].get("status")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=None, help="steps left out of steps/s (default steps/10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--work", default="/tmp/kohya-bench")
    p.add_argument("--disk-cache", action="store_true", help="cache latents on disk; run twice to see the reuse")
    a = p.parse_args()
    root = os.path.join(a.work, a.size)
    warmup = a.warmup if a.warmup is not None else max(1, a.steps // 10)
    results = []
    for i in range(a.repeat * (2 if a.disk_cache else 1)):
        r = run_once(a.size, root, a.steps, warmup, a.threads, a.disk_cache, tag=str(i))
        print(json.dumps(r), flush=True)
        results.append(r)
    best = max(results, key=lambda r: r["steady_steps_per_s"] or 0)
    print(f"{a.size}: {best['steady_steps_per_s']:.3f} steps/s ({best['s_per_step']:.3f} s/step), first step "
          f"{min(r['time_to_first_step_s'] for r in results):.1f} s, peak RSS {max(r['peak_rss_mb'] for r in results)}"
          f" MiB (n={len(results)})")


if __name__ == "__main__":
    main()
