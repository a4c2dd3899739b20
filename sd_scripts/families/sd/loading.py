"""Load an SD1.x/SD2.x/SDXL model, offline, from a single file (.safetensors/.ckpt) or a diffusers folder.

Single files: the family comes from the keys, the configs from the bundled ones plus the tensor shapes; modules are
built on the meta device (no random init) and take the file's tensors as they are read (`assign=True`), so no
second copy of a weight is ever made. Tensors no module uses are kept in `extra_state` for an exact save.
Saving lives in `saving.py`; its functions are re-exported here.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from ...errors import ModelLoadError
from ...models.module_io import fill_module, first_line, from_pretrained, read_json
from .arch import (SUPPORTED_FAMILIES, pad_mode_for, arch_overrides, bundled_config, infer_openclip_text_config,
                   infer_text_config, infer_unet_config, infer_vae_config, scheduler_training_config)
from ...models.bundle import ModelBundle, compute_vae_id
from ...models.checkpoint import Checkpoint, open_checkpoint
from .. import family_spec
from .detect import (SDXL_REFINER_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, detect_diffusers_family, detect_family,
                     v_prediction_from_metadata)
from ...models.keymaps import clip_keymap, vae_keymap
from ...models.ldm_layout import CLIP_PREFIX, VAE_PREFIX
from ...models.tokenizer import load_clip_tokenizer
from .keymaps import model_keymaps

__all__ = ["ModelBundle", "load_model", "load_vae", "detect_family", "save_single_file", "save_diffusers",
           "diffusers_config_dir", "build_unet", "build_vae", "build_text_encoder", "build_text_encoder_2"]


def _unsupported(family: str, path: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: this is an {family.upper()} model, which is not supported yet; use an SD 1.x, "
                          f"SD 2.x or SDXL model")


def _check_v2_flag(v2: bool | None, family: str, path: str) -> None:
    if v2 and family != "sd2":
        raise ModelLoadError(f"{path}: --v2 is set but this is a {family_spec(family).label} model; remove --v2")


# ---------------------------------------------------------------- module builders (no random init)


def build_unet(config: Mapping, *, meta: bool = True):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if not meta:
        return UNet2DConditionModel.from_config(dict(config))
    with init_empty_weights():
        return UNet2DConditionModel.from_config(dict(config))


def build_vae(config: Mapping, *, meta: bool = True):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    if not meta:
        return AutoencoderKL.from_config(dict(config))
    with init_empty_weights():
        return AutoencoderKL.from_config(dict(config))


def build_text_encoder(config: Mapping, *, meta: bool = True, with_projection: bool = False):
    """A transformers CLIPTextModel (or CLIPTextModelWithProjection: SDXL's second encoder) from a config."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    if not meta:
        return cls(cfg)
    with init_empty_weights():
        return cls(cfg)


def build_text_encoder_2(config: Mapping, *, meta: bool = True):
    """SDXL's OpenCLIP-bigG encoder as a transformers CLIPTextModelWithProjection."""
    return build_text_encoder(config, meta=meta, with_projection=True)


def _fill(module, state_dict: dict, what: str, path: str):
    return fill_module(module, state_dict, what, path, "the file is not a standard Stable Diffusion checkpoint")


def _check_present(keys: list[str], ckpt: Checkpoint, what: str) -> None:
    missing = [k for k in keys if k not in ckpt.shapes]
    if missing:
        raise ModelLoadError(f"{ckpt.path}: {len(missing)} {what} tensors are missing (e.g. {missing[0]}); pass a "
                             f"complete Stable Diffusion checkpoint")


# ---------------------------------------------------------------- single file

_TOKEN_EMBEDDING = "embeddings.token_embedding.weight"


def _check_sdxl_layout(ckpt: Checkpoint) -> None:
    """An SDXL file must carry both text encoders in the base-model layout (the refiner is another model)."""
    if any(k.startswith(SDXL_TE2_PREFIX) for k in ckpt.shapes):
        return
    if any(k.startswith(SDXL_REFINER_PREFIX) for k in ckpt.shapes):
        raise ModelLoadError(f"{ckpt.path}: this is an SDXL refiner model, which is not supported; use an SDXL base "
                             f"model (or a fine-tune of it)")
    raise ModelLoadError(f"{ckpt.path}: incomplete SDXL checkpoint (no OpenCLIP-bigG text encoder "
                         f"'{SDXL_TE2_PREFIX}*'); pass a full SDXL model with U-Net, VAE and both text encoders")


def _single_file_configs(ckpt: Checkpoint, family: str, v_pred: bool, clip_prefix: str) -> list[dict]:
    """[unet, vae, text encoder(, text encoder 2)] configs of a single file, from shapes, bundled configs and our
    metadata."""
    over = arch_overrides(ckpt.metadata)
    configs = [infer_unet_config(ckpt.shapes, family, v_pred, over.get("unet")),
               infer_vae_config(ckpt.shapes, family, v_pred, overrides=over.get("vae")),
               infer_text_config(ckpt.shapes, family, v_pred, clip_prefix, over.get("text_encoder"))]
    if family == "sdxl":
        configs.append(infer_openclip_text_config(ckpt.shapes, SDXL_TE2_PREFIX,
                                                  bundled_config(family, v_pred, "text_encoder_2"),
                                                  drop_last_layer=False, overrides=over.get("text_encoder_2")))
    return configs


def _load_single_file(path: str, v2: bool | None, v_param: bool | None, dtype: torch.dtype,
                      ckpt: Checkpoint | None = None) -> ModelBundle:
    ckpt = ckpt if ckpt is not None else open_checkpoint(path)
    family = detect_family(ckpt.shapes, path)
    if family not in SUPPORTED_FAMILIES:
        raise _unsupported(family, path)
    if family == "sdxl":
        _check_sdxl_layout(ckpt)
    _check_v2_flag(v2, family, path)
    # 'v_pred': the empty marker tensor v-prediction SDXL fine-tunes carry (ComfyUI's convention)
    v_pred = bool(v_param) or v_prediction_from_metadata(ckpt.metadata) or "v_pred" in ckpt.shapes
    clip_prefix = (SDXL_TE1_PREFIX if family == "sdxl" else CLIP_PREFIX) + "text_model."
    if family == "sd1" and clip_prefix + _TOKEN_EMBEDDING not in ckpt.shapes and \
            CLIP_PREFIX + _TOKEN_EMBEDDING in ckpt.shapes:
        clip_prefix = CLIP_PREFIX  # files from old transformers versions lack the 'text_model.' level
    try:
        configs = _single_file_configs(ckpt, family, v_pred, clip_prefix)
    except (KeyError, StopIteration, ZeroDivisionError, IndexError, ValueError) as e:
        raise ModelLoadError(f"{path}: incomplete {family} checkpoint (no tensor {first_line(e)}); pass a full "
                             f"SD model with U-Net, VAE and text encoder(s)") from None

    builders = (build_unet, build_vae, build_text_encoder, build_text_encoder_2)
    try:
        modules = [build(cfg) for build, cfg in zip(builders, configs)]
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: the {family} architecture read from the tensor shapes cannot be built "
                             f"({first_line(e)}); the file is not a standard Stable Diffusion checkpoint") from None
    maps = list(model_keymaps(family, *modules))
    if clip_prefix == CLIP_PREFIX:
        maps[2] = clip_keymap(modules[2].state_dict().keys(), clip_prefix)
    consumed: set[str] = set()

    def get(key: str) -> torch.Tensor:
        consumed.add(key)
        return ckpt.get(key, dtype)

    for module, keymap, what in zip(modules, maps, ("U-Net", "VAE", "text-encoder", "second text-encoder")):
        _check_present(keymap.ldm_keys, ckpt, what)
        _fill(module, keymap.to_diffusers(get), what, path)
    extra = {k: ckpt.get(k) for k in ckpt.shapes if k not in consumed}
    scheduler = scheduler_training_config(bundled_config(family, v_pred, "scheduler"), v_pred)
    unet, vae, te = modules[:3]
    text_encoders, tokenizers = [te], [load_clip_tokenizer(pad_mode_for(family))]
    if family == "sdxl":
        text_encoders.append(modules[3])
        tokenizers.append(load_clip_tokenizer("zero"))
    return ModelBundle(family, unet, vae, text_encoders, tokenizers, os.path.abspath(path), v_pred, scheduler, extra,
                       metadata=dict(ckpt.metadata))


