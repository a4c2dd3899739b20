"""Load and save the FLUX.1 / Chroma model files in the layouts users have, offline, into diffusers/transformers
modules.

- the denoiser: a Black Forest Labs single file (`flux1-dev.safetensors`, `flux1-schnell.safetensors`, Chroma; bare
  keys or ComfyUI's `model.diffusion_model.` prefix; also stored in float8) <-> diffusers FluxTransformer2DModel /
  ChromaTransformer2DModel, through the one key table of `layout.transformer_key_table`;
- `clip_l.safetensors` (transformers CLIP layout, `text_model.*`) -> CLIPTextModel;
- `t5xxl_*.safetensors` -> T5EncoderModel (`sd_scripts.models.t5`);
- `ae.safetensors` (the BFL autoencoder: LDM VAE layout without prefix, 16 latent channels, no quant convs) <->
  AutoencoderKL with scale 0.3611 and shift 0.1159;
- a diffusers FluxPipeline / ChromaPipeline folder (transformer/, text_encoder/, text_encoder_2/, vae/, tokenizer/,
  tokenizer_2/, scheduler/) in both directions.

Modules are built on the meta device from configs read off the tensor shapes and take the file's tensors as they
are read (`assign=True`): no random init, no second copy of a weight. Saves are atomic (temp file + os.replace) and
deterministic. Every problem a user can cause raises ModelLoadError naming the file and the fix.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ...errors import ModelLoadError
from ...models.module_io import cast_for_save, fill_module, save_safetensors_atomic, first_line, from_pretrained, read_json, write_json
from ..sd.arch import infer_text_config
from ...models.checkpoint import Checkpoint, open_checkpoint
from ...models.keymaps import VAE_PREFIX, clip_keymap, vae_keymap
from ...models.safetensors_writer import save_safetensors
from ...models.t5 import T5_TOKENIZER_DIR, load_t5_encoder, load_t5_tokenizer
from ...models.tensor_reader import TensorReader
from ...models.tokenizer import PAD_TOKENS, TOKENIZER_DIR, load_clip_tokenizer
from . import layout

logger = logging.getLogger(__name__)

# the command-line option each kind of file belongs to (for "wrong file" errors)
_OPTION_OF_KIND = {"flux": "--pretrained_model_name_or_path", "chroma": "--pretrained_model_name_or_path",
                   "clip_l": "--clip_l", "t5xxl": "--t5xxl", "ae": "--ae"}
# option -> (kinds accepted, what it must be, an example file)
_FILE_OPTIONS = {
    "--pretrained_model_name_or_path": (("flux", "chroma"), "a FLUX.1 / Chroma denoiser",
                                        "flux1-dev.safetensors / flux1-schnell.safetensors (or a Chroma file with "
                                        "--model_type chroma)"),
    "--clip_l": (("clip_l",), "a CLIP-L text encoder", "clip_l.safetensors"),
    "--t5xxl": (("t5xxl",), "a T5-XXL text encoder", "t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)"),
    "--ae": (("ae",), "the FLUX autoencoder", "ae.safetensors (the FLUX.1 autoencoder)"),
}


def _expect_kind(ckpt: Checkpoint, option: str) -> str:
    """The file's kind when it is what `option` takes; else ModelLoadError saying what the file is, where it
    belongs and what to pass instead."""
    kinds, wanted, example = _FILE_OPTIONS[option]
    kind = layout.file_kind(ckpt.shapes)
    if kind in kinds:
        return kind
    if kind == "sd_vae" and option == "--ae":
        raise ModelLoadError(f"{ckpt.path}: this is a Stable Diffusion VAE (4 latent channels); FLUX.1 needs its own "
                             f"16-channel autoencoder: pass {example} as --ae")
    if kind == "flux_diffusers" and option == "--pretrained_model_name_or_path":
        raise ModelLoadError(f"{ckpt.path}: a FLUX transformer saved in the diffusers layout; pass the diffusers "
                             f"folder it belongs to (with transformer/config.json), or a BFL single file such as "
                             f"flux1-dev.safetensors")
    belongs = f" (that file belongs in {_OPTION_OF_KIND[kind]})" if kind in _OPTION_OF_KIND else ""
    raise ModelLoadError(f"{ckpt.path}: this is {layout.describe_kind(kind)}, not {wanted}{belongs}; pass "
                         f"{example} as {option}")


def check_file_kind(path: str, option: str) -> str:
    """Read only the header of the file given to `option` ('--pretrained_model_name_or_path', '--clip_l',
    '--t5xxl', '--ae') and return its kind; ModelLoadError when it is missing or the wrong kind of file. A folder
    passes unchecked (its loader checks it)."""
    if os.path.isdir(path):
        return "folder"
    return _expect_kind(open_checkpoint(os.fspath(path)), option)


def _fill(module, state_dict: Mapping[str, torch.Tensor], what: str, path: str):
    return fill_module(module, state_dict, what, path, f"the file is damaged or not a standard {what} file")


def _require(keys: list[str], ckpt: Checkpoint, what: str, fix: str) -> None:
    missing = [k for k in keys if k not in ckpt.shapes]
    if missing:
        raise ModelLoadError(f"{ckpt.path}: incomplete {what}: {len(missing)} tensors are missing (e.g. "
                             f"{missing[0]}); {fix}")


# ---------------------------------------------------------------- BFL <-> diffusers tensors


def bfl_to_diffusers(read: Callable[[str], torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """The diffusers state dict of the denoiser described by `config`, from `read(bfl_key)` (bare BFL names; each
    read once). Split parts are cloned so that every tensor has its own storage (safetensors can save them)."""
    out: dict[str, torch.Tensor] = {}
    for rule in layout.transformer_key_table(config):
        tensor = read(rule.bfl)
        if rule.kind == layout.SPLIT:
            if tensor.shape[0] != sum(rule.sizes):
                raise ValueError(f"{rule.bfl} has {tensor.shape[0]} rows, expected {sum(rule.sizes)}")
            parts = [p.clone() for p in tensor.split(list(rule.sizes), dim=0)]
        elif rule.kind == layout.SWAP_HALVES:
            first, second = tensor.chunk(2, dim=0)
            parts = [torch.cat([second, first], dim=0)]
        else:
            parts = [tensor]
        out.update(zip(rule.diffusers, parts))
    return out


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor], config: Mapping, *,
                     deferred: bool = False) -> dict[str, Any]:
    """The BFL tensors (bare names) of a diffusers denoiser state dict; the inverse of bfl_to_diffusers. With
    `deferred`, tensors the layout fuses or reorders are safetensors_writer.Deferred (made when written)."""
    from ...models.safetensors_writer import Deferred

    def fused(parts: list) -> torch.Tensor:
        return torch.cat(parts, dim=0)

    def swapped(t: torch.Tensor) -> torch.Tensor:
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)

    out: dict[str, Any] = {}
    for rule in layout.transformer_key_table(config):
        parts = [state_dict[k] for k in rule.diffusers]
        if rule.kind == layout.SPLIT:
            make, shape = (lambda p=parts: fused(p)), (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        elif rule.kind == layout.SWAP_HALVES:
            make, shape = (lambda t=parts[0]: swapped(t)), tuple(parts[0].shape)
        else:
            out[rule.bfl] = parts[0]
            continue
        out[rule.bfl] = Deferred(tuple(shape), parts[0].dtype, make) if deferred else make()
    return out


def _model_config(model) -> dict:
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg["_class_name"] = type(model).__name__
    return cfg


def _transformer_class(class_name: str):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    return ChromaTransformer2DModel if class_name == "ChromaTransformer2DModel" else FluxTransformer2DModel


def build_transformer(config: Mapping, *, meta: bool = True):
    """A FluxTransformer2DModel / ChromaTransformer2DModel (per config['_class_name']) with no weights loaded
    (meta device) or randomly initialised (meta=False)."""
    from accelerate import init_empty_weights

    cls = _transformer_class(config.get("_class_name", "FluxTransformer2DModel"))
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    if not meta:
        return cls.from_config(public)
    with init_empty_weights():
        return cls.from_config(public)


# ---------------------------------------------------------------- the denoiser

def _check_model_type(found: str, model_type: str, path: str) -> None:
    if model_type not in ("flux", "chroma"):
        raise ModelLoadError(f"--model_type {model_type!r} is not known; use flux or chroma")
    if found == "chroma" and model_type != "chroma":
        raise ModelLoadError(f"{path}: this is a Chroma model; add --model_type chroma")
    if found != "chroma" and model_type == "chroma":
        label = "FLUX.1-dev" if found == "flux_dev" else "FLUX.1-schnell"
        raise ModelLoadError(f"{path}: this is a {label} model, not Chroma; use --model_type flux")


def load_transformer(path: str, *, dtype: torch.dtype = torch.float32, model_type: str = "flux"):
    """The denoiser as a diffusers FluxTransformer2DModel (model_type 'flux': dev or schnell, told by the file) or
    ChromaTransformer2DModel ('chroma'), in eval mode, weights in `dtype` (float8-stored files are upcast).

    `path`: a BFL single file (bare or 'model.diffusion_model.' keys), a diffusers pipeline folder or its
    transformer/ folder. ModelLoadError for a missing, wrong-kind or incomplete file and a model_type mismatch."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_transformer_folder(path, dtype, model_type)
    ckpt = open_checkpoint(path)
    _expect_kind(ckpt, "--pretrained_model_name_or_path")
    found = layout.classify_denoiser(ckpt.shapes)
    _check_model_type(found, model_type, path)
    try:
        config = layout.infer_transformer_config(ckpt.shapes)
    except (KeyError, StopIteration) as e:
        raise ModelLoadError(f"{path}: incomplete {found} checkpoint (no tensor {first_line(e)}); download the "
                             f"model file again") from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: the architecture read from the tensor shapes is not usable ({first_line(e)});"
                             f" the file is not a standard FLUX.1 / Chroma checkpoint") from None
    prefix = layout.COMFY_PREFIX if any(k.startswith(layout.COMFY_PREFIX) for k in ckpt.shapes) else ""
    table = layout.transformer_key_table(config)
    _require([prefix + r.bfl for r in table], ckpt, f"{found} checkpoint", "download the model file again")
    try:
        model = build_transformer(config)
    except (ValueError, TypeError, AssertionError) as e:
        raise ModelLoadError(f"{path}: cannot build the denoiser these shapes describe ({first_line(e)}); the file "
                             f"is not a standard FLUX.1 / Chroma checkpoint") from None
    read = TensorReader(ckpt, dtype)
    try:
        state = bfl_to_diffusers(lambda k: read(prefix + k), config)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {first_line(e)}; the file is not a standard FLUX.1 / Chroma checkpoint") \
            from None
    _fill(model, state, "FLUX denoiser", path)
    unused = read.unused(k for k in ckpt.shapes if k.startswith(prefix))
    if unused:
        logger.warning("%s: %d tensors not used by the denoiser (e.g. %s)", path, len(unused), unused[0])
    return model


