"""Load and save Anima's files in the layouts users have, offline:

- the DiT single file (`net.`-prefixed MiniTrainDIT + LLM adapter, or bare) <-> `AnimaTransformer` (diffusers'
  CosmosTransformer3DModel + our adapter), through `layout.to_diffusers_path` / `to_file_path`; `--llm_adapter_path`
  replaces (or supplies) the adapter from a separate file;
- `--qwen3`: a Qwen3 text encoder single file (`qwen_3_06b_base.safetensors`: `model.layers.N...` or bare) or a
  transformers folder -> transformers Qwen3Model (sizes from the shapes, the rest Qwen3-0.6B's config);
- `--vae`: the Qwen-Image VAE (`qwen_image_vae.safetensors`: ComfyUI / Wan names, or diffusers'
  AutoencoderKLQwenImage names; a diffusers folder too) -> diffusers AutoencoderKLQwenImage.

Modules are built on the meta device and take the file's tensors as read (`assign=True`). Every part file's header
is checked before any weight is read; a wrong file is one ModelLoadError line naming the option and the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ...errors import ModelLoadError
from ...models.checkpoint import Checkpoint, open_checkpoint
from ...models.module_io import fill_module, first_line, save_safetensors_atomic
from . import layout

_FIX = "the file is damaged or not an Anima model part"


@dataclass
class AnimaParts:
    transformer: Any
    qwen3: Any
    vae: Any
    extra_state: dict = field(default_factory=dict)  # DiT file tensors no module holds (RoPE buffers), kept
    metadata: dict = field(default_factory=dict)


def _build(fn):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return fn()


def _open(path: str, option: str, what: str) -> Checkpoint:
    if not path:
        raise ModelLoadError(f"Anima needs {what}: pass {option}")
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file ({option}); check the path of {what}")
    return open_checkpoint(path)


def check_part_file(path: str | None, option: str) -> None:
    """Read only the header of the file given to `option` and refuse a file of the wrong kind (one line naming the
    option, the file, what it is and what to pass)."""
    if not path or os.path.isdir(path):
        return
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file ({option}); check the path")
    ckpt = open_checkpoint(path)
    shapes = ckpt.shapes
    ok = {"--qwen3": layout.is_qwen3(shapes) is not None,
          "--vae": layout.is_comfy_vae(shapes) or layout.is_diffusers_vae(shapes),
          "--llm_adapter_path": _adapter_prefix(shapes) is not None}[option]
    if not ok:
        wanted = {"--qwen3": "the Qwen3-0.6B text encoder (qwen_3_06b_base.safetensors)",
                  "--vae": "the Qwen-Image VAE (qwen_image_vae.safetensors)",
                  "--llm_adapter_path": "an LLM adapter file (llm_adapter.* tensors)"}[option]
        raise ModelLoadError(f"{path}: this is {layout.describe(shapes)}, but {option} needs {wanted}")


# ------------------------------------------------------------------ DiT
def build_transformer(config: Mapping, adapter: Mapping | None, *, meta: bool = True):
    from .adapter import AnimaTransformer

    def make():
        return AnimaTransformer(adapter=dict(adapter) if adapter else None, **dict(config))
    return _build(make) if meta else make()


def _adapter_prefix(shapes: Mapping[str, tuple]) -> str | None:
    for prefix in ("net.llm_adapter.", "llm_adapter.", "model.diffusion_model.net.llm_adapter.",
                   "model.diffusion_model.llm_adapter.", ""):
        if f"{prefix}out_proj.weight" in shapes and f"{prefix}blocks.0.cross_attn.q_proj.weight" in shapes:
            return prefix
    return None


def load_transformer(path: str, *, dtype: torch.dtype | None = torch.float32, llm_adapter_path: str | None = None,
                     checkpoint: Checkpoint | None = None):
    """(AnimaTransformer, extra tensors, metadata) of a DiT single file; the adapter from `llm_adapter_path` when
    given (sd-scripts' --llm_adapter_path), else from the DiT file."""
    ckpt = checkpoint or open_checkpoint(path)
    prefix = layout.dit_prefix(ckpt.shapes)
    if prefix is None:
        raise ModelLoadError(f"{path}: this is {layout.describe(ckpt.shapes)}, not an Anima DiT; pass the Anima "
                             f"model (anima-preview.safetensors) as --pretrained_model_name_or_path")
    adapter_ckpt, adapter_prefix = ckpt, _adapter_prefix(ckpt.shapes)
    if llm_adapter_path:
        check_part_file(llm_adapter_path, "--llm_adapter_path")
        adapter_ckpt = open_checkpoint(llm_adapter_path)
        adapter_prefix = _adapter_prefix(adapter_ckpt.shapes)
    if adapter_prefix is None:
        raise ModelLoadError(f"{path}: the DiT file has no LLM adapter (no llm_adapter.* tensors); pass the adapter "
                             f"file with --llm_adapter_path")
    try:
        config = layout.infer_dit_config(ckpt.shapes, prefix)
        adapter = layout.infer_adapter_config(adapter_ckpt.shapes, adapter_prefix)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: incomplete or unusual Anima DiT ({first_line(e)}); download it again") \
            from None
    model = build_transformer(config, adapter)
    state, extra = {}, {}
    wanted = set(model.state_dict())
    for key in ckpt.shapes:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith(layout.ADAPTER):
            continue
        target = layout.to_diffusers_path(name)
        if target in wanted:
            state[target] = ckpt.get(key, dtype)
        elif name in layout.ROPE_BUFFERS:
            extra[name] = ckpt.get(key)
        else:
            raise ModelLoadError(f"{path}: tensor {key!r} is not part of an Anima DiT; this variant is not supported")
    for key in adapter_ckpt.shapes:
        if key.startswith(adapter_prefix):
            state[layout.ADAPTER + key[len(adapter_prefix):]] = adapter_ckpt.get(key, dtype)
    model = fill_module(model, state, "DiT", path, _FIX)
    return model, extra, dict(ckpt.metadata or {})


def transformer_state(model, extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The DiT's tensors under their single-file names (`net.` + MiniTrainDIT names), with the kept extras."""
    out = {}
    for name, tensor in model.state_dict().items():
        file_name = layout.to_file_path(name)
        if file_name is None:
            raise ValueError(f"no single-file name for {name}")
        out[layout.DIT_PREFIX + file_name] = tensor
    for name, tensor in (extra or {}).items():
        out[layout.DIT_PREFIX + name] = tensor
    return out


def save_transformer(model, path: str, *, dtype: torch.dtype | None = None, metadata: Mapping | None = None,
                     extra: Mapping[str, torch.Tensor] | None = None) -> str:
    """The DiT as the single file users have (`net.` prefix, as sd-scripts' anima_train saves for ComfyUI),
    atomically."""
    if not os.fspath(path).lower().endswith(".safetensors"):
        raise ModelLoadError(f"{path}: Anima models are saved as .safetensors; use that extension")
    return save_safetensors_atomic(transformer_state(model, extra), path, metadata, dtype)


# ------------------------------------------------------------------ Qwen3
def qwen3_config(shapes: Mapping[str, tuple], prefix: str) -> dict:
    """Qwen3-0.6B's config with the sizes of the file (tiny test encoders load through the same code)."""
    from .layout import QWEN3_CONFIG, count_blocks

    head_dim = int(shapes[f"{prefix}layers.0.self_attn.q_norm.weight"][0])
    return dict(QWEN3_CONFIG, vocab_size=int(shapes[f"{prefix}embed_tokens.weight"][0]),
                hidden_size=int(shapes[f"{prefix}embed_tokens.weight"][1]), head_dim=head_dim,
                num_attention_heads=int(shapes[f"{prefix}layers.0.self_attn.q_proj.weight"][0]) // head_dim,
                num_key_value_heads=int(shapes[f"{prefix}layers.0.self_attn.k_proj.weight"][0]) // head_dim,
                intermediate_size=int(shapes[f"{prefix}layers.0.mlp.gate_proj.weight"][0]),
                num_hidden_layers=count_blocks(shapes, rf"{prefix.replace('.', '[.]')}layers\.(\d+)\."))


def load_qwen3(path: str, dtype: torch.dtype | None = torch.float32):
    """transformers Qwen3Model from a single file (`model.` prefix or none; `lm_head` ignored) or a folder."""
    from transformers import Qwen3Config, Qwen3Model

    if os.path.isdir(path):
        try:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except Exception as e:  # noqa: BLE001 - a broken folder is the user's
            raise ModelLoadError(f"{path}: cannot load the Qwen3 text encoder ({first_line(e)}); pass the "
                                 f"qwen_3_06b_base.safetensors file as --qwen3") from None
        model = getattr(model, "model", model)
        model.config.use_cache = False
        return model.eval()
    ckpt = _open(path, "--qwen3", "the Qwen3 text encoder")
    prefix = layout.is_qwen3(ckpt.shapes)
    if prefix is None:
        raise ModelLoadError(f"{path}: this is {layout.describe(ckpt.shapes)}, but --qwen3 needs the Qwen3-0.6B text "
                             f"encoder (qwen_3_06b_base.safetensors)")
    config = Qwen3Config(**qwen3_config(ckpt.shapes, prefix))
    model = _build(lambda: Qwen3Model(config))
    wanted = set(model.state_dict())
    state = {k[len(prefix):]: ckpt.get(k, dtype) for k in ckpt.shapes
             if k.startswith(prefix) and k[len(prefix):] in wanted}
    model = fill_module(model, state, "Qwen3 text encoder", path, _FIX)
    model.config.use_cache = False
    _init_buffers(model)
    return model


def _init_buffers(model) -> None:
    """Meta-built non-persistent buffers (rotary inverse frequencies) computed for real."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if hasattr(module, "rope_init_fn") and name in ("inv_freq", "original_inv_freq"):
                    inv_freq, scaling = module.rope_init_fn(module.config, torch.device("cpu"))
                    module.register_buffer(name, inv_freq, persistent=False)
                    module.attention_scaling = scaling
                else:
                    raise ModelLoadError(f"internal: buffer {name} of {type(module).__name__} was not initialised")


def save_qwen3(model, path: str, *, dtype: torch.dtype | None = None) -> str:
    """The Qwen3 encoder as ComfyUI's text-encoder file (`model.` prefix)."""
    return save_safetensors_atomic({f"model.{k}": v for k, v in model.state_dict().items()}, path, None, dtype)


# ------------------------------------------------------------------ VAE
def load_vae(path: str, dtype: torch.dtype | None = torch.float32):
    """diffusers AutoencoderKLQwenImage from the Qwen-Image VAE file (ComfyUI/Wan or diffusers names) or a
    diffusers folder."""
    from diffusers import AutoencoderKLQwenImage

    if os.path.isdir(path):
        from ...models.module_io import from_pretrained

        sub = "vae" if os.path.isdir(os.path.join(path, "vae")) else ""
        return from_pretrained(AutoencoderKLQwenImage, path, sub, dtype)
    ckpt = _open(path, "--vae", "the Qwen-Image VAE")
    shapes = ckpt.shapes
    if layout.is_comfy_vae(shapes):
        config = layout.infer_vae_config(shapes)
        table = dict(layout.vae_module_table(config))
        names = {}
        for key in shapes:
            module, _, leaf = key.rpartition(".")
            if module not in table:
                raise ModelLoadError(f"{path}: tensor {key!r} is not part of a Qwen-Image VAE; pass the "
                                     f"qwen_image_vae.safetensors file as --vae")
            names[f"{table[module]}.{leaf}"] = key
    elif layout.is_diffusers_vae(shapes):
        config = dict(layout.VAE_CONFIG, base_dim=int(shapes["encoder.conv_in.weight"][0]),
                      z_dim=int(shapes["post_quant_conv.weight"][0]))
        names = {k: k for k in shapes}
    else:
        raise ModelLoadError(f"{path}: this is {layout.describe(shapes)}, but --vae needs the Qwen-Image VAE "
                             f"(qwen_image_vae.safetensors)")
    vae = _build(lambda: AutoencoderKLQwenImage(**config))
    state = {name: ckpt.get(key, dtype) for name, key in names.items()}
    return fill_module(vae, state, "VAE", path, _FIX)


def save_vae(vae, path: str, *, dtype: torch.dtype | None = None) -> str:
    """The VAE in the ComfyUI / Wan layout (qwen_image_vae.safetensors, as Anima ships it)."""
    table = {d: f for f, d in layout.vae_module_table(dict(vae.config))}
    out = {}
    for name, tensor in vae.state_dict().items():
        module, _, leaf = name.rpartition(".")
        out[f"{table[module]}.{leaf}"] = tensor
    return save_safetensors_atomic(out, path, None, dtype)


# ------------------------------------------------------------------ all parts
def load_parts(path: str, *, qwen3: str | None, vae: str | None, llm_adapter_path: str | None = None,
               dtype: torch.dtype = torch.float32, checkpoint: Checkpoint | None = None) -> AnimaParts:
    """The DiT file plus --qwen3 and --vae (each header checked before any weight is read)."""
    for value, option, example in ((qwen3, "--qwen3", "qwen_3_06b_base.safetensors"),
                                   (vae, "--vae", "qwen_image_vae.safetensors")):
        if not value:
            raise ModelLoadError(f"{path}: an Anima file holds only the DiT; pass {option} {example} too")
        check_part_file(value, option)
    check_part_file(llm_adapter_path, "--llm_adapter_path")
    transformer, extra, metadata = load_transformer(path, dtype=dtype, llm_adapter_path=llm_adapter_path,
                                                    checkpoint=checkpoint)
    return AnimaParts(transformer, load_qwen3(qwen3, dtype), load_vae(vae, dtype), extra, metadata)