# ---------------------------------------------------------------- diffusers folder


def _read_json(path: str, folder: str) -> dict:
    return read_json(path, folder, "diffusers Stable Diffusion folder or a single-file checkpoint")


def _load_diffusers(path: str, v2: bool | None, v_param: bool | None, dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelLoadError(f"{path}: folder without model_index.json; pass a diffusers Stable Diffusion folder or "
                             f"a .safetensors/.ckpt file")
    unet_cfg = _read_json(os.path.join(path, "unet", "config.json"), path)
    te_cfg = _read_json(os.path.join(path, "text_encoder", "config.json"), path)
    has_te2 = os.path.isdir(os.path.join(path, "text_encoder_2"))
    family = detect_diffusers_family(unet_cfg, te_cfg, path, has_text_encoder_2=has_te2)
    if family not in SUPPORTED_FAMILIES:
        raise _unsupported(family, path)
    if family == "sdxl" and not has_te2:
        raise ModelLoadError(f"{path}: an SDXL folder without text_encoder_2/ (a refiner or an incomplete copy); pass "
                             f"an SDXL base pipeline folder")
    _check_v2_flag(v2, family, path)
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    sched_cfg = _read_json(sched_path, path) if os.path.isfile(sched_path) else bundled_config(family, False,
                                                                                                "scheduler")
    v_pred = bool(v_param) or sched_cfg.get("prediction_type") == "v_prediction"
    unet = from_pretrained(UNet2DConditionModel, path, "unet", dtype)
    vae = from_pretrained(AutoencoderKL, path, "vae", dtype)
    te = from_pretrained(CLIPTextModel, path, "text_encoder", dtype)
    text_encoders, tokenizers = [te], [_folder_tokenizer(path, "tokenizer", pad_mode_for(family))]
    if family == "sdxl":
        text_encoders.append(from_pretrained(CLIPTextModelWithProjection, path, "text_encoder_2", dtype))
        tokenizers.append(_folder_tokenizer(path, "tokenizer_2", "zero"))
    bundle = ModelBundle(family, unet, vae, text_encoders, tokenizers, os.path.abspath(path), v_pred,
                         scheduler_training_config(sched_cfg, v_pred))
    return bundle


def _folder_tokenizer(path: str, sub: str, pad: str):
    """The folder's tokenizer (or the bundled one when the folder has none), padding as the family requires."""
    tok_dir = os.path.join(path, sub)
    try:
        return load_clip_tokenizer(pad, tok_dir if os.path.isdir(tok_dir) else None)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{tok_dir}: cannot load the tokenizer ({first_line(e)}); delete the folder to use "
                             f"the bundled CLIP tokenizer") from None


