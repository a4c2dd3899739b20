"""Load and save the parts of an SD3 / SD3.5 model, offline: the MMDiT (diffusers SD3Transformer2DModel) from and to
SAI single files, CLIP-L / CLIP-G (transformers CLIPTextModelWithProjection) from separate files or the bundled
`text_encoders.*` tensors, the 16-channel autoencoder, and StableDiffusion3Pipeline folders.

Single-file modules are built on the meta device and take the file's tensors as they are read (`assign=True`; fused
q/k/v become views of the one tensor read), so no second copy of a weight is made. Names follow the one table in
`layout.transformer_key_table`, used in both directions, so load -> save gives back every tensor bit for bit.
The T5 encoder is loaded by `sd_scripts.models.t5`; here it is only located (`SD3Parts.t5xxl_source`).
Every problem a user can cause raises ModelLoadError naming the file and the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ...errors import ModelLoadError
from ...models.module_io import fill_module, first_line, from_pretrained, save_safetensors_atomic
from ...models.checkpoint import Checkpoint, open_checkpoint
from ...models.keymaps import vae_keymap
from . import layout

PIPELINE_CLASS = "StableDiffusion3Pipeline"
# real text-encoder widths, to recognise a CLIP-G file given as CLIP-L and the reverse
_CLIP_L_WIDTH, _CLIP_G_WIDTH = 768, 1280

# the real CLIP-L / CLIP-G text configs (openai/clip-vit-large-patch14, laion CLIP-ViT-bigG-14), as SD3 uses them
CLIP_L_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "projection_dim": 768, "pad_token_id": 1, "bos_token_id": 0,
                 "eos_token_id": 2}
CLIP_G_CONFIG = dict(CLIP_L_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


@dataclass
class SD3Parts:
    """An SD3 model's parts as loaded. clip_l / clip_g / vae are None when neither the model nor an option gave them;
    t5xxl_source names where the T5 encoder is (a file with bundled `text_encoders.t5xxl.*`, a separate t5xxl file,
    or a pipeline folder's text_encoder_3/), for `sd_scripts.models.t5`, or None."""

    variant: str
    transformer: Any
    vae: Any | None = None
    clip_l: Any | None = None
    clip_g: Any | None = None
    t5xxl_source: str | None = None
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def _build(cls_or_fn: Callable[[], Any], include_buffers: bool = False):
    """Build a module on the meta device. include_buffers: buffers too (only for modules whose buffers are all
    persistent and come from the file: the MMDiT's positional table, 0.9 GB at SD3.5 medium's size, is then never
    computed)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=include_buffers):
        return cls_or_fn()


def _fill(module, state_dict: Mapping[str, torch.Tensor], what: str, path: str):
    return fill_module(module, state_dict, what, path, "the file is damaged or not a standard SD3 model")


def _missing(keys, ckpt: Checkpoint, what: str) -> None:
    missing = [k for k in keys if k not in ckpt.shapes]
    if missing:
        raise ModelLoadError(f"{ckpt.path}: {len(missing)} {what} tensors are missing (e.g. {missing[0]}); the file "
                             f"is incomplete: download it again")


# ---------------------------------------------------------------- MMDiT tensors <-> diffusers state dict


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_diffusers(get: Callable[[str], torch.Tensor], config: Mapping,
                             prefix: str = layout.SAI_PREFIX) -> dict[str, torch.Tensor]:
    """The SD3Transformer2DModel state dict from `get(SAI name)` (called once per tensor). q/k/v are views of the
    fused tensor (no copy); the two (shift, scale) adaLN tensors are reordered."""
    out: dict[str, torch.Tensor] = {}
    for sai, names, kind in layout.transformer_key_table(config):
        tensor = get(prefix + sai)
        if kind == layout.SPLIT:
            parts = tensor.chunk(len(names), dim=0)
        elif kind == layout.SWAP:
            parts = (_swap_halves(tensor),)
        else:
            parts = (tensor,)
        out.update(zip(names, parts))
    return out


def transformer_to_sai(state_dict: Mapping[str, torch.Tensor], config: Mapping,
                       prefix: str = layout.SAI_PREFIX) -> dict[str, torch.Tensor]:
    """SAI single-file tensors (names with `prefix`) from an SD3Transformer2DModel state dict."""
    out = {}
    for sai, names, kind in layout.transformer_key_table(config):
        tensors = [state_dict[n] for n in names]
        if kind == layout.SPLIT:
            out[prefix + sai] = torch.cat(tensors, dim=0)
        elif kind == layout.SWAP:
            out[prefix + sai] = _swap_halves(tensors[0])
        else:
            out[prefix + sai] = tensors[0]
    return out


def _not_sd3(ckpt: Checkpoint) -> ModelLoadError:
    other = layout.what_else(ckpt.shapes)
    if other:
        return ModelLoadError(f"{ckpt.path}: this is {other}, not an SD3 / SD3.5 model")
    return ModelLoadError(f"{ckpt.path}: not an SD3 / SD3.5 model (no 'model.diffusion_model.joint_blocks' MMDiT "
                          f"tensors); pass an SD3 medium, SD3.5 medium or SD3.5 large .safetensors file or a "
                          f"diffusers StableDiffusion3Pipeline folder")


def _transformer_from_checkpoint(ckpt: Checkpoint, dtype: torch.dtype | None):
    from diffusers import SD3Transformer2DModel

    if layout.classify(ckpt.shapes) is None:
        raise _not_sd3(ckpt)
    prefix = layout.mmdit_prefix(ckpt.shapes)
    try:
        config = layout.infer_transformer_config(ckpt.shapes)
    except (KeyError, ValueError, IndexError) as e:
        raise ModelLoadError(f"{ckpt.path}: incomplete or unusual SD3 MMDiT ({first_line(e)}); download the model "
                             f"again") from None
    table = layout.transformer_key_table(config)
    _missing([prefix + sai for sai, _, _ in table], ckpt, "MMDiT")
    known = {prefix + sai for sai, _, _ in table}
    unknown = sorted(k for k in ckpt.shapes if k.startswith(prefix) and k not in known
                     and (prefix or not k.startswith(("text_encoders.", layout.VAE_PREFIX))))
    if unknown:
        raise ModelLoadError(f"{ckpt.path}: {len(unknown)} MMDiT tensors this loader does not know (e.g. "
                             f"{unknown[0]}); this SD3 variant is not supported")
    init_args = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = _build(lambda: SD3Transformer2DModel(**init_args), include_buffers=True)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{ckpt.path}: cannot build an SD3 MMDiT from these shapes ({first_line(e)})") from None
    state = transformer_to_diffusers(lambda k: ckpt.get(k, dtype), config, prefix)
    return _fill(model, state, "MMDiT", ckpt.path)


def load_transformer(path: str, dtype: torch.dtype | None = torch.float32):
    """The SD3Transformer2DModel of an SAI single file (SD3 medium, SD3.5 medium / large; fp8-stored files are cast
    to `dtype`; None keeps the stored dtypes), built on the meta device and filled without a second copy."""
    return _transformer_from_checkpoint(open_checkpoint(os.fspath(path)), dtype)


def save_transformer(model, path: str, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write the MMDiT as an SAI single file (`model.diffusion_model.*`, .safetensors) atomically, float tensors
    cast to `dtype` when given, with `metadata` (str values) in the header. diffusers'
    `SD3Transformer2DModel.from_single_file` and `load_transformer` read it back."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ModelLoadError(f"{path}: SD3 models are saved as .safetensors; use that extension")
    return save_safetensors_atomic(transformer_to_sai(model.state_dict(), model.config), path, metadata, dtype)


# ---------------------------------------------------------------- CLIP-L / CLIP-G


def _clip_from_checkpoint(ckpt: Checkpoint, which: str, dtype: torch.dtype | None, prefix: str | None = None):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    option = "--clip_l" if which == "clip_l" else "--clip_g"
    if prefix is None:
        prefix = layout.clip_prefix(ckpt.shapes)
    if prefix is None:
        if layout.is_t5_encoder(ckpt.shapes):
            raise ModelLoadError(f"{ckpt.path}: this is a T5 encoder, not a CLIP text encoder; pass it as --t5xxl "
                                 f"and give {option} the {which}.safetensors file")
        if layout.classify(ckpt.shapes) is not None:
            raise ModelLoadError(f"{ckpt.path}: this SD3 model file has no bundled {which} text encoder; pass "
                                 f"{option} with the separate {which}.safetensors file")
        raise ModelLoadError(f"{ckpt.path}: not a CLIP text encoder (no text_model.* tensors); pass the "
                             f"{which}.safetensors file to {option}")
    width = ckpt.shapes[prefix + "text_model.embeddings.token_embedding.weight"][1]
    expected, other = ((_CLIP_L_WIDTH, _CLIP_G_WIDTH) if which == "clip_l" else (_CLIP_G_WIDTH, _CLIP_L_WIDTH))
    if width == other:
        wrong = "clip_g" if which == "clip_l" else "clip_l"
        raise ModelLoadError(f"{ckpt.path}: this is a {wrong.upper().replace('_', '-')} encoder (width {width}), "
                             f"not {which.upper().replace('_', '-')} (width {expected}); swap the files of "
                             f"--clip_l and --clip_g")
    base = CLIP_L_CONFIG if which == "clip_l" else CLIP_G_CONFIG
    try:
        cfg = layout.infer_clip_config(ckpt.shapes, prefix, base)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{ckpt.path}: incomplete {which} text encoder (no tensor {first_line(e)}); download "
                             f"it again") from None
    model = _build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)))
    names = list(model.state_dict().keys())
    # transformers >= 5 may name the text model's parameters without 'text_model.'; files always have it
    def file_key(name: str) -> str:
        if name.startswith("text_projection.") or name.startswith("text_model."):
            return prefix + name
        return prefix + "text_model." + name

    state = {}
    for name in names:
        key = file_key(name)
        if name == "text_projection.weight" and key not in ckpt.shapes:
            # SAI's CLIP-L files carry no projection; SD3 uses the pooled output as is (sd-scripts and diffusers
            # substitute the identity the same way)
            state[name] = torch.eye(cfg["hidden_size"], dtype=dtype or torch.float32)
            continue
        if key not in ckpt.shapes:
            raise ModelLoadError(f"{ckpt.path}: the {which} text encoder lacks {key}; the file is incomplete: "
                                 f"download it again")
        state[name] = ckpt.get(key, dtype)
    return _fill(model, state, which, ckpt.path)


def _load_clip_file(path: str, which: str, dtype: torch.dtype | None):
    ckpt = open_checkpoint(os.fspath(path))
    bundled = layout.CLIP_L_PREFIX if which == "clip_l" else layout.CLIP_G_PREFIX
    if bundled + "text_model.embeddings.token_embedding.weight" in ckpt.shapes:
        return _clip_from_checkpoint(ckpt, which, dtype, bundled)
    if layout.classify(ckpt.shapes) is not None:
        option = "--clip_l" if which == "clip_l" else "--clip_g"
        raise ModelLoadError(f"{ckpt.path}: this SD3 model file has no bundled {which} text encoder; pass {option} "
                             f"with the separate {which}.safetensors file")
    return _clip_from_checkpoint(ckpt, which, dtype)


def load_clip_l(path: str, dtype: torch.dtype | None = torch.float32):
    """CLIP-L as a transformers CLIPTextModelWithProjection from a separate clip_l file (`text_model.*`, with or
    without `text_projection.weight`; without it the projection is the identity) or an SD3 file with bundled
    `text_encoders.clip_l.transformer.*`."""
    return _load_clip_file(path, "clip_l", dtype)


def load_clip_g(path: str, dtype: torch.dtype | None = torch.float32):
    """CLIP-G (OpenCLIP bigG in the transformers layout) as a CLIPTextModelWithProjection from a separate clip_g file
    or an SD3 file with bundled `text_encoders.clip_g.transformer.*`."""
    return _load_clip_file(path, "clip_g", dtype)


# ---------------------------------------------------------------- autoencoder


def _vae_from_checkpoint(ckpt: Checkpoint, dtype: torch.dtype | None):
    from diffusers import AutoencoderKL

    prefix = next((p for p in (layout.VAE_PREFIX, "") if p + "decoder.conv_in.weight" in ckpt.shapes
                   and p + "encoder.down.0.block.0.conv1.weight" in ckpt.shapes), None)
    if prefix is None:
        if layout.classify(ckpt.shapes) is not None:
            raise ModelLoadError(f"{ckpt.path}: this SD3 model file has no autoencoder (first_stage_model.*); pass "
                                 f"--vae with the SD3 VAE file")
        raise ModelLoadError(f"{ckpt.path}: not an autoencoder in the original layout (no encoder.down.0 / "
                             f"decoder.conv_in tensors); pass the SD3 VAE file")
    try:
        cfg = layout.infer_vae_config(ckpt.shapes, prefix)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(f"{ckpt.path}: incomplete autoencoder (no tensor {first_line(e)})") from None
    if cfg["latent_channels"] != 16:
        raise ModelLoadError(f"{ckpt.path}: this autoencoder has {cfg['latent_channels']} latent channels; SD3 needs "
                             f"its 16-channel VAE (an SD 1.x/XL VAE does not fit)")
    init_args = {k: v for k, v in cfg.items() if not k.startswith("_")}
    vae = _build(lambda: AutoencoderKL(**init_args))
    keymap = vae_keymap(vae.state_dict().keys(), len(cfg["block_out_channels"]))
    keymap = keymap.with_ldm_prefix(layout.VAE_PREFIX, prefix)
    _missing(keymap.ldm_keys, ckpt, "autoencoder")
    return _fill(vae, keymap.to_diffusers(lambda k: ckpt.get(k, dtype)), "autoencoder", ckpt.path)


def load_vae(path: str, dtype: torch.dtype | None = torch.float32):
    """The 16-channel SD3 AutoencoderKL (scaling 1.5305, shift 0.0609) from an SD3 single file
    (`first_stage_model.*`), a VAE-only file in the same layout without the prefix, or a diffusers folder (a VAE
    folder with config.json or a pipeline folder with vae/)."""
    from diffusers import AutoencoderKL

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = "" if os.path.isfile(os.path.join(path, "config.json")) else "vae"
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise ModelLoadError(f"{path}: no config.json or vae/config.json; pass a diffusers VAE folder or the SD3 "
                                 f"VAE file")
        return from_pretrained(AutoencoderKL, path, sub, dtype)
    return _vae_from_checkpoint(open_checkpoint(path), dtype)


# ---------------------------------------------------------------- diffusers folder


def _read_model_index(path: str) -> dict:
    index = os.path.join(path, "model_index.json")
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: folder without model_index.json; pass a diffusers StableDiffusion3Pipeline "
                             f"folder or an SD3 .safetensors file") from None
    except ValueError as e:
        raise ModelLoadError(f"{index}: not valid JSON ({first_line(e)}); re-download the model") from None
    if data.get("_class_name") != PIPELINE_CLASS:
        raise ModelLoadError(f"{path}: a {data.get('_class_name')} folder, not an SD3 one ({PIPELINE_CLASS}); pass "
                             f"an SD3 / SD3.5 model")
    return data


def _variant_of_config(config: Mapping) -> str:
    if config.get("dual_attention_layers"):
        return "sd35_medium"
    return "sd35_large" if config.get("qk_norm") else "sd3_medium"


def load_diffusers_folder(path: str, dtype: torch.dtype | None = torch.float32) -> SD3Parts:
    """The parts of a StableDiffusion3Pipeline folder (transformer, vae, text_encoder = CLIP-L, text_encoder_2 =
    CLIP-G; text_encoder_3 = T5 is located, not loaded), offline."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    path = os.fspath(path)
    index = _read_model_index(path)
    transformer = from_pretrained(SD3Transformer2DModel, path, "transformer", dtype)

    def optional(name: str, cls):
        entry = index.get(name)
        if not entry or entry[0] is None or not os.path.isdir(os.path.join(path, name)):
            return None
        return from_pretrained(cls, path, name, dtype)

    t5_dir = os.path.join(path, "text_encoder_3")
    return SD3Parts(_variant_of_config(transformer.config), transformer,
                    vae=optional("vae", AutoencoderKL), clip_l=optional("text_encoder", CLIPTextModelWithProjection),
                    clip_g=optional("text_encoder_2", CLIPTextModelWithProjection),
                    t5xxl_source=t5_dir if os.path.isdir(t5_dir) else None, source=os.path.abspath(path))


# ---------------------------------------------------------------- entry point


def check_text_encoders(transformer_config: Mapping, clip_l, clip_g, source: str = "the model") -> None:
    """ModelLoadError when CLIP-L and CLIP-G do not fit the MMDiT: their pooled projections are concatenated
    (pooled_projection_dim = L + G) and their hidden states must fit in the joint attention width."""
    proj = clip_l.config.projection_dim + clip_g.config.projection_dim
    if proj != transformer_config["pooled_projection_dim"]:
        raise ModelLoadError(f"{source}: CLIP-L and CLIP-G give {clip_l.config.projection_dim} + "
                             f"{clip_g.config.projection_dim} pooled features but the model expects "
                             f"{transformer_config['pooled_projection_dim']}; pass the text encoders of this model "
                             f"(--clip_l, --clip_g)")
    hidden = clip_l.config.hidden_size + clip_g.config.hidden_size
    if hidden > transformer_config["joint_attention_dim"]:
        raise ModelLoadError(f"{source}: CLIP-L + CLIP-G width {hidden} exceeds the model's joint attention width "
                             f"{transformer_config['joint_attention_dim']}; pass the text encoders of this model")


def load_sd3(path: str, *, clip_l: str | None = None, clip_g: str | None = None, t5xxl: str | None = None,
             vae: str | None = None, dtype: torch.dtype | None = torch.float32) -> SD3Parts:
    """An SD3 / SD3.5 model from a single file or a pipeline folder, with `--clip_l`, `--clip_g`, `--t5xxl`, `--vae`
    files replacing (or supplying) the parts the model has or lacks. Text encoders a model lacks and no option
    supplies stay None (the caller decides whether it needs them; `require_text_encoders` says which is missing)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder; check the model path")
    if os.path.isdir(path):
        parts = load_diffusers_folder(path, dtype)
    else:
        ckpt = open_checkpoint(path)
        variant = layout.classify(ckpt.shapes)
        if variant is None:
            raise _not_sd3(ckpt)
        bundled = layout.bundled_parts(ckpt.shapes)
        parts = SD3Parts(variant, _transformer_from_checkpoint(ckpt, dtype), source=os.path.abspath(path),
                         metadata=dict(ckpt.metadata))
        if bundled["vae"] and not vae:
            parts.vae = _vae_from_checkpoint(ckpt, dtype)
        if bundled["clip_l"] and not clip_l:
            parts.clip_l = _clip_from_checkpoint(ckpt, "clip_l", dtype, layout.CLIP_L_PREFIX)
        if bundled["clip_g"] and not clip_g:
            parts.clip_g = _clip_from_checkpoint(ckpt, "clip_g", dtype, layout.CLIP_G_PREFIX)
        if bundled["t5xxl"]:
            parts.t5xxl_source = os.path.abspath(path)
    if vae:
        parts.vae = load_vae(vae, dtype)
    if clip_l:
        parts.clip_l = load_clip_l(clip_l, dtype)
    if clip_g:
        parts.clip_g = load_clip_g(clip_g, dtype)
    if t5xxl:
        if not os.path.exists(t5xxl):
            raise ModelLoadError(f"{t5xxl}: no such file (--t5xxl); check the path")
        parts.t5xxl_source = os.path.abspath(t5xxl)
    if parts.clip_l is not None and parts.clip_g is not None:
        check_text_encoders(parts.transformer.config, parts.clip_l, parts.clip_g, path)
    return parts


def require_text_encoders(parts: SD3Parts) -> None:
    """ModelLoadError naming the option to add when CLIP-L, CLIP-G, T5 or the autoencoder is missing."""
    for value, option, what in ((parts.clip_l, "--clip_l", "the clip_l.safetensors file"),
                                (parts.clip_g, "--clip_g", "the clip_g.safetensors file"),
                                (parts.t5xxl_source, "--t5xxl", "the t5xxl .safetensors file"),
                                (parts.vae, "--vae", "the SD3 VAE file")):
        if value is None:
            raise ModelLoadError(f"{parts.source}: the model does not include {option[2:]}; pass {option} with {what}")
