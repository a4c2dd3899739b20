"""Anima LoRA training step: our `python -m sd_scripts.anima_train_network` beside sd-scripts'
`anima_train_network.py` (kohya-ss/sd-scripts 48d368f) on the same reduced Anima model, in the same run, interleaved
(ours, peer, ours, peer, ...). Prints s/step (steady), time to first step, peak RSS and the ratios ours/peer.

The workload (random weights, seeded, offline; built once under --work and reused):
  DiT       Anima-Preview's architecture at the REAL block width (2048 = 16 heads x 128, adaLN-LoRA 256, context
            1024, RoPE 1/4/4, the padding-mask channel) and its real LLM adapter (1024 wide, 6 blocks, 32,128-row T5
            vocabulary), but FEWER DiT blocks (default 2; --blocks N). One `net.`-prefixed single file, the layout of
            anima-preview.safetensors.
  qwen3     a Qwen3 encoder with the real output width 1024 (what the adapter reads) and the real 151,936-token
            vocabulary but 1 layer (2 heads of 128, one key/value head): both trainers run with
            --cache_text_encoder_outputs, so it runs once per caption before the loop (bf16 file).
  vae       the real Qwen-Image VAE architecture (ComfyUI / Wan names, bf16 file); latents are cached before the loop.
  images    --images (default 4) synthetic captioned images at --resolution (default 256 px).

Training options, identical for both trainers: LoRA (networks.lora_anima) rank 16 / alpha 16 on the DiT blocks
(--network_train_unet_only), AdamW lr 1e-4 constant, batch 1, --cache_latents, --cache_text_encoder_outputs,
--qwen3_max_token_length / --t5_max_token_length (default 128 on the CPU; the adapter runs inside each step on the
T5 tokens), timestep_sampling sigmoid, seed 42, 0 DataLoader workers, fp32 on the CPU (--mixed_precision no). Each
run is `accelerate launch [--cpu] --num_cpu_threads_per_process T benchmarks/anima_bench_launch.py ours|peer ...`
(sd-scripts unchanged; the shim sets its DiT depth and Qwen3 sizes from the files, see that file).

Timing, memory and the summary are benchmarks/flux_lora_step.py's (events file for ours, tqdm for the peer; steady
s/step after --warmup steps; ru_maxrss of the trainer process).

    .venv/bin/python benchmarks/anima_lora_step.py --pairs 2 --steps 4
    .venv/bin/python benchmarks/anima_lora_step.py --build-only
    # GPU: the full depth (28 blocks) at 1024 px, bf16, gradient checkpointing, 512 tokens
    .venv/bin/python benchmarks/anima_lora_step.py --full --device cuda --pairs 2 --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
import flux_lora_step as flux  # noqa: E402 - the shared harness pieces (timing, summary, images)

LAUNCH = os.path.join(HERE, "anima_bench_launch.py")
WORKLOAD_VERSION = 1
BENCH_QWEN3 = dict(hidden_size=1024, head_dim=128, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=256, num_hidden_layers=1, max_window_layers=1)


def _random_state(module, seed: int, component: str, dtype) -> dict:
    from sd_scripts.tools.tiny_model import random_tensor

    return {name: random_tensor(seed, f"{component}:{name}", tuple(t.shape),
                                t.ndim == 1 and name.endswith((".weight", ".gamma"))).to(dtype)
            for name, t in module.state_dict().items()}


def build_workload(root: str, spec: dict, log=print) -> dict:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen3Config, Qwen3Model

    from sd_scripts.families.anima import layout
    from sd_scripts.families.anima.weights import build_transformer, save_qwen3, save_transformer, save_vae

    paths = dict(transformer=os.path.join(root, "anima-bench.safetensors"),
                 qwen3=os.path.join(root, "qwen3-bench.safetensors"),
                 vae=os.path.join(root, "qwen_image_vae.safetensors"),
                 train_data_dir=os.path.join(root, "train"))
    marker = os.path.join(root, "workload.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("spec") == spec and all(os.path.exists(p) for p in paths.values()):
            return dict(paths, params=done["params"])
        os.remove(marker)
    t0 = time.time()
    os.makedirs(root, exist_ok=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    dit = build_transformer(dict(layout.REAL_CONFIG, num_layers=spec["blocks"]), layout.REAL_ADAPTER)
    dit.load_state_dict(_random_state(dit, spec["seed"], "dit", dtype), strict=True, assign=True)
    params = sum(p.numel() for p in dit.parameters())
    save_transformer(dit, paths["transformer"], metadata={"modelspec.title": "anima-bench"})
    del dit
    with init_empty_weights():
        qwen = Qwen3Model(Qwen3Config(**dict(layout.QWEN3_CONFIG, **BENCH_QWEN3)))
    qwen.load_state_dict(_random_state(qwen, spec["seed"], "qwen3", torch.bfloat16), strict=True, assign=True)
    save_qwen3(qwen, paths["qwen3"])
    del qwen
    with init_empty_weights():
        vae = AutoencoderKLQwenImage(**layout.VAE_CONFIG)
    vae.load_state_dict(_random_state(vae, spec["seed"], "vae", torch.bfloat16), strict=True, assign=True)
    save_vae(vae, paths["vae"])
    flux.make_images(paths["train_data_dir"], spec["images"], spec["resolution"])
    with open(marker, "w") as f:
        json.dump({"spec": spec, "params": params}, f)
    log(f"[anima_lora_step] workload written to {root} in {time.time() - t0:.1f} s ({params / 1e6:.0f}M DiT + "
        f"adapter parameters)")
    return dict(paths, params=params)


def trainer_args(paths: dict, out: str, *, resolution: int, steps: int, rank: int, tokens: int, precision: str,
                 extra: list[str]) -> list[str]:
    return ["--pretrained_model_name_or_path", paths["transformer"], "--qwen3", paths["qwen3"], "--vae", paths["vae"],
            "--train_data_dir", paths["train_data_dir"], "--output_dir", out, "--output_name", "bench",
            "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--network_module", "networks.lora_anima", "--network_dim", str(rank), "--network_alpha", str(rank),
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--mixed_precision", precision, "--cache_latents",
            "--cache_text_encoder_outputs", "--qwen3_max_token_length", str(tokens), "--t5_max_token_length",
            str(tokens), "--timestep_sampling", "sigmoid", "--seed", "42", "--max_data_loader_n_workers", "0",
            "--caption_extension", ".txt", "--save_model_as", "safetensors"] + list(extra)


def run_trainer(trainer: str, *, run_dir: str, paths: dict, peer_dir: str, peer_python: str, device: str,
                threads: int, timeout: float, warmup: int, precision: str, **kw) -> dict:
    """One launch (flux_lora_step.run_trainer's measurement, with this benchmark's launch shim and options)."""
    saved = (flux.LAUNCH, flux.trainer_args)
    flux.LAUNCH = LAUNCH
    flux.trainer_args = lambda p, out, variant, swap, **k: trainer_args(p, out, **k)
    try:
        return flux.run_trainer(trainer, run_dir=run_dir, paths=paths, peer_dir=peer_dir, peer_python=peer_python,
                                device=device, threads=threads, timeout=timeout, variant="base", warmup=warmup,
                                precision=precision, swap=0, **kw)
    finally:
        flux.LAUNCH, flux.trainer_args = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=None, help="DiT blocks (default 2; --full: 28)")
    p.add_argument("--resolution", type=int, default=None, help="px (default 256; --full: 1024)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=None, help="Qwen3 / T5 tokens (default 128; --full: 512)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--first", choices=("ours", "peer"), default="ours")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--full", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", default="/tmp/anima-bench")
    p.add_argument("--peer-dir", default="/tmp/peer/sd-scripts")
    p.add_argument("--peer-python", default="/tmp/peer/venv/bin/python")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--extra", default="")
    p.add_argument("--build-only", action="store_true")
    a = p.parse_args(argv)
    blocks = a.blocks or (28 if a.full else 2)
    resolution = a.resolution or (1024 if a.full else 256)
    tokens = a.tokens or (512 if a.full else 128)
    precision = "bf16" if a.device == "cuda" else "no"
    extra = a.extra.split() + (["--gradient_checkpointing"] if a.full else [])
    spec = dict(version=WORKLOAD_VERSION, blocks=blocks, resolution=resolution, images=a.images, seed=a.seed,
                dtype="bf16" if a.full else "fp32")
    root = os.path.join(a.work, f"workload-{blocks}-{resolution}-{spec['dtype']}")
    paths = build_workload(root, spec, log=lambda m: print(m, file=sys.stderr, flush=True))
    if a.build_only:
        print(json.dumps(dict(paths, spec=spec)))
        return 0
    order = ["ours"] if a.no_peer else ([a.first, "peer" if a.first == "ours" else "ours"])
    label = f"{blocks} DiT blocks @{resolution}px, {tokens} tokens, {a.device}, {precision}"
    runs_root = os.path.join(a.work, time.strftime("runs-%Y%m%d-%H%M%S"))
    kw = dict(paths=paths, peer_dir=a.peer_dir, peer_python=a.peer_python, device=a.device, threads=a.threads,
              timeout=a.timeout, warmup=a.warmup, precision=precision, resolution=resolution, steps=a.steps,
              rank=a.rank, tokens=tokens, extra=extra)
    runs = []
    for pair in range(1, a.pairs + 1):
        for trainer in order:
            print(f"[anima_lora_step] pair {pair}/{a.pairs}: {trainer} ...", file=sys.stderr, flush=True)
            r = run_trainer(trainer, run_dir=os.path.join(runs_root, f"{pair}-{trainer}"), **kw)
            r["pair"] = pair
            print(json.dumps(r), flush=True)
            runs.append(r)
    lines, summary = flux.summarise("base", runs, label)
    note = f"machine: {flux._cpu_note()}; shared with other jobs, so step times carry that noise."
    print("\n".join(lines + [note]), flush=True)
    with open(os.path.join(runs_root, "summary.json"), "w") as f:
        json.dump({"label": label, "spec": spec, "summary": summary, "runs": runs, "note": note}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
