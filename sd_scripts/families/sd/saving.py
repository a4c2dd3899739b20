"""Save a ModelBundle as an original-layout single file or a diffusers folder (atomically), and materialise the
config folder that lets diffusers' `from_single_file(..., config=DIR, local_files_only=True)` work offline."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Mapping

import torch

from ...models.bundle import ModelBundle
from ...models.module_io import cast_for_save, temp_path, write_json
from ...models.safetensors_writer import save_safetensors
from ...models.tokenizer import PAD_TOKENS, TOKENIZER_DIR
from .arch import ARCH_METADATA_KEY, arch_metadata, bundled_config, pad_mode_for, variant_name
from .keymaps import model_keymaps


def _modules(bundle: ModelBundle) -> list:
    """[unet, vae, text_encoder(, text_encoder_2)] in the order of model_keymaps."""
    return [bundle.unet, bundle.vae, *bundle.text_encoders]


def ldm_state_dict(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """All tensors of the bundle in the original single-file layout, including extra_state."""
    modules = _modules(bundle)
    maps = model_keymaps(bundle.family, *modules)
    out: dict[str, torch.Tensor] = {}
    for module, keymap in zip(modules, maps):
        out.update(keymap.to_ldm(module.state_dict()))
    for name, tensor in bundle.extra_state.items():
        out.setdefault(name, tensor)
    return out


def save_single_file(bundle: ModelBundle, path: str, *, dtype: torch.dtype | None = None,
                     metadata: dict | None = None) -> str:
    """Write the model as one original-layout file (.safetensors, or .ckpt with a 'state_dict'), atomically.

    Float tensors are cast to `dtype` when given. Header metadata: the given `metadata` (str values) plus the
    architecture facts that shapes cannot tell, so the file loads back to the same configs.
    """
    tensors = cast_for_save(ldm_state_dict(bundle), dtype)
    te2 = bundle.text_encoder_2.config.to_dict() if bundle.text_encoder_2 is not None else None
    arch = arch_metadata(bundle.unet.config, bundle.vae.config, bundle.text_encoder.config.to_dict(), te2)
    tmp = temp_path(path)
    try:
        if path.lower().endswith(".safetensors"):
            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            meta.setdefault("format", "pt")
            meta[ARCH_METADATA_KEY] = arch
            save_safetensors(tensors, tmp, metadata=meta)
        else:  # a .ckpt has no header: the architecture facts ride along as a string entry
            torch.save({"state_dict": tensors, ARCH_METADATA_KEY: arch}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _pipeline_scheduler_config(bundle_or_sched: Mapping, family: str = "sd1") -> dict:
    """The sampling scheduler config the original pipelines ship, from a training schedule: SDXL Euler, SD1/SD2
    DDIM (v) / PNDM (epsilon)."""
    cfg = dict(bundle_or_sched)
    if family == "sdxl":
        cfg.update(_class_name="EulerDiscreteScheduler", interpolation_type="linear", use_karras_sigmas=False)
        cfg.setdefault("timestep_spacing", "leading")
        cfg.setdefault("steps_offset", 1)
        return cfg
    v = cfg.get("prediction_type") == "v_prediction"
    cfg["_class_name"] = "DDIMScheduler" if v else "PNDMScheduler"
    cfg.setdefault("set_alpha_to_one", False)
    if not v:
        cfg.setdefault("skip_prk_steps", True)
    return cfg


def _model_index(family: str = "sd1") -> dict:
    if family == "sdxl":
        return {"_class_name": "StableDiffusionXLPipeline", "feature_extractor": [None, None],
                "force_zeros_for_empty_prompt": True, "image_encoder": [None, None],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    return {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def _public(cfg: Mapping) -> dict:
    """A config without diffusers' bookkeeping keys ('_class_name', '_use_default_values', ...)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _write_text_config(path: str, te_cfg: Mapping, architecture: str) -> None:
    te = {k: v for k, v in te_cfg.items() if not k.startswith("_")}
    te.update(architectures=[architecture], model_type="clip_text_model")
    write_json(path, te)


def _write_tokenizer(tok: str, pad: str) -> None:
    os.makedirs(tok, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(tok, name))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(TOKENIZER_DIR, name), encoding="utf-8") as f:
            data = json.load(f)
        data["pad_token"] = PAD_TOKENS[pad]
        write_json(os.path.join(tok, name), data)


