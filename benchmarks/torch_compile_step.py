"""torch_compile speed-up: eager vs compiled s/step of the SD 1.5-architecture LoRA training step, at reduced size.

The SD 1.5 U-Net layout (4 resolutions, 2 layers per block, cross-attention in the first 3, attention heads of 8,
CLIP-L sized conditioning) with its channel widths divided by --shrink (default 5: 64/128/256/256 instead of
320/640/1280/1280), random weights; our LoRA (U-Net only, rank 8) applied; batch 1 at --resolution px (latents
resolution/8); each step is U-Net forward + MSE loss + backward + AdamW on the LoRA, as the trainer runs it.
The compiled mode goes through the trainer's own path: an Accelerator built from `--torch_compile --dynamo_backend
<backend>` (training/accelerator_setup.py) and `compile_denoiser`, which compiles the U-Net in place.

Each mode runs in its own process (accelerate's process-wide state, a cold compiler cache):

    .venv/bin/python benchmarks/torch_compile_step.py                       # eager, then inductor; JSON lines
    .venv/bin/python benchmarks/torch_compile_step.py --device cuda --shrink 1 --resolution 512 --steps 20

Prints one JSON line per mode (first step incl. compilation, median s/step after --warmup steps) and a summary
line with the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_mode(backend: str, steps: int, warmup: int, resolution: int, shrink: int, device: str) -> dict:
    import torch
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from sd_scripts.families.sd.arch import bundled_config
    from sd_scripts.networks.lora import create_network
    from sd_scripts.options import parse_args
    from sd_scripts.training.accelerator_setup import accelerator_kwargs, compile_denoiser

    torch.manual_seed(0)
    config = dict(bundled_config("sd1", False, "unet"))
    config["block_out_channels"] = [c // shrink for c in config["block_out_channels"]]
    unet = UNet2DConditionModel.from_config(config).to(device)
    unet.requires_grad_(False)
    network = create_network(unet=unet, text_encoders=[], family="sd1", network_dim=8, network_alpha=8.0,
                             train_text_encoder=False).to(device)
    network.apply_to()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)

    argv = ["--torch_compile", "--dynamo_backend", backend] if backend != "eager-mode" else []
    accelerator = Accelerator(cpu=device == "cpu", **accelerator_kwargs(parse_args("network", argv)))
    compiled = compile_denoiser(accelerator, unet)

    side = resolution // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, side, side, generator=g).to(device)
    noise = torch.randn(1, 4, side, side, generator=g).to(device)
    cond = torch.randn(1, 77, config["cross_attention_dim"], generator=g).to(device)
    timesteps = torch.tensor([500], device=device)

    def step() -> float:
        t0 = time.perf_counter()
        pred = unet(latents + noise, timesteps, cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = step()
    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    return {"mode": "compiled" if compiled else "eager", "backend": backend if compiled else None,
            "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "resolution": resolution, "unet_channels": config["block_out_channels"],
            "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            "lora_params_k": round(sum(p.numel() for p in network.parameters()) / 1e3, 1),
            "first_step_s": round(first, 3), "s_per_step": round(statistics.median(times), 4),
            "steps": steps, "warmup": warmup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="dynamo_backend of the compiled mode")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--shrink", type=int, default=5, help="divide the SD 1.5 channel widths by this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=("eager", "compiled"), help=argparse.SUPPRESS)  # one mode, in-process
    a = parser.parse_args()
    if a.mode:
        backend = "eager-mode" if a.mode == "eager" else a.backend
        print(json.dumps(run_mode(backend, a.steps, a.warmup, a.resolution, a.shrink, a.device)), flush=True)
        return
    results = {}
    for mode in ("eager", "compiled"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--backend", a.backend, "--steps",
               str(a.steps), "--warmup", str(a.warmup), "--resolution", str(a.resolution), "--shrink",
               str(a.shrink), "--device", a.device]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    eager, compiled = results["eager"]["s_per_step"], results["compiled"]["s_per_step"]
    print(json.dumps({"summary": "torch_compile", "backend": a.backend, "eager_s_per_step": eager,
                      "compiled_s_per_step": compiled, "speedup": round(eager / compiled, 2),
                      "compile_overhead_s": round(results["compiled"]["first_step_s"]
                                                  - results["eager"]["first_step_s"], 1)}))


if __name__ == "__main__":
    main()
