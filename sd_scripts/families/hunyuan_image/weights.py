"""Load and save the HunyuanImage-2.1 files in the layouts users have (see layout.py), offline, into diffusers /
transformers modules: the DiT (HunyuanImageTransformer2DModel), the VAE (AutoencoderKLHunyuanImage), Qwen2.5-VL's
language model (Qwen2_5_VLTextModel: prompts are text only, so the vision tower is never read) and byT5
(T5EncoderModel), plus a diffusers HunyuanImagePipeline folder. Modules are built on the meta device from configs read
off the shapes and take the file's tensors (`assign=True`); saves are atomic. A wrong file is one ModelLoadError
naming the option and the file, from its header, before weights are read."""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Mapping

import torch

from ...errors import ModelLoadError
from ...models.checkpoint import Checkpoint, open_checkpoint
from ...models.module_io import fill_module, first_line, from_pretrained, save_safetensors_atomic
from ...models.tensor_reader import TensorReader
from . import layout

log = logging.getLogger(__name__)

# option -> (file kind it takes, what it must be, example)
FILE_OPTIONS = {
    "pretrained_model_name_or_path": ("dit", "the HunyuanImage-2.1 DiT", "hunyuanimage2.1.safetensors"),
    "text_encoder": ("qwen", "the Qwen2.5-VL text encoder", "qwen_2.5_vl_7b.safetensors"),
    "byt5": ("byt5", "the byT5 glyph text encoder", "byt5_small_glyphxl_fp16.safetensors"),
    "vae": ("vae", "the HunyuanImage-2.1 VAE", "hunyuan_image_2.1_vae_fp16.safetensors"),
}
_OPTION_OF_KIND = {kind: option for option, (kind, _w, _e) in FILE_OPTIONS.items()}

# ByT5's added tokens (sd-scripts / Glyph-SDXL-V2: 138 colours, then the fonts of four languages, numbered per
# language), appended after ByT5's 384 ids in this order
BYT5_COLOR_TOKENS = 138
BYT5_FONT_TOKENS = (("en", 512), ("cn", 143), ("jp", 211), ("kr", 122))


def byt5_added_tokens() -> list[str]:
    return [f"<color-{i}>" for i in range(BYT5_COLOR_TOKENS)] + \
        [f"<{lang}-font-{i}>" for lang, count in BYT5_FONT_TOKENS for i in range(count)]