def _write_config_tree(folder: str, unet_cfg: Mapping, vae_cfg: Mapping, te_cfg: Mapping, sched_cfg: Mapping,
                       pad: str, te2_cfg: Mapping | None = None) -> None:
    """model_index.json, the component configs and the tokenizer(s): everything of a pipeline folder but weights.
    With `te2_cfg` it is an SDXL pipeline (text_encoder_2 and tokenizer_2, which pads with '!')."""
    index = _model_index("sdxl" if te2_cfg is not None else "sd1")
    index["scheduler"][1] = sched_cfg["_class_name"]
    write_json(os.path.join(folder, "model_index.json"), index)
    write_json(os.path.join(folder, "unet", "config.json"),
                dict(_public(unet_cfg), _class_name="UNet2DConditionModel"))
    write_json(os.path.join(folder, "vae", "config.json"), dict(_public(vae_cfg), _class_name="AutoencoderKL"))
    _write_text_config(os.path.join(folder, "text_encoder", "config.json"), te_cfg, "CLIPTextModel")
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), dict(sched_cfg))
    _write_tokenizer(os.path.join(folder, "tokenizer"), pad)
    if te2_cfg is not None:
        _write_text_config(os.path.join(folder, "text_encoder_2", "config.json"), te2_cfg,
                           "CLIPTextModelWithProjection")
        _write_tokenizer(os.path.join(folder, "tokenizer_2"), "zero")


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Move a finished folder into place; an existing folder is swapped out and then deleted."""
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix="." + os.path.basename(out_dir) + ".old-")
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_diffusers(bundle: ModelBundle, out_dir: str, *, dtype: torch.dtype | None = None) -> str:
    """Write the model as a diffusers StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) folder with
    safetensors weights, atomically."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out_dir) + ".tmp-")
    try:
        te_cfg = bundle.text_encoder.config.to_dict()
        te2 = bundle.text_encoder_2
        _write_config_tree(tmp, dict(bundle.unet.config), dict(bundle.vae.config), te_cfg,
                           _pipeline_scheduler_config(bundle.scheduler_config, bundle.family),
                           pad_mode_for(bundle.family), te2.config.to_dict() if te2 is not None else None)
        fmt = {"format": "pt"}
        save_safetensors(cast_for_save(bundle.unet.state_dict(), dtype),
                         os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"), fmt)
        save_safetensors(cast_for_save(bundle.vae.state_dict(), dtype),
                         os.path.join(tmp, "vae", "diffusion_pytorch_model.safetensors"), fmt)
        # 'text_model.' names: what every hub checkpoint uses and what transformers 4 and 5 both read
        te_sd = {(k if k.startswith("text_model.") else "text_model." + k): v
                 for k, v in bundle.text_encoder.state_dict().items()}
        save_safetensors(cast_for_save(te_sd, dtype), os.path.join(tmp, "text_encoder", "model.safetensors"), fmt)
        if te2 is not None:  # CLIPTextModelWithProjection keeps 'text_model.' in transformers 5 too
            save_safetensors(cast_for_save(te2.state_dict(), dtype), os.path.join(tmp, "text_encoder_2", "model.safetensors"),
                             fmt)
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        _replace_dir(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _text_config_facts(cfg: Mapping) -> dict:
    """A text-encoder config without version/dtype bookkeeping (so the cache key depends on the architecture only)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "dtype",
                                                                               "torch_dtype")}


def _cache_root() -> str:
    base = os.environ.get("SD_SCRIPTS_CACHE") or os.path.join(tempfile.gettempdir(), f"sd_scripts-{os.getuid()}")
    return os.path.join(base, "diffusers_configs")


def diffusers_config_dir(family: str, v_pred: bool, *, bundle: ModelBundle | None = None) -> str:
    """A local pipeline folder without weights (configs + tokenizers) for diffusers'
    `StableDiffusionPipeline.from_single_file(path, config=DIR, local_files_only=True)` (SDXL:
    `StableDiffusionXLPipeline`).

    Without `bundle`: the bundled real SD 1.5 / 2.1-base / 2.1-v / SDXL base 1.0 configs. With `bundle`: that model's
    own configs (e.g. the tiny test models). Built once per content in a cache folder, atomically.
    """
    te2 = None
    if bundle is not None:
        unet, vae, te = dict(bundle.unet.config), dict(bundle.vae.config), bundle.text_encoder.config.to_dict()
        sched = _pipeline_scheduler_config(bundle.scheduler_config, family)
        if bundle.text_encoder_2 is not None:
            te2 = bundle.text_encoder_2.config.to_dict()
    else:
        unet, vae, te = (bundled_config(family, v_pred, c) for c in ("unet", "vae", "text_encoder"))
        sched = bundled_config(family, v_pred, "scheduler")
        if family == "sdxl":
            te2 = bundled_config(family, v_pred, "text_encoder_2")
            sched["prediction_type"] = "v_prediction" if v_pred else "epsilon"
    te, te2 = (_text_config_facts(c) if c is not None else None for c in (te, te2))
    parts = [unet, vae, te, sched, pad_mode_for(family)] + ([te2] if te2 is not None else [])
    key = json.dumps(parts, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = os.path.join(_cache_root(), f"{variant_name(family, v_pred)}-{digest}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    os.makedirs(_cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=_cache_root(), prefix=".tmp-")
    try:
        _write_config_tree(tmp, unet, vae, te, sched, pad_mode_for(family), te2)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            pass
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