# ---------------------------------------------------------------- VAE override


def load_vae(path: str, family: str = "sd1", v_pred: bool = False, dtype: torch.dtype = torch.float32):
    """An AutoencoderKL from a single-file VAE (keys with or without 'first_stage_model.', or a full checkpoint)
    or a diffusers VAE folder (with config.json, or a pipeline folder with vae/)."""
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return from_pretrained(AutoencoderKL, path, "", dtype)
        if os.path.isfile(os.path.join(path, "vae", "config.json")):
            return from_pretrained(AutoencoderKL, path, "vae", dtype)
        raise ModelLoadError(f"{path}: no config.json or vae/config.json; pass a diffusers VAE folder or a VAE file")
    ckpt = open_checkpoint(path)
    prefix = next((p for p in (VAE_PREFIX, "") if p + "encoder.conv_in.weight" in ckpt.shapes
                   and p + "encoder.down.0.block.0.conv1.weight" in ckpt.shapes), None)
    if prefix is None:
        raise ModelLoadError(f"{path}: not a VAE in the original layout (no encoder.down.0 weights); pass an SD VAE "
                             f"file or a diffusers VAE folder")
    try:
        cfg = infer_vae_config(ckpt.shapes, family, v_pred, prefix, arch_overrides(ckpt.metadata).get("vae"))
    except (KeyError, IndexError) as e:
        raise ModelLoadError(f"{path}: incomplete VAE (no tensor {first_line(e)}); pass a complete VAE") from None
    try:
        vae = build_vae(cfg)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: cannot build a VAE from these tensor shapes ({first_line(e)}); pass an "
                             f"SD VAE") from None
    keymap = vae_keymap(vae.state_dict().keys(), len(cfg["block_out_channels"])).with_ldm_prefix(VAE_PREFIX, prefix)
    _check_present(keymap.ldm_keys, ckpt, "VAE")
    return _fill(vae, keymap.to_diffusers(lambda k: ckpt.get(k, dtype)), "VAE", path)


# ---------------------------------------------------------------- entry point


def load_model(path: str, *, vae: str | None = None, v2: bool | None = None, v_parameterization: bool | None = None,
               dtype: torch.dtype = torch.float32, checkpoint: Checkpoint | None = None) -> ModelBundle:
    """Load an SD 1.x / 2.x / XL single-file checkpoint or diffusers folder into a ModelBundle, offline (usually
    through sd_scripts.models.loading.load_model, which detects the family; `checkpoint`: the file already opened).

    v2=True only confirms the family (an SD1 model then is an error); v_parameterization=True forces v-prediction,
    otherwise it comes from the folder's scheduler config or the file's modelspec metadata (default epsilon).
    `vae` replaces the model's VAE. Every user-side problem raises ModelLoadError naming the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder; check the model path")
    if os.path.isdir(path):
        bundle = _load_diffusers(path, v2, v_parameterization, dtype)
    else:
        bundle = _load_single_file(path, v2, v_parameterization, dtype, checkpoint)
    if vae:
        bundle.vae = load_vae(vae, bundle.family, bundle.v_prediction, dtype)
    bundle.vae_id = compute_vae_id(bundle.vae)
    return bundle


from .saving import diffusers_config_dir, save_diffusers, save_single_file  # noqa: E402  (re-exported)