def load_byt5_tokenizer():
    """transformers' ByT5Tokenizer (no vocabulary file: bytes + 3 specials) with the colour and font tokens added as
    special tokens, as sd-scripts does: 1,510 ids, the rows of the byT5 encoder's embedding."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.add_tokens(byt5_added_tokens(), special_tokens=True)
    return tok


def check_file(path: str, option: str) -> Checkpoint | None:
    """The checkpoint given to `option`, its header checked; None for a folder (its loader checks it)."""
    kind, wanted, example = FILE_OPTIONS[option]
    if os.path.isdir(path):
        return None
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file (--{option}); pass {example}")
    try:
        ckpt = open_checkpoint(os.fspath(path))
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's
        raise ModelLoadError(f"{path}: cannot read (--{option}: {first_line(e)}); pass {example}") from None
    found = layout.file_kind(ckpt.shapes)
    if found == kind:
        return ckpt
    belongs = f" (that file belongs in --{_OPTION_OF_KIND[found]})" if found in _OPTION_OF_KIND else ""
    raise ModelLoadError(f"{path}: this is {layout.describe_kind(found)}, not {wanted}{belongs}; pass {example} as "
                         f"--{option}")


def _fill(module, state: Mapping[str, torch.Tensor], what: str, path: str):
    return fill_module(module, state, what, path, f"the file is damaged or not a standard {what} file")


# ---------------------------------------------------------------- DiT
def build_dit(config: Mapping, *, meta: bool = True):
    from accelerate import init_empty_weights
    from diffusers import HunyuanImageTransformer2DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if meta:
        with init_empty_weights():
            return HunyuanImageTransformer2DModel(**cfg)
    return HunyuanImageTransformer2DModel(**cfg)


def official_to_diffusers(read: Callable[[str], torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rule in layout.transformer_key_table(config):
        tensor = read(rule.official)
        if rule.kind == layout.SPLIT:
            if tensor.shape[0] != sum(rule.sizes):
                raise ValueError(f"{rule.official} has {tensor.shape[0]} rows, expected {sum(rule.sizes)}")
            parts = [p.clone() for p in tensor.split(list(rule.sizes), dim=0)]
        elif rule.kind == layout.SWAP_HALVES:
            first, second = tensor.chunk(2, dim=0)
            parts = [torch.cat([second, first], dim=0)]
        else:
            parts = [tensor]
        out.update(zip(rule.diffusers, parts))
    return out


def diffusers_to_official(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rule in layout.transformer_key_table(config):
        parts = [state[k] for k in rule.diffusers]
        if rule.kind == layout.SPLIT:
            out[rule.official] = torch.cat(parts, dim=0)
        elif rule.kind == layout.SWAP_HALVES:
            first, second = parts[0].chunk(2, dim=0)
            out[rule.official] = torch.cat([second, first], dim=0)
        else:
            out[rule.official] = parts[0]
    return out


def dit_config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def load_dit(path: str, dtype: torch.dtype = torch.float32, ckpt: Checkpoint | None = None):
    """The DiT from an official / ComfyUI single file, a HunyuanImagePipeline folder or its transformer/ folder."""
    from diffusers import HunyuanImageTransformer2DModel

    if os.path.isdir(path):
        sub = "transformer" if os.path.isfile(os.path.join(path, "transformer", "config.json")) else ""
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise ModelLoadError(f"{path}: no transformer/config.json; pass a diffusers HunyuanImage-2.1 folder or "
                                 f"the hunyuanimage2.1.safetensors file")
        return from_pretrained(HunyuanImageTransformer2DModel, path, sub, dtype)
    ckpt = ckpt or check_file(path, "pretrained_model_name_or_path")
    names = layout.dit_keys(ckpt.shapes)
    try:
        config = layout.infer_dit_config(ckpt.shapes)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{path}: incomplete or unusual HunyuanImage-2.1 DiT ({first_line(e)}); download "
                             f"hunyuanimage2.1.safetensors again") from None
    if config["guidance_embeds"] or config["use_meanflow"]:
        raise ModelLoadError(f"{path}: the distilled HunyuanImage-2.1 DiT (guidance / meanflow embedders); train the "
                             f"base model hunyuanimage2.1.safetensors, as sd-scripts does")
    table = layout.transformer_key_table(config)
    missing = [r.official for r in table if r.official not in names]
    if missing:
        raise ModelLoadError(f"{path}: incomplete HunyuanImage-2.1 DiT: {len(missing)} tensors are missing (e.g. "
                             f"{missing[0]}); download the model file again")
    model = build_dit(config)
    read = TensorReader(ckpt, dtype)
    try:
        state = official_to_diffusers(lambda k: read(names[k]), config)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {first_line(e)}; the file is not a standard HunyuanImage-2.1 DiT") from None
    return _fill(model, state, "HunyuanImage-2.1 DiT", path)


def save_dit(model, path: str, *, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> str:
    """The DiT as an official-layout single file (bare keys, what sd-scripts reads and writes)."""
    return save_safetensors_atomic(diffusers_to_official(model.state_dict(), dit_config(model)), path, metadata,
                                   dtype)


# ---------------------------------------------------------------- VAE
def vae_config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    import re

    rx = re.compile(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight$")
    levels = sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})
    channels = [shapes[f"encoder.down.{lv}.block.0.conv2.weight"][0] for lv in levels]
    per_level = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    samplers = sum(1 for lv in levels if f"encoder.down.{lv}.downsample.conv.weight" in shapes)
    return dict(layout.VAE_CONFIG, latent_channels=shapes["decoder.conv_in.weight"][1], block_out_channels=channels,
                layers_per_block=per_level, spatial_compression_ratio=2 ** samplers)


def load_vae(path: str, dtype: torch.dtype = torch.float32):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLHunyuanImage

    if os.path.isdir(path):
        sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else ""
        return from_pretrained(AutoencoderKLHunyuanImage, path, sub, dtype)
    ckpt = check_file(path, "vae")
    try:
        config = vae_config_from_shapes(ckpt.shapes)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(f"{path}: incomplete HunyuanImage-2.1 VAE ({first_line(e)}); download it again") \
            from None
    with init_empty_weights():
        vae = AutoencoderKLHunyuanImage(**config)
    names = layout.vae_key_map(ckpt.shapes)
    read = TensorReader(ckpt, dtype)
    state = {}
    for official, diffusers_key in names.items():
        t = read(official)
        if t.ndim == 5 and t.shape[2] == 1:  # the released checkpoint's 3-D convolutions of one frame
            t = t.squeeze(2)
        state[diffusers_key] = t
    return _fill(vae, state, "HunyuanImage-2.1 VAE", path)


def vae_official_names(keys) -> dict[str, str]:
    """diffusers VAE key -> official key (the inverse of layout.vae_key_map, from the diffusers keys alone)."""
    import re

    keys = list(keys)
    out: dict[str, str] = {}
    for part, flat_word, level_word, sampler in (("encoder", "down_blocks", "down", "downsample"),
                                                  ("decoder", "up_blocks", "up", "upsample")):
        rx = re.compile(rf"{part}\.{flat_word}\.(\d+)\.(.+)$")
        flats = sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})
        is_sampler = {i: f"{part}.{flat_word}.{i}.conv.weight" in keys for i in flats}
        where, level, block = {}, 0, 0
        for i in flats:
            if is_sampler[i]:
                where[i] = f"{part}.{level_word}.{level}.{sampler}"
                level, block = level + 1, 0
            else:
                where[i] = f"{part}.{level_word}.{level}.block.{block}"
                block += 1
        for k in keys:
            m = rx.match(k)
            if m:
                out[k] = f"{where[int(m.group(1))]}.{m.group(2).replace('conv_shortcut', 'nin_shortcut')}"
    inverse = {b: a for a, b in layout._VAE_MID}
    for k in keys:
        if k not in out:
            new = k
            for b, a in inverse.items():
                new = new.replace("." + b, "." + a)
            out[k] = new
    return out


def save_vae(vae, path: str, *, dtype: torch.dtype | None = None) -> str:
    state = vae.state_dict()
    names = vae_official_names(state.keys())
    return save_safetensors_atomic({names[k]: v for k, v in state.items()}, path, None, dtype)


# ---------------------------------------------------------------- Qwen2.5-VL language model
def qwen_head_dim(hidden: int) -> int:
    """Qwen2.5-VL-7B's heads are 128 wide; the tiny test models' 32 (hidden sizes not a multiple of 128)."""
    return layout.QWEN_HEAD_DIM if hidden % layout.QWEN_HEAD_DIM == 0 else 32


def qwen_config(sizes: Mapping) -> dict:
    """Qwen2_5_VLTextConfig kwargs: the released model's, with `sizes` (hidden_size, layers, heads, ...) replaced;
    the multimodal RoPE sections scaled to the head width (16/24/24 of 128)."""
    head = qwen_head_dim(sizes["hidden_size"])
    section = [head // 8, head * 3 // 16, head * 3 // 16]
    return dict(layout.QWEN_CONFIG, **{**sizes, "head_dim": head,
                                       "rope_scaling": {"type": "default", "mrope_section": section}})


def qwen_config_from_shapes(shapes: Mapping[str, tuple], prefix: str) -> dict:
    import re

    vocab, hidden = shapes[prefix + "embed_tokens.weight"]
    q = shapes[prefix + "layers.0.self_attn.q_proj.weight"][0]
    kv = shapes[prefix + "layers.0.self_attn.k_proj.weight"][0]
    layers = len({m.group(1) for k in shapes if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))})
    head = qwen_head_dim(hidden)
    return qwen_config(dict(hidden_size=hidden, vocab_size=vocab, num_hidden_layers=layers,
                            intermediate_size=shapes[prefix + "layers.0.mlp.gate_proj.weight"][0],
                            num_attention_heads=q // head, num_key_value_heads=kv // head))


def build_qwen(config: Mapping, *, meta: bool = True):
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    cfg = Qwen2_5_VLTextConfig(**config)
    if meta:
        with init_empty_weights():
            return Qwen2_5_VLTextModel(cfg)
    return Qwen2_5_VLTextModel(cfg)


def load_qwen(path: str, dtype: torch.dtype = torch.bfloat16):
    """Qwen2.5-VL's language model from the single file sd-scripts takes (`model.*` keys; `visual.*` and `lm_head`
    are not read) or a pipeline folder's text_encoder/ (Qwen2_5_VLForConditionalGeneration: its language model)."""
    if os.path.isdir(path):
        from transformers import Qwen2_5_VLForConditionalGeneration

        sub = "text_encoder" if os.path.isdir(os.path.join(path, "text_encoder")) else ""
        full = from_pretrained(Qwen2_5_VLForConditionalGeneration, path, sub, dtype)
        return full.model.language_model.eval()
    ckpt = check_file(path, "text_encoder")
    prefix = layout.qwen_prefix(ckpt.shapes)
    try:
        config = qwen_config_from_shapes(ckpt.shapes, prefix)
    except KeyError as e:
        raise ModelLoadError(f"{path}: incomplete Qwen2.5-VL file ({first_line(e)}); download it again") from None
    model = build_qwen(config)
    read = TensorReader(ckpt, dtype)
    state = {k: read(prefix + k) for k in model.state_dict()}
    return _fill(model, state, "Qwen2.5-VL", path)


