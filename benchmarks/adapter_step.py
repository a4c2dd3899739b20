"""Adapter training step: LyCORIS LoKr / LoHa (lycoris.kohya and our networks.lokr / networks.loha) against our LoRA.

Workload: a U-Net of the SD 1.5 architecture at its real block widths (320, 640, 1280 channels, cross-attention
768, 8 heads) with fewer blocks (--blocks down/up blocks, --layers ResNet+attention layers per block) so that it runs
on a CPU; random weights; the adapter on the U-Net's default targets at rank --rank (alpha 1); batch 1 at --latent
(latent side, 32 = 256 px); one step = forward + MSE loss + backward + AdamW. Each adapter runs in its own process,
so its peak memory (max RSS, or CUDA peak with --device cuda) is its own. Prints one JSON line per adapter and a
table.

    .venv/bin/python benchmarks/adapter_step.py --steps 5
    .venv/bin/python benchmarks/adapter_step.py --adapters lora lycoris-lokr --device cuda --latent 64
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ADAPTERS = {
    "lora": ("networks.lora", []),
    "lycoris-lokr": ("lycoris.kohya", ["algo=lokr", "factor=8"]),
    "lycoris-loha": ("lycoris.kohya", ["algo=loha"]),
    "lycoris-locon": ("lycoris.kohya", ["algo=locon", "preset=attn-mlp"]),
    "native-lokr": ("networks.lokr", ["factor=8"]),
    "native-loha": ("networks.loha", []),
}
FAMILY = "sd1"  # the SD 1.x naming for the U-Net's layers


def build_unet(blocks: int, layers: int):
    from diffusers import UNet2DConditionModel

    widths = (320, 640, 1280, 1280)[:blocks]
    down = ("CrossAttnDownBlock2D",) * blocks
    up = ("CrossAttnUpBlock2D",) * blocks
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=widths,
                                down_block_types=down, up_block_types=up, layers_per_block=layers,
                                cross_attention_dim=768, attention_head_dim=8)


def run(adapter: str, args) -> dict:
    import torch

    from sd_scripts.networks.registry import resolve_network_module

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    unet = build_unet(args.blocks, args.layers).requires_grad_(False).to(device)
    base_params = sum(p.numel() for p in unet.parameters())
    module, net_args = ADAPTERS[adapter]
    t0 = time.perf_counter()
    network = resolve_network_module(module).create_network(
        unet=unet, text_encoders=[], family=FAMILY, network_dim=args.rank, network_alpha=1.0,
        network_args=net_args, train_text_encoder=False)
    network.apply_to()
    network.to(device)
    build_s = time.perf_counter() - t0
    groups, _ = network.prepare_optimizer_params(1e-4, None, 1e-4)
    trained = sum(p.numel() for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    latent = torch.randn(1, 4, args.latent, args.latent, device=device)
    context = torch.randn(1, 77, 768, device=device)
    target = torch.randn_like(latent)
    timestep = torch.tensor([500], device=device)

    def step():
        pred = unet(latent, timestep, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, lazy kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"adapter": adapter, "network_module": module, "network_args": net_args, "rank": args.rank,
            "modules": len(network.unet_loras), "trained_params": trained, "base_params": base_params,
            "build_s": round(build_s, 3), "step_s": round(seconds, 4), "peak_mib": round(peak, 1),
            "device": args.device, "latent": args.latent, "blocks": args.blocks, "layers": args.layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="*", default=list(ADAPTERS), choices=list(ADAPTERS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run(args.one, args)), flush=True)
        return
    rows = []
    for adapter in args.adapters:
        argv = [sys.executable, os.path.abspath(__file__), "--one", adapter, "--steps", str(args.steps),
                "--rank", str(args.rank), "--latent", str(args.latent), "--blocks", str(args.blocks),
                "--layers", str(args.layers), "--threads", str(args.threads), "--device", args.device]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not line:
            print(f"{adapter}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(line[-1])
        rows.append(row)
        print(line[-1], flush=True)
    if rows:
        lora = next((r for r in rows if r["adapter"] == "lora"), rows[0])
        print(f"\n{'adapter':15} {'modules':>7} {'trained':>10} {'step s':>8} {'x LoRA':>7} {'peak MiB':>9}")
        for r in rows:
            print(f"{r['adapter']:15} {r['modules']:7d} {r['trained_params']:10d} {r['step_s']:8.3f} "
                  f"{r['step_s'] / lora['step_s']:7.2f} {r['peak_mib']:9.1f}")


if __name__ == "__main__":
    main()
