"""Load and save the Lumina Image 2.0 files in the layouts users have, offline, into diffusers / transformers modules.

- the denoiser: an Alpha-VLLM single file (bare keys or ComfyUI's `model.diffusion_model.`; Neta Lumina's all-in-one
  file) <-> diffusers Lumina2Transformer2DModel through `layout.transformer_key_table`; a diffusers Lumina2Pipeline
  folder (or its transformer/ folder);
- `--gemma2`: Gemma-2 2B (transformers Gemma2Model names, bare, under `model.`, or Neta's prefix) -> Gemma2Model;
- `--ae`: the FLUX.1 16-channel autoencoder (bare, `vae.` or `first_stage_model.`) -> AutoencoderKL;
- the Gemma tokenizer (Gemma licence: never bundled): `--tokenizer_cache_dir` (a tokenizer folder, or a Hugging Face
  cache holding google/gemma-2-2b, as sd-scripts' option), a pipeline folder's tokenizer/, a `tokenizer/` folder or
  tokenizer files next to the Gemma-2 file, or ComfyUI's `spiece_model` tensor inside it.

Modules are built on the meta device and take the file's tensors as read (assign=True). Saves are atomic. Problems a
user can cause raise ModelLoadError naming the file or option and the fix.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ...errors import ModelLoadError
from ...models.checkpoint import Checkpoint, open_checkpoint
from ...models.module_io import cast_for_save, fill_module, first_line, from_pretrained, read_json, \
    save_safetensors_atomic, write_json
from ...models.tensor_reader import TensorReader
from . import layout

logger = logging.getLogger(__name__)

GEMMA_ID = "google/gemma-2-2b"  # the tokenizer sd-scripts loads (from its --tokenizer_cache_dir / the Hub)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_OPTIONS = {"--pretrained_model_name_or_path": (("lumina",), "a Lumina 2 denoiser",
                                                "lumina_2_model_bf16.safetensors (or a Neta Lumina file)"),
            "--gemma2": (("gemma2", "lumina"), "the Gemma-2 2B text encoder", "gemma_2_2b_fp16.safetensors"),
            "--ae": (("ae", "lumina"), "the 16-channel autoencoder", "ae.safetensors (the FLUX.1 autoencoder)")}
_OPTION_OF_KIND = {"lumina": "--pretrained_model_name_or_path", "gemma2": "--gemma2", "ae": "--ae"}


def check_file(path: str, option: str) -> Checkpoint:
    """The file given to `option`, its header read and its kind checked (an all-in-one file must hold the part);
    ModelLoadError naming the option otherwise."""
    kinds, wanted, example = _OPTIONS[option]
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file ({option}); pass {example}")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: a folder, but {option} takes a file: pass {example}, or the diffusers "
                             f"pipeline folder as --pretrained_model_name_or_path")
    ckpt = open_checkpoint(path)
    kind = layout.file_kind(ckpt.shapes)
    holds = {"--gemma2": layout.gemma_prefix(ckpt.shapes) is not None,
             "--ae": layout.ae_prefix(ckpt.shapes) is not None}.get(option, kind in kinds)
    if kind in kinds and holds:
        return ckpt
    if kind == "sd_vae" and option == "--ae":
        raise ModelLoadError(f"{path}: a Stable Diffusion VAE (4 latent channels); Lumina 2 uses the 16-channel "
                             f"FLUX.1 autoencoder: pass {example} as --ae")
    if kind == "lumina_diffusers":
        raise ModelLoadError(f"{path}: a Lumina 2 transformer in the diffusers layout; pass the pipeline folder it "
                             f"belongs to, or an Alpha-VLLM single file such as {_OPTIONS[option][2]}")
    belongs = f" (that file belongs in {_OPTION_OF_KIND[kind]})" if kind in _OPTION_OF_KIND and kind != "lumina" \
        else ""
    what = layout.describe_kind(kind) if kind != "lumina" else "a Lumina 2 denoiser without this part"
    raise ModelLoadError(f"{path}: this is {what}, not {wanted}{belongs}; pass {example} as {option}")


def _require(keys, ckpt: Checkpoint, what: str, fix: str) -> None:
    missing = [k for k in keys if k not in ckpt.shapes]
    if missing:
        raise ModelLoadError(f"{ckpt.path}: incomplete {what}: {len(missing)} tensors are missing (e.g. "
                             f"{missing[0]}); {fix}")


# ---------------------------------------------------------------- the denoiser

def alpha_to_diffusers(read: Callable[[str], torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """The diffusers state dict from `read(alpha_key)` (bare names, each read once)."""
    out: dict[str, torch.Tensor] = {}
    for rule in layout.transformer_key_table(config):
        tensor = read(rule.alpha)
        if rule.kind == layout.SPLIT:
            if tensor.shape[0] != sum(rule.sizes):
                raise ValueError(f"{rule.alpha} has {tensor.shape[0]} rows, expected {sum(rule.sizes)}")
            parts = [p.clone() for p in tensor.split(list(rule.sizes), dim=0)]
        else:
            parts = [tensor]
        out.update(zip(rule.diffusers, parts))
    return out


def diffusers_to_alpha(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, Any]:
    """The Alpha-VLLM tensors (bare names, as sd-scripts' lumina_train saves) of a diffusers state dict, with
    sd-scripts' unused `norm_final.weight` (ones). Fused qkv tensors are made when written (Deferred)."""
    from ...models.safetensors_writer import Deferred

    out: dict[str, Any] = {}
    for rule in layout.transformer_key_table(config):
        parts = [state_dict[k] for k in rule.diffusers]
        if rule.kind == layout.SPLIT:
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            out[rule.alpha] = Deferred(tuple(shape), parts[0].dtype, lambda p=parts: torch.cat(p, dim=0))
        else:
            out[rule.alpha] = parts[0]
    hidden = int(config["hidden_size"])
    dtype = state_dict["x_embedder.weight"].dtype
    out[layout.UNUSED_NORM] = torch.ones(hidden, dtype=dtype)
    return out


def model_config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def build_transformer(config: Mapping, *, meta: bool = True):
    """A Lumina2Transformer2DModel with no weights (meta) or randomly initialised."""
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel

    public = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    if not meta:
        return Lumina2Transformer2DModel.from_config(public)
    with init_empty_weights():
        return Lumina2Transformer2DModel.from_config(public)


def load_transformer(path: str, *, dtype: torch.dtype = torch.float32, checkpoint: Checkpoint | None = None):
    """The denoiser (eval) from an Alpha-VLLM single file (bare, ComfyUI-prefixed, all-in-one) or a diffusers
    pipeline / transformer folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        sub = "transformer" if os.path.isfile(os.path.join(path, "transformer", "config.json")) else ""
        from diffusers import Lumina2Transformer2DModel

        config = read_json(os.path.join(path, sub, "config.json"), path, "diffusers Lumina2Pipeline folder")
        if config.get("_class_name") != "Lumina2Transformer2DModel":
            raise ModelLoadError(f"{path}: a {config.get('_class_name') or 'non-Lumina'} model, not a Lumina 2 "
                                 f"transformer; pass a Lumina 2 model")
        return from_pretrained(Lumina2Transformer2DModel, path, sub, dtype)
    ckpt = checkpoint or check_file(path, "--pretrained_model_name_or_path")
    prefix = layout.COMFY_PREFIX if any(k.startswith(layout.COMFY_PREFIX) for k in ckpt.shapes) else ""
    bare = layout.strip_prefix(ckpt.shapes)
    try:
        config = layout.infer_transformer_config(bare)
    except KeyError as e:
        raise ModelLoadError(f"{path}: incomplete Lumina 2 denoiser (no tensor {first_line(e)}); download the model "
                             f"file again") from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: the architecture read from the tensor shapes is not usable ({first_line(e)}); "
                             f"the file is not a standard Lumina 2 checkpoint") from None
    table = layout.transformer_key_table(config)
    _require([prefix + r.alpha for r in table], ckpt, "Lumina 2 denoiser", "download the model file again")
    model = build_transformer(config)
    read = TensorReader(ckpt, dtype)
    try:
        state = alpha_to_diffusers(lambda k: read(prefix + k), config)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {first_line(e)}; the file is not a standard Lumina 2 checkpoint") from None
    fill_module(model, state, "Lumina 2 denoiser", path, "the file is damaged or not a standard Lumina 2 file")
    unused = [k for k in read.unused(k for k in ckpt.shapes if k.startswith(prefix))
              if k != prefix + layout.UNUSED_NORM]
    if unused:
        logger.warning("%s: %d tensors not used by the denoiser (e.g. %s)", path, len(unused), unused[0])
    return model


def save_transformer(model, path: str, *, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> str:
    """The denoiser as an Alpha-VLLM single file with bare keys (sd-scripts' lumina_train layout), atomically;
    diffusers' `Lumina2Transformer2DModel.from_single_file` and our loader read it."""
    return save_safetensors_atomic(diffusers_to_alpha(model.state_dict(), model_config(model)), path, metadata,
                                   dtype)


# ---------------------------------------------------------------- Gemma-2

def gemma_config(shapes: Mapping[str, tuple], prefix: str) -> dict:
    """Gemma2Config values from the tensor shapes: Gemma-2 2B's for its width (2304); otherwise head width 256
    where the projections are multiples of it, else one kv head whose width is the head width (the tiny models)."""
    vocab, hidden = shapes[f"{prefix}embed_tokens.weight"]
    q_rows = shapes[f"{prefix}layers.0.self_attn.q_proj.weight"][0]
    k_rows = shapes[f"{prefix}layers.0.self_attn.k_proj.weight"][0]
    head_dim = 256 if q_rows % 256 == 0 and k_rows % 256 == 0 else k_rows
    layers = len(layout._indices(shapes, f"{prefix}layers."))
    return dict(layout.GEMMA2_CONFIG, vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                num_attention_heads=q_rows // head_dim, num_key_value_heads=k_rows // head_dim,
                query_pre_attn_scalar=head_dim, num_hidden_layers=layers,
                intermediate_size=shapes[f"{prefix}layers.0.mlp.gate_proj.weight"][0])


def build_gemma2(config: Mapping):
    """A Gemma2Model on the meta device (eager attention: it keeps Gemma-2's logit soft-capping)."""
    from accelerate import init_empty_weights
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(**{k: v for k, v in config.items() if k != "architectures"})
    cfg._attn_implementation = "eager"
    with init_empty_weights():
        return Gemma2Model(cfg)


def load_gemma2(path: str, dtype: torch.dtype = torch.float32, checkpoint: Checkpoint | None = None):
    """Gemma2Model (eval) from a Gemma-2 file (or the all-in-one file holding it)."""
    ckpt = checkpoint or check_file(path, "--gemma2")
    prefix = layout.gemma_prefix(ckpt.shapes)
    try:
        config = gemma_config(ckpt.shapes, prefix)
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: incomplete Gemma-2 file ({first_line(e)}); download "
                             f"gemma_2_2b_fp16.safetensors again") from None
    model = build_gemma2(config)
    names = list(model.state_dict())
    _require([prefix + n for n in names], ckpt, "Gemma-2 text encoder", "download gemma_2_2b_fp16.safetensors again")
    read = TensorReader(ckpt, dtype)
    return fill_module(model, {n: read(prefix + n) for n in names}, "Gemma-2", path,
                       "pass gemma_2_2b_fp16.safetensors as --gemma2")


def save_gemma2(model, path: str, *, dtype: torch.dtype | None = None, tokenizer_model: bytes | None = None) -> str:
    """A Gemma2Model as ComfyUI's gemma_2_2b file (`model.` prefix; the sentencepiece model as `spiece_model`)."""
    tensors: dict[str, Any] = {"model." + k: v for k, v in model.state_dict().items()}
    if tokenizer_model is not None:
        tensors[layout.SPIECE_KEY] = torch.frombuffer(bytearray(tokenizer_model), dtype=torch.uint8)
    return save_safetensors_atomic(tensors, path, None, dtype)


# ---------------------------------------------------------------- the tokenizer

_TOKENIZER_CONFIG = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                     "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                     "padding_side": "right"}


def _is_tokenizer_folder(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _from_folder(folder: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a broken folder is the user's
        raise ModelLoadError(f"{folder}: cannot load the Gemma tokenizer ({first_line(e)}); give a complete "
                             f"tokenizer folder of {GEMMA_ID}") from None
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_from_model_bytes(data: bytes):
    """A GemmaTokenizer from a sentencepiece model's bytes (ComfyUI's `spiece_model` tensor)."""
    with tempfile.TemporaryDirectory(prefix="gemma-tokenizer-") as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(data)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(_TOKENIZER_CONFIG, f)
        return _from_folder(tmp)


def write_tokenizer_folder(folder: str, model_bytes: bytes) -> str:
    """A tokenizer folder (tokenizer.model + config, as the Hub's gemma-2-2b has) from sentencepiece bytes."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model_bytes)
    write_json(os.path.join(folder, "tokenizer_config.json"), _TOKENIZER_CONFIG)
    return folder


def _hub_cache_snapshot(cache_dir: str) -> str | None:
    """sd-scripts' --tokenizer_cache_dir is a Hugging Face cache: models--google--gemma-2-2b/snapshots/<rev>/."""
    snapshots = os.path.join(cache_dir, "models--" + GEMMA_ID.replace("/", "--"), "snapshots")
    if not os.path.isdir(snapshots):
        return None
    for rev in sorted(os.listdir(snapshots)):
        if _is_tokenizer_folder(os.path.join(snapshots, rev)):
            return os.path.join(snapshots, rev)
    return None


def find_tokenizer(*, model_path: str | None = None, gemma2: str | None = None,
                   tokenizer_cache_dir: str | None = None, gemma_checkpoint: Checkpoint | None = None):
    """The Gemma tokenizer from the first place that has one (see the module docstring); ModelLoadError naming
    what to provide when none has."""
    places: list[str] = []
    if tokenizer_cache_dir:
        for folder in (tokenizer_cache_dir, _hub_cache_snapshot(tokenizer_cache_dir),
                       os.path.join(tokenizer_cache_dir, "tokenizer")):
            if folder and _is_tokenizer_folder(folder):
                return _from_folder(folder)
        raise ModelLoadError(f"{tokenizer_cache_dir}: --tokenizer_cache_dir holds no Gemma tokenizer; give a folder "
                             f"with tokenizer.json or tokenizer.model of {GEMMA_ID} (or the Hugging Face cache that "
                             f"holds it)")
    if model_path and os.path.isdir(model_path):
        places.append(os.path.join(model_path, "tokenizer"))
    for part in (gemma2, model_path):
        if part and os.path.isfile(part):
            here = os.path.dirname(os.path.abspath(part))
            places += [os.path.join(here, "tokenizer"), here]
    for folder in places:
        if _is_tokenizer_folder(folder):
            return _from_folder(folder)
    ckpt = gemma_checkpoint
    if ckpt is not None and layout.SPIECE_KEY in ckpt.shapes:
        data = ckpt.get(layout.SPIECE_KEY)
        return tokenizer_from_model_bytes(data.to(torch.uint8).numpy().tobytes())
    where = gemma2 or model_path or "the model"
    raise ModelLoadError(f"{where}: no Gemma tokenizer found (its licence forbids shipping it here); give "
                         f"--tokenizer_cache_dir with a tokenizer folder of {GEMMA_ID} (tokenizer.json or "
                         f"tokenizer.model), or put that folder as 'tokenizer' next to the --gemma2 file")


# ---------------------------------------------------------------- the autoencoder

def load_ae(path: str, dtype: torch.dtype = torch.float32, checkpoint: Checkpoint | None = None):
    """AutoencoderKL (eval; scale 0.3611, shift 0.1159) from the FLUX.1 ae file (or an all-in-one file holding it),
    or a diffusers VAE folder."""
    from diffusers import AutoencoderKL

    from ...models.keymaps import VAE_PREFIX, vae_keymap
    from ..flux.layout import infer_ae_config
    from ..sd.loading import build_vae

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else ""
        return from_pretrained(AutoencoderKL, path, sub, dtype)
    ckpt = checkpoint or check_file(path, "--ae")
    prefix = layout.ae_prefix(ckpt.shapes)
    try:
        cfg = infer_ae_config(ckpt.shapes, prefix)
        vae = build_vae(cfg)
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: not a usable autoencoder ({first_line(e)}); pass ae.safetensors (the FLUX.1 "
                             f"autoencoder) as --ae") from None
    keymap = vae_keymap(vae.state_dict().keys(), len(cfg["block_out_channels"])).with_ldm_prefix(VAE_PREFIX, prefix)
    _require(keymap.ldm_keys, ckpt, "autoencoder", "download ae.safetensors again")
    return fill_module(vae, keymap.to_diffusers(TensorReader(ckpt, dtype)), "autoencoder", path,
                       "pass ae.safetensors as --ae")


# ---------------------------------------------------------------- all parts

@dataclass
class LuminaParts:
    transformer: Any
    gemma2: Any
    tokenizer: Any
    ae: Any
    metadata: dict

    def pipeline(self, scheduler=None):
        from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

        scheduler = scheduler or FlowMatchEulerDiscreteScheduler.from_config(layout.SCHEDULER_CONFIG)
        return Lumina2Pipeline(transformer=self.transformer, scheduler=scheduler, vae=self.ae,
                               text_encoder=self.gemma2, tokenizer=self.tokenizer)


PIPELINE_CLASSES = ("Lumina2Pipeline", "Lumina2Text2ImgPipeline")


def load_parts(path: str, *, dtype: torch.dtype = torch.float32, gemma2: str | None = None, ae: str | None = None,
               tokenizer_cache_dir: str | None = None, checkpoint: Checkpoint | None = None) -> LuminaParts:
    """Every part: from a diffusers Lumina2Pipeline folder (--gemma2 / --ae override its parts), or from the single
    files (an all-in-one file gives the parts it holds). Every file's header is checked before any weight is read."""
    from diffusers import AutoencoderKL
    from transformers import Gemma2Model

    path = os.fspath(path)
    if os.path.isdir(path):
        index = read_json(os.path.join(path, "model_index.json"), path, "diffusers Lumina2Pipeline folder")
        if index.get("_class_name") not in PIPELINE_CLASSES:
            raise ModelLoadError(f"{path}: a {index.get('_class_name') or 'non-diffusers'} folder, not a Lumina 2 "
                                 f"pipeline; pass a Lumina 2 model")
        gemma_ckpt = check_file(gemma2, "--gemma2") if gemma2 else None
        ae_ckpt = check_file(ae, "--ae") if ae and not os.path.isdir(ae) else None
        transformer = load_transformer(path, dtype=dtype)
        encoder = load_gemma2(gemma2, dtype, gemma_ckpt) if gemma2 else \
            from_pretrained(Gemma2Model, path, "text_encoder", dtype)
        vae = load_ae(ae, dtype, ae_ckpt) if ae else from_pretrained(AutoencoderKL, path, "vae", dtype)
        tokenizer = find_tokenizer(model_path=path, gemma2=gemma2, tokenizer_cache_dir=tokenizer_cache_dir,
                                   gemma_checkpoint=gemma_ckpt)
        return LuminaParts(transformer, encoder, tokenizer, vae, {})
    ckpt = checkpoint or check_file(path, "--pretrained_model_name_or_path")
    if not gemma2 and layout.gemma_prefix(ckpt.shapes) is None:
        raise ModelLoadError(f"{path}: the file holds only the denoiser; pass the Gemma-2 text encoder too "
                             f"(--gemma2 gemma_2_2b_fp16.safetensors), or a diffusers folder")
    if not ae and layout.ae_prefix(ckpt.shapes) is None:
        raise ModelLoadError(f"{path}: the file holds no autoencoder; pass --ae ae.safetensors (the FLUX.1 "
                             f"autoencoder)")
    gemma_ckpt = check_file(gemma2, "--gemma2") if gemma2 else ckpt
    ae_ckpt = (check_file(ae, "--ae") if not os.path.isdir(ae) else None) if ae else ckpt
    transformer = load_transformer(path, dtype=dtype, checkpoint=ckpt)
    encoder = load_gemma2(gemma_ckpt.path, dtype, gemma_ckpt)
    tokenizer = find_tokenizer(model_path=path, gemma2=gemma2 or path, tokenizer_cache_dir=tokenizer_cache_dir,
                               gemma_checkpoint=gemma_ckpt)
    vae = load_ae(ae, dtype, ae_ckpt) if ae else load_ae(path, dtype, ckpt)
    return LuminaParts(transformer, encoder, tokenizer, vae, dict(ckpt.metadata or {}))


def save_diffusers_folder(parts: LuminaParts, folder: str, *, dtype: torch.dtype | None = None) -> str:
    """A Lumina2Pipeline folder (safetensors), built in a temp folder and moved into place."""
    import shutil

    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(folder) + ".tmp-")
    try:
        parts.pipeline().save_pretrained(tmp, safe_serialization=True)
        if dtype is not None:
            from safetensors.torch import load_file, save_file

            for root, _dirs, files in os.walk(tmp):
                for name in files:
                    if name.endswith(".safetensors"):
                        file = os.path.join(root, name)
                        save_file(cast_for_save(load_file(file), dtype), file, metadata={"format": "pt"})
        for root, _dirs, files in os.walk(tmp):  # mkdtemp makes it private; a model folder is readable
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
