#!/usr/bin/env python3
"""Launch shim for benchmarks/flux_lora_step.py: runs one FLUX LoRA trainer UNCHANGED in this process and records
its peak memory when it exits.

    python flux_bench_launch.py ours  CHECKOUT   [trainer args...]   # python -m sd_scripts.flux_train_network
    python flux_bench_launch.py peer  SD_SCRIPTS [trainer args...]   # sd-scripts' flux_train_network.py

(normally behind `accelerate launch`, which is how the harness starts it). Standard library only at import time, so
the same file runs in our venv and in the peer's venv.

Both trainers: at exit (normal, SystemExit or an exception) a JSON object is written to the file named by the
environment variable FLUX_BENCH_MEM_OUT: `peak_rss_mb` (ru_maxrss of this process: the trainer, not the accelerate
launcher), and where CUDA is up `cuda_max_allocated_mb` / `cuda_max_reserved_mb` (torch.cuda.max_memory_*).

Peer only (sd-scripts is not modified; these are run-time adjustments, as /work/shared/bench/peer_launch.py does for
the SD1 tiny U-Net):
1. torchvision import guard: the PyPI torchvision 0.28.0 wheel is a CUDA build whose compiled ops do not load beside
   the CPU torch wheel; `import torchvision` then dies registering fake kernels for ops that do not exist. While it
   is imported, `torch.library.register_fake` skips `torchvision::*` ops that do not exist (sd-scripts only uses
   the pure-Python transforms). Changes nothing where torchvision's ops load.
2. Text-encoder sizes: sd-scripts' `library.flux_utils.load_clip_l` / `load_t5xxl` build CLIP-L and T5-XXL from fixed
   configs (12 x 768 and 24 x 4096 layers) and load the file with strict=False. The benchmark's encoders keep the
   real OUTPUT widths (CLIP-L pooled 768, T5 4096, what the denoiser reads) but have 1 layer and narrow insides,
   because with --cache_text_encoder_outputs they run once per caption before the loop and are not what is
   measured. The module-level names `flux_utils.CLIPConfig` / `flux_utils.T5Config` that those functions call are
   wrapped so that the layer count, heads and inner widths come from the file's tensor shapes (read from the
   safetensors header of --clip_l / --t5xxl); the functions themselves run unchanged. A real-size file gives the
   real config, so nothing changes for it.
   The denoiser needs no override: sd-scripts' `flux_utils.analyze_checkpoint_state` already reads the number of
   double and single blocks from the file; the autoencoder is the real FLUX.1 one.
3. After each of sd-scripts' loaders (flow model, CLIP-L, T5, AE) the shim checks that no parameter was left on the
   meta device (strict=False would otherwise hide a key mismatch until the first forward).
"""
from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import struct
import sys


def safetensors_shapes(path: str) -> dict:
    """{tensor name: shape} from a .safetensors header (no torch, no weights read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def clip_sizes(shapes: dict) -> dict:
    """CLIP text-model sizes from a clip_l file's shapes (keys with or without 'text_model.')."""
    p = "text_model." if "text_model.embeddings.token_embedding.weight" in shapes else ""
    layers = {int(k[len(p) + len("encoder.layers."):].split(".")[0]) for k in shapes
              if k.startswith(p + "encoder.layers.")}
    hidden = shapes[p + "embeddings.token_embedding.weight"][1]
    return dict(hidden_size=hidden, intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
                num_hidden_layers=len(layers), num_attention_heads=max(1, hidden // 64))


def t5_sizes(shapes: dict) -> dict:
    """T5 encoder sizes from a t5xxl file's shapes (transformers names)."""
    a = "encoder.block.0.layer.0.SelfAttention."
    heads = shapes[a + "relative_attention_bias.weight"][1]
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")}
    ff = "encoder.block.0.layer.1.DenseReluDense."
    return dict(d_model=shapes["shared.weight"][1] if "shared.weight" in shapes
                else shapes["encoder.embed_tokens.weight"][1],
                num_heads=heads, d_kv=shapes[a + "q.weight"][0] // heads, d_ff=shapes[ff + "wi_0.weight"][0],
                num_layers=len(layers))


def _arg(rest: list[str], name: str) -> str | None:
    for i, a in enumerate(rest):
        if a == name and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def install_memory_report() -> None:
    out = os.environ.get("FLUX_BENCH_MEM_OUT")
    if not out:
        return

    def report():
        data = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                data["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                data["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        except Exception as e:  # noqa: BLE001 - a report, never a failure
            data["cuda_error"] = str(e)[:200]
        with open(out, "w") as f:
            json.dump(data, f)

    atexit.register(report)


def import_torchvision_guarded() -> None:
    import torch
    import torch.library

    orig = torch.library.register_fake
    skipped = []

    def register_fake(op, func=None, *args, **kwargs):
        if not (isinstance(op, str) and op.startswith("torchvision::")):
            return orig(op, func, *args, **kwargs)

        def deco(fn):
            try:
                return orig(op, fn, *args, **kwargs)
            except RuntimeError:  # "operator torchvision::X does not exist"
                skipped.append(op)
                return fn

        return deco(func) if func is not None else deco

    torch.library.register_fake = register_fake
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    finally:
        torch.library.register_fake = orig
    if skipped:
        print(f"[flux_bench_launch] torchvision: {len(skipped)} fake registrations of unloadable ops skipped",
              flush=True)


def _no_meta(what: str, module) -> None:
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:
        raise SystemExit(f"flux_bench_launch: sd-scripts left {len(left)} {what} parameters unloaded (e.g. {left[0]});"
                         f" the benchmark's file does not fit sd-scripts' {what} config")


def patch_peer(rest: list[str]) -> None:
    import library.flux_utils as fu

    clip_path, t5_path = _arg(rest, "--clip_l"), _arg(rest, "--t5xxl")
    if clip_path:
        clip = clip_sizes(safetensors_shapes(clip_path))
        orig_clip_config = fu.CLIPConfig

        def CLIPConfig(**kwargs):  # noqa: N802 - stands in for the class name flux_utils calls
            return orig_clip_config(**dict(kwargs, **clip))

        fu.CLIPConfig = CLIPConfig
        print(f"[flux_bench_launch] sd-scripts CLIP-L config sizes from {clip_path}: {clip}", flush=True)
    if t5_path:
        t5 = t5_sizes(safetensors_shapes(t5_path))
        orig_t5_config = fu.T5Config

        def T5Config(**kwargs):  # noqa: N802
            return orig_t5_config(**dict(kwargs, **t5))

        fu.T5Config = T5Config
        print(f"[flux_bench_launch] sd-scripts T5 config sizes from {t5_path}: {t5}", flush=True)

    def checked(name: str, pick):
        orig = getattr(fu, name)

        def wrapper(*args, **kwargs):
            result = orig(*args, **kwargs)
            _no_meta(name, pick(result))
            return result

        setattr(fu, name, wrapper)

    checked("load_flow_model", lambda r: r[1])
    checked("load_clip_l", lambda r: r)
    checked("load_t5xxl", lambda r: r)
    checked("load_ae", lambda r: r)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("ours", "peer"):
        raise SystemExit(__doc__)
    trainer, root, rest = argv[0], os.path.abspath(argv[1]), argv[2:]
    install_memory_report()
    sys.path.insert(0, root)
    if trainer == "ours":
        sys.argv = ["sd_scripts.flux_train_network"] + rest
        runpy.run_module("sd_scripts.flux_train_network", run_name="__main__", alter_sys=True)
        return
    os.chdir(root)
    import_torchvision_guarded()
    patch_peer(rest)
    script = os.path.join(root, "flux_train_network.py")
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
