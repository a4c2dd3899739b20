"""Textual inversion: what training only the new token rows costs, three ways, on the real CLIP-L table size.

  restore  the whole token-embedding weight [49408+n, 768] is the optimizer's parameter; after each optimizer step
           every row but the new ones is copied back (sd-scripts' way)
  mask     the whole weight is the parameter, a gradient hook zeroes the rows of old tokens (AdamW's decoupled
           weight decay would still move them, so the rows are restored too)
  rows     only an [n, 768] parameter is trained; a forward hook on the embedding substitutes it at the new ids
           (sd_scripts.training.ti_method)

Each step: embed a [batch, 77] id batch holding the new tokens, a stand-in loss, backward, AdamW step. The text
encoder's transformer layers are the same for all three, so they are left out. Prints one JSON line per way:
milliseconds per step and optimizer-state bytes.

    .venv/bin/python benchmarks/ti_trainable_rows.py [--steps 30] [--vectors 4] [--batch 4]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

VOCAB, DIM = 49408, 768


def _batch(n_new: int, batch: int) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (batch, 77))
    ids[:, 5:5 + n_new] = torch.arange(VOCAB, VOCAB + n_new)
    return ids


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def run(way: str, steps: int, n_new: int, batch: int) -> dict:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(VOCAB + n_new, DIM)
    original = emb.weight.detach().clone()
    ids = _batch(n_new, batch)
    if way == "rows":
        emb.weight.requires_grad_(False)
        rows = torch.nn.Parameter(emb.weight[VOCAB:].clone())

        def substitute(_module, inputs, output):
            index = inputs[0] - VOCAB
            new = index >= 0
            return torch.where(new.unsqueeze(-1), rows[index.clamp(min=0)].to(output.dtype), output)

        emb.register_forward_hook(substitute)
        optimizer = torch.optim.AdamW([rows], lr=1e-3)
    else:
        optimizer = torch.optim.AdamW([emb.weight], lr=1e-3)
        if way == "mask":
            keep = torch.zeros(VOCAB + n_new, 1)
            keep[VOCAB:] = 1
            emb.weight.register_hook(lambda grad: grad * keep)

    def step():
        loss = emb(ids).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if way in ("restore", "mask"):
            with torch.no_grad():
                emb.weight[:VOCAB] = original[:VOCAB]

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t0) / steps * 1000
    unchanged = torch.equal(emb.weight.detach()[:VOCAB], original[:VOCAB])
    return {"way": way, "ms_per_step": round(ms, 3), "optimizer_state_bytes": _state_bytes(optimizer),
            "old_rows_unchanged": unchanged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    for way in ("restore", "mask", "rows"):
        print(json.dumps(run(way, args.steps, args.vectors, args.batch)), flush=True)


if __name__ == "__main__":
    main()