def _load_transformer_folder(path: str, dtype: torch.dtype, model_type: str):
    sub = "transformer" if os.path.isfile(os.path.join(path, "transformer", "config.json")) else ""
    config_path = os.path.join(path, sub, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"{path}: no transformer/config.json; pass a diffusers FLUX.1 / Chroma folder or a BFL "
                             f"single file such as flux1-dev.safetensors")
    config = _read_json(config_path, path)
    class_name = config.get("_class_name", "")
    if class_name not in ("FluxTransformer2DModel", "ChromaTransformer2DModel"):
        raise ModelLoadError(f"{config_path}: a {class_name or 'non-FLUX'} model, not a FLUX.1 / Chroma transformer; "
                             f"pass a FLUX.1 or Chroma model")
    found = "chroma" if class_name == "ChromaTransformer2DModel" else (
        "flux_dev" if config.get("guidance_embeds") else "flux_schnell")
    _check_model_type(found, model_type, path)
    return from_pretrained(_transformer_class(class_name), path, sub, dtype)


def save_transformer(model, path: str, *, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write the denoiser as a BFL-layout single file (bare keys, as sd-scripts saves it), atomically and
    deterministically; float tensors cast to `dtype` when given. diffusers'
    `FluxTransformer2DModel.from_single_file(path, config=...)` and our load_transformer read it back."""
    tensors = diffusers_to_bfl(model.state_dict(), _model_config(model), deferred=True)
    return save_safetensors_atomic(tensors, path, metadata, dtype)


# ---------------------------------------------------------------- CLIP-L

def load_clip_l(path: str, dtype: torch.dtype = torch.float32):
    """A transformers CLIPTextModel (eval) from a clip_l single file (keys `text_model.*`, or without that level);
    the config is CLIP-L's with the sizes read from the shapes."""
    from ..sd.loading import build_text_encoder

    ckpt = open_checkpoint(os.fspath(path))
    _expect_kind(ckpt, "--clip_l")
    prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in ckpt.shapes else ""
    try:
        cfg = infer_text_config(ckpt.shapes, "sd1", False, clip_prefix=prefix)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(f"{path}: incomplete CLIP-L file (no tensor {first_line(e)}); download clip_l.safetensors"
                             f" again") from None
    model = build_text_encoder(cfg)
    keymap = clip_keymap(model.state_dict().keys(), prefix)
    _require(keymap.ldm_keys, ckpt, "CLIP-L file", "download clip_l.safetensors again")
    read = TensorReader(ckpt, dtype)
    return _fill(model, keymap.to_diffusers(read), "CLIP-L", path)


def save_clip_l(model, path: str, *, dtype: torch.dtype | None = None) -> str:
    """Write a CLIPTextModel as a clip_l single file (`text_model.*` keys, the layout users download)."""
    keymap = clip_keymap(model.state_dict().keys(), "text_model.")
    return save_safetensors_atomic(keymap.to_ldm(model.state_dict()), path, None, dtype)


# ---------------------------------------------------------------- T5-XXL


def load_t5xxl(path: str, dtype: torch.dtype = torch.float32):
    """A transformers T5EncoderModel from a t5xxl single file, after checking the file is one."""
    ckpt = open_checkpoint(os.fspath(path))
    _expect_kind(ckpt, "--t5xxl")
    return load_t5_encoder(path, dtype)


def save_t5xxl(model, path: str, *, dtype: torch.dtype | None = None) -> str:
    """Write a T5EncoderModel as a t5xxl single file (transformers names, one `shared.weight` embedding)."""
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return save_safetensors_atomic(state, path, None, dtype)


# ---------------------------------------------------------------- autoencoder

def _ae_prefix(ckpt: Checkpoint) -> str:
    return next(p for p in ("", "vae.", "first_stage_model.") if p + "encoder.conv_in.weight" in ckpt.shapes)


def load_ae(path: str, dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderKL (eval; 16 latent channels, scaling_factor 0.3611, shift_factor 0.1159) from the BFL
    ae.safetensors (original VAE layout without prefix), or a diffusers VAE folder."""
    from diffusers import AutoencoderKL

    from ..sd.loading import build_vae

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else ""
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise ModelLoadError(f"{path}: no config.json or vae/config.json; pass ae.safetensors (the FLUX.1 "
                                 f"autoencoder) or a diffusers VAE folder as --ae")
        return from_pretrained(AutoencoderKL, path, sub, dtype)
    ckpt = open_checkpoint(path)
    _expect_kind(ckpt, "--ae")
    prefix = _ae_prefix(ckpt)
    try:
        cfg = layout.infer_ae_config(ckpt.shapes, prefix)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(f"{path}: incomplete autoencoder (no tensor {first_line(e)}); download ae.safetensors "
                             f"again") from None
    try:
        vae = build_vae(cfg)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: cannot build an autoencoder from these shapes ({first_line(e)}); pass "
                             f"ae.safetensors (the FLUX.1 autoencoder)") from None
    keymap = vae_keymap(vae.state_dict().keys(), len(cfg["block_out_channels"])).with_ldm_prefix(VAE_PREFIX, prefix)
    _require(keymap.ldm_keys, ckpt, "autoencoder", "download ae.safetensors again")
    return _fill(vae, keymap.to_diffusers(TensorReader(ckpt, dtype)), "autoencoder", path)


def save_ae(vae, path: str, *, dtype: torch.dtype | None = None) -> str:
    """Write an AutoencoderKL in the BFL ae.safetensors layout (original VAE names, no prefix)."""
    keymap = vae_keymap(vae.state_dict().keys(), len(vae.config.block_out_channels)).with_ldm_prefix(VAE_PREFIX, "")
    return save_safetensors_atomic(keymap.to_ldm(vae.state_dict()), path, None, dtype)


# ---------------------------------------------------------------- all parts; diffusers folders


@dataclass
class FluxModelParts:
    """Everything a FLUX.1 / Chroma run needs. Chroma has no CLIP-L (clip_l and clip_tokenizer are None)."""

    model_type: str  # 'flux_dev' | 'flux_schnell' | 'chroma'
    transformer: Any
    t5: Any
    t5_tokenizer: Any
    ae: Any
    scheduler_config: dict
    clip_l: Any = None
    clip_tokenizer: Any = None

    def pipeline(self):
        """The diffusers FluxPipeline / ChromaPipeline made of these parts (for sampling)."""
        from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        if self.model_type == "chroma":
            return ChromaPipeline(scheduler=scheduler, vae=self.ae, text_encoder=self.t5, tokenizer=self.t5_tokenizer,
                                  transformer=self.transformer)
        return FluxPipeline(scheduler=scheduler, vae=self.ae, text_encoder=self.clip_l, tokenizer=self.clip_tokenizer,
                            text_encoder_2=self.t5, tokenizer_2=self.t5_tokenizer, transformer=self.transformer)


def model_type_of(transformer) -> str:
    """'chroma', 'flux_dev' or 'flux_schnell' of a loaded diffusers transformer."""
    if type(transformer).__name__ == "ChromaTransformer2DModel":
        return "chroma"
    return "flux_dev" if transformer.config.guidance_embeds else "flux_schnell"


def load_single_files(transformer: str, *, t5xxl: str, ae: str, clip_l: str | None = None,
                      dtype: torch.dtype = torch.float32, model_type: str = "flux",
                      tokenizer_dir: str | None = None) -> FluxModelParts:
    """The parts from the separate files users download (denoiser, clip_l, t5xxl, ae); CLIP-L is required for FLUX.1
    and not used by Chroma. Each file's kind is checked before any weight is read."""
    # header checks first: a wrong file fails before any weight is read
    if check_file_kind(transformer, "--pretrained_model_name_or_path") != "folder":
        _check_model_type(layout.classify_denoiser(open_checkpoint(transformer).shapes), model_type, transformer)
    if model_type != "chroma" and not clip_l:
        raise ModelLoadError("FLUX.1 needs the CLIP-L text encoder: pass clip_l.safetensors as --clip_l")
    check_file_kind(t5xxl, "--t5xxl")
    check_file_kind(ae, "--ae")
    if model_type != "chroma":
        check_file_kind(clip_l, "--clip_l")
    model = load_transformer(transformer, dtype=dtype, model_type=model_type)
    kind = model_type_of(model)
    parts = FluxModelParts(kind, model, load_t5xxl(t5xxl, dtype), load_t5_tokenizer(tokenizer_dir),
                           load_ae(ae, dtype), layout.scheduler_config(kind))
    if kind != "chroma":
        parts.clip_l, parts.clip_tokenizer = load_clip_l(clip_l, dtype), load_clip_tokenizer("eos")
    return parts


def _read_json(path: str, folder: str) -> dict:
    return read_json(path, folder, "diffusers FLUX.1 / Chroma folder or the single files")


def _folder_t5_tokenizer(folder: str, sub: str):
    path = os.path.join(folder, sub)
    return load_t5_tokenizer(path if os.path.isdir(path) else None)


def load_diffusers_folder(path: str, *, dtype: torch.dtype = torch.float32,
                          model_type: str = "flux") -> FluxModelParts:
    """The parts of a diffusers FluxPipeline / ChromaPipeline folder, offline (tokenizers from the folder, or the
    bundled ones when it has none)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    path = os.fspath(path)
    index = _read_json(os.path.join(path, "model_index.json"), path)
    pipeline = index.get("_class_name")
    if pipeline not in ("FluxPipeline", "ChromaPipeline"):
        raise ModelLoadError(f"{path}: a {pipeline or 'non-diffusers'} folder, not a FLUX.1 / Chroma pipeline; pass "
                             f"a FLUX.1 or Chroma model")
    transformer = _load_transformer_folder(path, dtype, model_type)
    kind = model_type_of(transformer)
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    sched = _read_json(sched_path, path) if os.path.isfile(sched_path) else layout.scheduler_config(kind)
    ae = from_pretrained(AutoencoderKL, path, "vae", dtype)
    if kind == "chroma":
        return FluxModelParts(kind, transformer, from_pretrained(T5EncoderModel, path, "text_encoder", dtype),
                              _folder_t5_tokenizer(path, "tokenizer"), ae, sched)
    tok_dir = os.path.join(path, "tokenizer")
    return FluxModelParts(kind, transformer, from_pretrained(T5EncoderModel, path, "text_encoder_2", dtype),
                          _folder_t5_tokenizer(path, "tokenizer_2"), ae, sched,
                          from_pretrained(CLIPTextModel, path, "text_encoder", dtype),
                          load_clip_tokenizer("eos", tok_dir if os.path.isdir(tok_dir) else None))


def _public(cfg: Mapping) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _text_config(model, architecture: str) -> dict:
    cfg = {k: v for k, v in model.config.to_dict().items()
           if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    cfg["architectures"] = [architecture]
    return cfg


def _write_clip_tokenizer(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(folder, name))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(TOKENIZER_DIR, name), encoding="utf-8") as f:
            data = json.load(f)
        data["pad_token"] = PAD_TOKENS["eos"]
        write_json(os.path.join(folder, name), data)


def _write_t5_tokenizer(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(T5_TOKENIZER_DIR)):  # data, its licence and notice
        shutil.copyfile(os.path.join(T5_TOKENIZER_DIR, name), os.path.join(folder, name))


def save_diffusers_folder(parts: FluxModelParts, out_dir: str, *, dtype: torch.dtype | None = None) -> str:
    """Write the parts as a diffusers FluxPipeline (Chroma: ChromaPipeline) folder with safetensors weights,
    deterministically and atomically (built in a temp folder, then moved into place)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out_dir) + ".tmp-")
    chroma = parts.model_type == "chroma"
    t5_sub, t5_tok_sub = ("text_encoder", "tokenizer") if chroma else ("text_encoder_2", "tokenizer_2")
    try:
        index = {"_class_name": "ChromaPipeline" if chroma else "FluxPipeline",
                 "feature_extractor": [None, None], "image_encoder": [None, None],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "transformer": ["diffusers", type(parts.transformer).__name__],
                 "vae": ["diffusers", "AutoencoderKL"],
                 t5_sub: ["transformers", "T5EncoderModel"], t5_tok_sub: ["transformers", "T5TokenizerFast"]}
        if not chroma:
            index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
        write_json(os.path.join(tmp, "model_index.json"), index)
        write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), parts.scheduler_config)
        fmt = {"format": "pt"}
        for sub, module in (("transformer", parts.transformer), ("vae", parts.ae)):
            write_json(os.path.join(tmp, sub, "config.json"),
                        dict(_public(dict(module.config)), _class_name=type(module).__name__))
            save_safetensors(cast_for_save(module.state_dict(), dtype),
                             os.path.join(tmp, sub, "diffusion_pytorch_model.safetensors"), fmt)
        write_json(os.path.join(tmp, t5_sub, "config.json"), _text_config(parts.t5, "T5EncoderModel"))
        t5_state = {k: v for k, v in parts.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
        save_safetensors(cast_for_save(t5_state, dtype), os.path.join(tmp, t5_sub, "model.safetensors"), fmt)
        _write_t5_tokenizer(os.path.join(tmp, t5_tok_sub))
        if not chroma:
            write_json(os.path.join(tmp, "text_encoder", "config.json"), _text_config(parts.clip_l, "CLIPTextModel"))
            clip_state = {(k if k.startswith("text_model.") else "text_model." + k): v
                          for k, v in parts.clip_l.state_dict().items()}
            save_safetensors(cast_for_save(clip_state, dtype), os.path.join(tmp, "text_encoder", "model.safetensors"), fmt)
            _write_clip_tokenizer(os.path.join(tmp, "tokenizer"))
        for root, _dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def transformer_config_dir(model_or_config, folder: str) -> str:
    """Write `folder/transformer/config.json` for a transformer (or its config dict) and return `folder`: what
    diffusers' `FluxTransformer2DModel.from_single_file(path, config=folder, local_files_only=True)` needs
    offline."""
    cfg = _model_config(model_or_config) if hasattr(model_or_config, "config") else dict(model_or_config)
    write_json(os.path.join(folder, "transformer", "config.json"), cfg)
    return folder
