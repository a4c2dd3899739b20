"""Tiny random-weight Lumina Image 2.0 models in the files users have, for tests and demos.

The real architectures at toy widths, built by the real diffusers / transformers classes: a NextDiT
(Lumina2Transformer2DModel) 48 wide with 2 heads of 24 (RoPE axes 8 + 8 + 8), 1 kv head, 2 main blocks and 1 noise /
1 context refiner; a Gemma-2 32 wide (2 layers, 2 heads of 16, 1 kv head); the FLUX.1-style 16-channel autoencoder
at 4 levels (8x downsampling, scale 0.3611, shift 0.1159).

TEST TOKENIZER: Gemma's tokenizer is under the Gemma licence and is not shipped. The tiny model gets its own small
sentencepiece model, trained when the model is built (the `sentencepiece` library, on generated captions of the demo
words) with Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3), byte fallback, no dummy prefix. It is a test
tokenizer only: it knows nothing of Gemma's 256k vocabulary.

Written as `lumina-tiny.safetensors` (Alpha-VLLM layout, bare keys, as sd-scripts saves), `gemma2.safetensors`
(ComfyUI's layout: `model.` prefix and the tokenizer's sentencepiece model as the `spiece_model` tensor),
`ae.safetensors` (BFL layout) and a diffusers Lumina2Pipeline folder `diffusers/` (with tokenizer/). Weights come
from generators seeded per tensor name (the same seed gives the same bytes).

    python -m sd_scripts.families.lumina.tiny --out DIR [--layout single|diffusers|both] [--seed N]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys

TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=None, hidden_size=48,
                        num_layers=2, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=256,
                        ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(8, 8, 8),
                        axes_lens=(300, 512, 512), cap_feat_dim=32)
TINY_GEMMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
TINY_AE = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32, sample_size=64)
TOKENIZER_VOCAB = 400
_WORDS = ("a photo of the and with on in at by picture image style painting drawing portrait close up background "
          "dog cat sks ohwx red green blue yellow purple orange white black small large cute sitting standing "
          "you are an assistant designed to generate superior images high degree alignment based textual prompts "
          "user prompt start").split()


def train_test_tokenizer(seed: int = 0) -> bytes:
    """A small sentencepiece BPE model (bytes) with Gemma's special-token ids, trained on generated captions."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=TOKENIZER_VOCAB, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)
    return model.getvalue()


def _random_state(module, seed: int, component: str) -> dict:
    from ..flux.tiny import _random_state as flux_random_state

    return flux_random_state(module, seed, component)


def build_tiny_parts(seed: int = 0, layers: int = 2):
    """The tiny model as weights.LuminaParts (random seeded modules, the test tokenizer) and the tokenizer bytes."""
    from ..flux.layout import AE_CONFIG
    from ..sd.loading import build_vae
    from . import layout
    from .weights import LuminaParts, build_gemma2, build_transformer, tokenizer_from_model_bytes

    spiece = train_test_tokenizer(seed)
    tokenizer = tokenizer_from_model_bytes(spiece)
    transformer = build_transformer(dict(TINY_TRANSFORMER, num_layers=layers))
    transformer.load_state_dict(_random_state(transformer, seed, "transformer"), strict=True, assign=True)
    gemma = build_gemma2(dict(layout.GEMMA2_CONFIG, **TINY_GEMMA, vocab_size=len(tokenizer)))
    gemma.load_state_dict(_random_state(gemma, seed, "gemma2"), strict=True, assign=True)
    ae = build_vae(dict(AE_CONFIG, **TINY_AE))
    ae.load_state_dict(_random_state(ae, seed, "ae"), strict=True, assign=True)
    for module in (transformer, gemma, ae):
        module.eval()
    return LuminaParts(transformer, gemma, tokenizer, ae, {}), spiece


def build_tiny_lumina(out_dir: str, *, seed: int = 0, layout: str = "both", layers: int = 2) -> dict:
    """Write the tiny model under `out_dir`; returns {'transformer', 'gemma2', 'ae', 'diffusers_dir'} paths (None
    for a layout not asked for). `layers`: main transformer blocks (block-swap tests want more than 2)."""
    from ..flux.weights import save_ae
    from .weights import save_diffusers_folder, save_gemma2, save_transformer, write_tokenizer_folder

    which = layout
    if which not in ("single", "diffusers", "both"):
        raise ValueError(f"layout must be single, diffusers or both, not {which!r}")
    parts, spiece = build_tiny_parts(seed, layers)
    os.makedirs(out_dir, exist_ok=True)
    paths: dict = {"transformer": None, "gemma2": None, "ae": None, "diffusers_dir": None}
    if which in ("single", "both"):
        meta = {"modelspec.title": "lumina-tiny", "modelspec.resolution": "64x64"}
        paths["transformer"] = save_transformer(parts.transformer, os.path.join(out_dir, "lumina-tiny.safetensors"),
                                                metadata=meta)
        paths["gemma2"] = save_gemma2(parts.gemma2, os.path.join(out_dir, "gemma2.safetensors"),
                                      tokenizer_model=spiece)
        paths["ae"] = save_ae(parts.ae, os.path.join(out_dir, "ae.safetensors"))
    if which in ("diffusers", "both"):
        folder = save_diffusers_folder(parts, os.path.join(out_dir, "diffusers"))
        write_tokenizer_folder(os.path.join(folder, "tokenizer"), spiece)
        with open(os.path.join(folder, "tokenizer", "TEST_TOKENIZER.txt"), "w", encoding="utf-8") as f:
            f.write("A test tokenizer for the tiny random-weight model (sd_scripts.families.lumina.tiny), trained with "
                    "sentencepiece on generated captions; not Gemma's tokenizer.\n")
        paths["diffusers_dir"] = folder
    return paths


def build_tiny_model(out_dir: str, *, family: str = "lumina", v_prediction: bool = False, layout: str = "both",
                     seed: int = 0):  # noqa: A002 - the registry's keyword names
    """The registry's tiny-model builder (sd_scripts.tools.tiny_model): `single_file` = the denoiser file; its part
    files lie next to it (`gemma2.safetensors` for --gemma2, `ae.safetensors` for --ae)."""
    from ...tools.tiny_model import TinyModelPaths

    if v_prediction:
        raise ValueError("Lumina 2 models have no v-prediction variant")
    paths = build_tiny_lumina(out_dir, seed=seed, layout=layout)
    return TinyModelPaths(paths["transformer"], paths["diffusers_dir"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.families.lumina.tiny",
                                     description="Write a tiny random-weight Lumina Image 2.0 model.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layout", choices=("single", "diffusers", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for label, path in build_tiny_lumina(args.out, seed=args.seed, layout=args.layout).items():
        if path:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
