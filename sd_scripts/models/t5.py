"""The T5 v1.1 XXL text encoder and its tokenizer, offline (shared by FLUX.1, Chroma and SD3).

Tokenizer: the SentencePiece vocabulary of `google/t5-v1_1-xxl` ships in `configs/t5_tokenizer/` (Apache-2.0, see
its NOTICE); a folder the user names works too, either holding the tokenizer files itself or in sd-scripts'
`--tokenizer_cache_dir` layout (one subfolder per model id with '/' turned into '_': `google_t5-v1_1-xxl/`).

Encoder: a single `t5xxl` file as users download it (`t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`,
ComfyUI's scaled fp8): transformers T5EncoderModel keys (`encoder.block.N.layer.M...`, `encoder.final_layer_norm`,
`shared.weight` and/or `encoder.embed_tokens.weight`). The config is T5 v1.1 XXL's with every size read from the
shapes, so tiny test encoders load through the same code: width from the embedding, heads from the relative
attention bias table, head width from q, feed-forward width and gating from wi / wi_0.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

from ..errors import ModelLoadError

T5_TOKENIZER_ID = "google/t5-v1_1-xxl"
T5_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "t5_tokenizer")
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # either one is enough (spiece.model needs sentencepiece)

# T5 v1.1 XXL encoder (google/t5-v1_1-xxl, as FLUX.1 and SD3 use it); sizes are replaced by the file's shapes
T5_XXL_CONFIG = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24, vocab_size=32128,
                     feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     layer_norm_epsilon=1e-6, dropout_rate=0.1, initializer_factor=1.0, pad_token_id=0,
                     eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
                     is_encoder_decoder=False, use_cache=False)
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


# ---------------------------------------------------------------- tokenizer


def t5_tokenizer_folder(folder: str | None = None) -> str:
    """The folder the T5 tokenizer is read from: the bundled one, `folder` itself, or `folder/google_t5-v1_1-xxl`
    (sd-scripts' --tokenizer_cache_dir layout). ModelLoadError naming the missing files and where to put them."""
    if folder is None:
        return T5_TOKENIZER_DIR
    candidates = [os.path.join(folder, T5_TOKENIZER_ID.replace("/", "_")), folder]
    for path in candidates:
        if any(os.path.isfile(os.path.join(path, name)) for name in T5_TOKENIZER_FILES):
            return path
    if not os.path.isdir(folder):
        raise ModelLoadError(f"{folder}: no such tokenizer folder; create it, or leave the tokenizer folder option "
                             f"empty to use the bundled T5 tokenizer")
    raise ModelLoadError(f"{folder}: no T5 tokenizer here (neither tokenizer.json nor spiece.model); put the "
                         f"{T5_TOKENIZER_ID} tokenizer files into {candidates[0]}, or leave the tokenizer folder "
                         f"option empty to use the bundled one")


def load_t5_tokenizer(folder: str | None = None):
    """A transformers T5 tokenizer, offline: bundled, or from `folder` (see t5_tokenizer_folder). Ids of
    "a photo of a cat": 3, 9, 1202, 13, 3, 9, 1712, 1 (ends with </s>; pads with <pad> = 0)."""
    from transformers import T5TokenizerFast

    path = t5_tokenizer_folder(folder)
    try:
        if path == T5_TOKENIZER_DIR:
            return T5TokenizerFast.from_pretrained(path, local_files_only=True)
        return T5TokenizerFast.from_pretrained(path, local_files_only=True, model_max_length=512)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (" (reading spiece.model needs the sentencepiece package: pip install sentencepiece, or add the "
                "tokenizer.json of the same model)" if "sentencepiece" in str(e).lower() else "")
        raise ModelLoadError(f"{path}: cannot load the T5 tokenizer ({first[:160]}){hint}; replace the folder's "
                             f"files with the {T5_TOKENIZER_ID} tokenizer, or use the bundled one") from None


# ---------------------------------------------------------------- encoder config from shapes


def _t5_prefix(shapes: Mapping[str, tuple]) -> str | None:
    """'' for the usual layout; some files keep the encoder under another level (e.g. 'text_encoders.t5xxl.
    transformer.' in ComfyUI all-in-one files)."""
    for key in shapes:
        m = re.match(r"(.*?)encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$", key)
        if m:
            return m.group(1)
    return None


def infer_t5_config(shapes: Mapping[str, tuple], prefix: str = "") -> dict:
    """T5Config kwargs of the T5 encoder in `shapes` (keys under `prefix`). KeyError when a needed tensor is
    missing."""
    p = prefix + "encoder.block."
    attn = p + "0.layer.0.SelfAttention."
    embed = next((prefix + k for k in EMBEDDING_KEYS if prefix + k in shapes), None)
    if embed is None:
        raise KeyError(prefix + "shared.weight")
    vocab, d_model = shapes[embed]
    inner = shapes[attn + "q.weight"][0]
    heads = shapes[attn + "relative_attention_bias.weight"][1]
    buckets = shapes[attn + "relative_attention_bias.weight"][0]
    layers = sorted({int(m.group(1)) for k in shapes if (m := re.match(re.escape(p) + r"(\d+)\.", k))})
    ff = p + "0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes
    d_ff = shapes[ff + ("wi_0.weight" if gated else "wi.weight")][0]
    cfg = dict(T5_XXL_CONFIG)
    cfg.update(d_model=d_model, vocab_size=vocab, num_heads=heads, d_kv=inner // heads, d_ff=d_ff,
               num_layers=len(layers), relative_attention_num_buckets=buckets,
               feed_forward_proj="gated-gelu" if gated else "relu", is_gated_act=gated,
               dense_act_fn="gelu_new" if gated else "relu")
    return cfg


# ---------------------------------------------------------------- encoder


def load_t5_encoder(path: str, dtype=None):
    """A transformers T5EncoderModel (eval mode) from a t5xxl single file, built on the meta device and filled with
    the file's tensors (float8-stored ones upcast to `dtype`, default float32). ModelLoadError for a missing file,
    another kind of file (naming what it is) or an incomplete one."""
    import torch
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    from .checkpoint import open_checkpoint
    from .tensor_reader import TensorReader

    dtype = dtype or torch.float32
    ckpt = open_checkpoint(path)
    prefix = _t5_prefix(ckpt.shapes)
    if prefix is None:
        raise ModelLoadError(f"{path}: not a T5-XXL text encoder (no "
                             f"'encoder.block.0.layer.0.SelfAttention.q.weight'); pass t5xxl_fp16.safetensors "
                             f"(or another T5 v1.1 XXL encoder file) as --t5xxl")
    try:
        cfg = infer_t5_config(ckpt.shapes, prefix)
    except (KeyError, IndexError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: incomplete T5 encoder (no tensor {e}); download the t5xxl file again") from None
    with init_empty_weights():
        model = T5EncoderModel(T5Config(**cfg))
    read = TensorReader(ckpt, dtype)
    embed_key = next(prefix + k for k in EMBEDDING_KEYS if prefix + k in ckpt.shapes)
    embedding = read(embed_key)
    state = {}
    for name in model.state_dict():
        if name in EMBEDDING_KEYS:
            state[name] = embedding  # one tensor for the tied input embedding
            continue
        if prefix + name not in ckpt.shapes:
            raise ModelLoadError(f"{path}: incomplete T5 encoder ({prefix + name} is missing); download the t5xxl "
                                 f"file again")
        state[name] = read(prefix + name)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ModelLoadError(f"{path}: the T5 weights do not fit together ({detail[:160]}); the file is damaged or "
                             f"not a T5 v1.1 encoder") from None
    model.tie_weights()
    return model.eval()

