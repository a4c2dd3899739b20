"""Optimizer step time and optimizer-state memory, per optimizer_type, on the parameters of an SD 1.5 rank-16 LoRA.

The parameter set is the real one: our LoRA network (U-Net + text encoder, default targets, rank 16) created on the
SD 1.5 architecture built from the bundled configs on the meta device (so no U-Net weights are allocated and no
forward is run); only the LoRA's own tensors are real. Each optimizer gets the same random gradients; the step time
is the median of --steps timed steps after an untimed one (state allocated, lazy set-up done); the state memory
is every tensor the optimizer holds (its state and its groups), measured after those steps.

    .venv/bin/python benchmarks/optimizer_step.py                         # every registered optimizer, CPU
    .venv/bin/python benchmarks/optimizer_step.py --device cuda --steps 20
    .venv/bin/python benchmarks/optimizer_step.py --only AdamW Prodigy pytorch_optimizer.CAME --json

Prints a table (optimizer, step ms, state MiB, state bytes per parameter), or one JSON line per optimizer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EXTRA = ("pytorch_optimizer.CAME", "prodigyplus.ProdigyPlusScheduleFree")  # module.Class examples
ADAPTIVE_LR = 1.0  # D-Adaptation / Prodigy / prodigyplus: the learning rate is a multiplier
LR = 1e-4


def lora_parameters(family: str, rank: int, device: str):
    """The trained tensors of a rank-`rank` LoRA on the family's U-Net and text encoder (bundled configs)."""
    import torch

    from sd_scripts.families.sd.arch import bundled_config
    from sd_scripts.families.sd.loading import build_text_encoder, build_unet
    from sd_scripts.networks.lora import create_network

    unet = build_unet(bundled_config(family, False, "unet"))  # meta device: shapes only
    text_encoder = build_text_encoder(bundled_config(family, False, "text_encoder"))
    torch.manual_seed(0)
    net = create_network(unet=unet, text_encoders=[text_encoder], family=family, network_dim=rank,
                         network_alpha=rank)
    net.to(device)
    return [p for p in net.parameters() if p.requires_grad], len(net.unet_loras), len(net.text_encoder_loras)


def state_bytes(optimizer) -> int:
    import torch

    seen: set[int] = set()
    total = 0

    def add(value):
        nonlocal total
        if torch.is_tensor(value) and id(value) not in seen:
            seen.add(id(value))
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                add(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    for state in optimizer.state.values():
        add(state)
    for group in optimizer.param_groups:
        add({k: v for k, v in group.items() if k != "params"})
    return total


def measure(name: str, params, grads, steps: int, device: str) -> dict:
    import torch

    from sd_scripts.training.optim import create_optimizer, entry_for

    entry = entry_for(name)
    adaptive = (entry is not None and entry.adaptive) or name.startswith("prodigyplus")
    lr = ADAPTIVE_LR if adaptive else LR
    work = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = create_optimizer(name, None, [{"params": work, "lr": lr}], lr, warn=lambda m: None)
        times = []
        for i in range(steps + 1):
            for p, g in zip(work, grads):
                p.grad = g
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 1:
                times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in work)
    size = state_bytes(optimizer)
    return {"optimizer": name, "step_ms": round(statistics.median(times) * 1000, 2), "state_mib": round(size / 2**20, 1),
            "state_bytes_per_param": round(size / n, 2), "params": n, "device": device}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1", help="model family whose bundled configs give the shapes")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="optimizer names (default: every registered one + examples)")
    parser.add_argument("--json", action="store_true", help="one JSON line per optimizer instead of a table")
    args = parser.parse_args(argv)

    import torch

    from sd_scripts.training.optim import OPTIMIZER_NAMES

    torch.set_num_threads(max(1, torch.get_num_threads()))
    params, n_unet, n_te = lora_parameters(args.family, args.rank, args.device)
    total = sum(p.numel() for p in params)
    g = torch.Generator(device=args.device).manual_seed(1)
    grads = [torch.randn(p.shape, generator=g, device=args.device) * 1e-3 for p in params]
    names = args.only or [*OPTIMIZER_NAMES, *EXTRA]
    if not args.json:
        print(f"{args.family} rank-{args.rank} LoRA: {n_unet} U-Net + {n_te} text-encoder modules, {len(params)} "
              f"tensors, {total / 1e6:.2f} M parameters ({total * 4 / 2**20:.1f} MiB fp32), device {args.device}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{'optimizer':40s} {'step ms':>9s} {'state MiB':>10s} {'B/param':>8s}")
    for name in names:
        try:
            row = measure(name, params, grads, args.steps, args.device)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            row = {"optimizer": name, "error": f"{type(e).__name__}: {e}"}
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{name:40s} error: {row['error']}", flush=True)
        else:
            print(f"{name:40s} {row['step_ms']:9.1f} {row['state_mib']:10.1f} {row['state_bytes_per_param']:8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
