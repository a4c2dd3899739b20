"""sd-scripts' `networks/convert_anima_lora_to_comfy.py`: an Anima LoRA in sd-scripts' names <-> the names ComfyUI
loads (and back with --reverse).

    lora_unet_blocks_0_self_attn_q_proj.lora_down.weight -> diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight
    lora_unet_blocks_0_self_attn_q_proj.lora_up.weight   -> diffusion_model.blocks.0.self_attn.q_proj.lora_B.weight
    lora_unet_blocks_0_self_attn_q_proj.alpha            -> diffusion_model.blocks.0.self_attn.q_proj.alpha
    lora_te_layers_0_mlp_up_proj.*  -> text_encoders.qwen3_06b.transformer.model.layers.0.mlp.up_proj.*

sd-scripts rebuilds the dotted module path by string replacements; here it comes from the model's own module names
(Anima-Preview's DiT with its LLM adapter, and Qwen3-0.6B, built on the meta device), so every Linear a LoRA can
adapt converts and a name that is no Anima module is an error naming it. Tensors are unchanged; the metadata is kept
with its sshs_ hashes recomputed.

    python -m sd_scripts.families.anima.comfy_lora SRC DST [--reverse]
"""
from __future__ import annotations

import sys
from functools import lru_cache
from typing import Mapping, Sequence

from ...errors import NetworkError
from ...networks.lora_tools import ToolOption, build_parser, run_tool

COMFY_DIT_PREFIX = "diffusion_model."
COMFY_QWEN3_PREFIX = "text_encoders.qwen3_06b.transformer.model."
_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}

OPTIONS = (
    ToolOption("src_path", str, None, "source LoRA (sd-scripts names; ComfyUI names with --reverse)", required=True,
               positional=True, path="file"),
    ToolOption("dst_path", str, None, "destination file", required=True, positional=True, path="out_file"),
    ToolOption("reverse", bool, False, "ComfyUI names -> sd-scripts names"),
)


@lru_cache(maxsize=1)
def module_paths() -> dict[str, tuple[str, str]]:
    """kohya name (`lora_unet_blocks_0_mlp_layer1`) -> (ComfyUI prefix, dotted module path) of every Linear of the
    real-size DiT (+ adapter) and Qwen3-0.6B."""
    import torch
    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3Model

    from . import layout
    from .weights import build_transformer

    out: dict[str, tuple[str, str]] = {}
    dit = build_transformer(layout.REAL_CONFIG, layout.REAL_ADAPTER)
    for path, module in dit.named_modules():
        name = layout.to_file_path(path) if path else None
        if isinstance(module, torch.nn.Linear) and name is not None:
            out["lora_unet_" + name.replace(".", "_")] = (COMFY_DIT_PREFIX, name)
    with init_empty_weights():
        qwen = Qwen3Model(Qwen3Config(**layout.QWEN3_CONFIG))
    for path, module in qwen.named_modules():
        if isinstance(module, torch.nn.Linear):
            out["lora_te_" + path.replace(".", "_")] = (COMFY_QWEN3_PREFIX, path)
    return out


def to_comfy(tensors: Mapping) -> dict:
    """sd-scripts names -> ComfyUI names (NetworkError naming the first key that is no Anima LoRA module)."""
    paths = module_paths()
    out = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if module not in paths or suffix not in _SUFFIXES:
            raise NetworkError(f"{key}: not a module of an Anima LoRA in sd-scripts' names (lora_unet_<DiT path> / "
                               f"lora_te_<Qwen3 path>); is this file already in ComfyUI's names (use --reverse)?")
        prefix, path = paths[module]
        out[f"{prefix}{path}.{_SUFFIXES[suffix]}"] = value
    return out


def from_comfy(tensors: Mapping) -> dict:
    """ComfyUI names -> sd-scripts names."""
    back = {f"{prefix}{path}": name for name, (prefix, path) in module_paths().items()}
    suffixes = {v: k for k, v in _SUFFIXES.items()}
    out = {}
    for key in tensors:
        module, suffix = next(((key[: -len(s) - 1], s) for s in suffixes if key.endswith("." + s)), (None, None))
        if module not in back:
            raise NetworkError(f"{key}: not a module of an Anima LoRA in ComfyUI's names (diffusion_model.<DiT path> "
                               f"/ {COMFY_QWEN3_PREFIX}<Qwen3 path>)")
        out[f"{back[module]}.{suffixes[suffix]}"] = tensors[key]
    return out


def convert(src: str, dst: str, reverse: bool = False) -> str:
    from ...networks.weights_file import load_weights_file
    from ...models.module_io import save_safetensors_atomic
    from ...training.metadata import add_model_hashes

    tensors, metadata = load_weights_file(src)
    out = from_comfy(tensors) if reverse else to_comfy(tensors)
    meta = add_model_hashes(out, dict(metadata or {})) if metadata else None
    return save_safetensors_atomic(out, dst, meta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m sd_scripts.families.anima.comfy_lora",
                          "Convert an Anima LoRA between sd-scripts' and ComfyUI's names.", OPTIONS)
    return run_tool("convert_anima_lora_to_comfy", parser.parse_args,
                    lambda a: print(convert(a.src_path, a.dst_path, a.reverse)), argv)


if __name__ == "__main__":
    sys.exit(main())
