#!/usr/bin/env python3
"""Launch shim for benchmarks/anima_lora_step.py: runs one Anima LoRA trainer UNCHANGED in this process and records
its peak memory when it exits (the memory report and torchvision guard of benchmarks/flux_bench_launch.py).

    python anima_bench_launch.py ours  CHECKOUT   [trainer args...]   # python -m sd_scripts.anima_train_network
    python anima_bench_launch.py peer  SD_SCRIPTS [trainer args...]   # sd-scripts' anima_train_network.py

Peer only (sd-scripts is not modified; run-time adjustments for the reduced model):
1. DiT depth: sd-scripts' `anima_utils.load_anima_model` builds Anima-Preview's fixed config (28 blocks). The
   benchmark's DiT has the real width and adapter but fewer blocks, so `anima_models.Anima` is wrapped to take
   `num_blocks` from the file's tensor names (read from the safetensors header of --pretrained_model_name_or_path);
   everything else of the fixed config is unchanged (and a 28-block file gives 28).
2. Qwen3 sizes: sd-scripts builds Qwen3 from its bundled Qwen3-0.6B config and loads the file with strict=False.
   The benchmark's encoder keeps the real output width (1024, what the LLM adapter reads) with 1 layer (its outputs
   are cached before the loop), so `transformers.Qwen3Config.from_pretrained` is wrapped to take the layer count,
   heads and inner widths from the --qwen3 file's shapes; afterwards the shim checks that every Qwen3 tensor came
   from the file.
"""
from __future__ import annotations

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_bench_launch import _arg, import_torchvision_guarded, install_memory_report, safetensors_shapes  # noqa: E402


def qwen3_sizes(shapes: dict) -> dict:
    p = "model." if "model.embed_tokens.weight" in shapes else ""
    head_dim = shapes[p + "layers.0.self_attn.q_norm.weight"][0]
    layers = {int(k[len(p) + len("layers."):].split(".")[0]) for k in shapes if k.startswith(p + "layers.")}
    return dict(hidden_size=shapes[p + "embed_tokens.weight"][1], num_hidden_layers=len(layers), head_dim=head_dim,
                num_attention_heads=shapes[p + "layers.0.self_attn.q_proj.weight"][0] // head_dim,
                num_key_value_heads=shapes[p + "layers.0.self_attn.k_proj.weight"][0] // head_dim,
                intermediate_size=shapes[p + "layers.0.mlp.gate_proj.weight"][0], max_window_layers=len(layers))


def patch_peer(rest: list[str]) -> None:
    import transformers
    from library import anima_models, anima_utils

    dit = _arg(rest, "--pretrained_model_name_or_path")
    blocks = len({k.split(".")[2] for k in safetensors_shapes(dit) if k.startswith("net.blocks.")})
    original = anima_models.Anima.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **dict(kwargs, num_blocks=blocks))

    anima_models.Anima.__init__ = init
    print(f"[anima_bench_launch] sd-scripts Anima DiT with {blocks} blocks (from {dit})", flush=True)
    qwen = _arg(rest, "--qwen3")
    sizes = qwen3_sizes(safetensors_shapes(qwen))
    config_cls = transformers.Qwen3Config
    from_pretrained = config_cls.from_pretrained.__func__

    def sized(cls, *args, **kwargs):
        config = from_pretrained(cls, *args, **kwargs)
        for key, value in sizes.items():
            setattr(config, key, value)
        return config

    config_cls.from_pretrained = classmethod(sized)
    print(f"[anima_bench_launch] sd-scripts Qwen3 config sizes from {qwen}: {sizes}", flush=True)
    load_te = anima_utils.load_qwen3_text_encoder

    def checked(path, *args, **kwargs):
        model, tokenizer = load_te(path, *args, **kwargs)
        want = {k[len("model."):] if k.startswith("model.") else k for k in safetensors_shapes(path)}
        missing = [k for k in model.state_dict() if k not in want]
        if missing:
            raise SystemExit(f"anima_bench_launch: sd-scripts left {len(missing)} Qwen3 tensors unloaded (e.g. "
                             f"{missing[0]})")
        return model, tokenizer

    anima_utils.load_qwen3_text_encoder = checked


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("ours", "peer"):
        raise SystemExit(__doc__)
    trainer, root, rest = argv[0], os.path.abspath(argv[1]), argv[2:]
    install_memory_report()
    sys.path.insert(0, root)
    if trainer == "ours":
        sys.argv = ["sd_scripts.anima_train_network"] + rest
        runpy.run_module("sd_scripts.anima_train_network", run_name="__main__", alter_sys=True)
        return
    os.chdir(root)
    import_torchvision_guarded()
    patch_peer(rest)
    script = os.path.join(root, "anima_train_network.py")
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