def save_qwen(model, path: str, *, dtype: torch.dtype | None = None) -> str:
    """The language model in the layout of the released single file (`model.` + transformers' names)."""
    return save_safetensors_atomic({"model." + k: v for k, v in model.state_dict().items()}, path, None, dtype)


# ---------------------------------------------------------------- byT5
def load_byt5(path: str, dtype: torch.dtype = torch.float32):
    from ...models.t5 import load_t5_encoder

    if os.path.isdir(path):
        from transformers import T5EncoderModel

        sub = "text_encoder_2" if os.path.isdir(os.path.join(path, "text_encoder_2")) else ""
        return from_pretrained(T5EncoderModel, path, sub, dtype)
    check_file(path, "byt5")
    return load_t5_encoder(path, dtype)


def save_byt5(model, path: str, *, dtype: torch.dtype | None = None) -> str:
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return save_safetensors_atomic(state, path, None, dtype)


# ---------------------------------------------------------------- diffusers folder
def is_pipeline_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            return json.load(f).get("_class_name") == "HunyuanImagePipeline"
    except (OSError, ValueError, AttributeError):
        return False


def save_pipeline_folder(out_dir: str, *, transformer, vae, qwen, qwen_tokenizer, byt5, byt5_tokenizer) -> str:
    """A diffusers HunyuanImagePipeline folder (Qwen's language model wrapped in Qwen2_5_VLForConditionalGeneration
    without weights for the vision tower it never uses in text prompts is not possible: the folder's text_encoder is
    the full class, its vision tower and lm_head random)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_cfg = qwen.config.to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_cfg["hidden_size"],
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision)
    full = Qwen2_5_VLForConditionalGeneration(cfg)
    full.model.language_model.load_state_dict(qwen.state_dict())
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in layout.SCHEDULER_CONFIG.items()
                                                   if not k.startswith("_")})
    pipe = HunyuanImagePipeline(scheduler=scheduler, vae=vae, text_encoder=full, tokenizer=qwen_tokenizer,
                                text_encoder_2=byt5, tokenizer_2=byt5_tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir
