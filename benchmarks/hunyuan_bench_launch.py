#!/usr/bin/env python3
"""Launch shim for benchmarks/hunyuan_image_lora_step.py: runs one HunyuanImage-2.1 LoRA trainer UNCHANGED in this
process and records its peak memory at exit (flux_bench_launch.install_memory_report, env FLUX_BENCH_MEM_OUT).

    python hunyuan_bench_launch.py ours  CHECKOUT   [trainer args...]   # -m sd_scripts.hunyuan_image_train_network
    python hunyuan_bench_launch.py peer  SD_SCRIPTS [trainer args...]   # sd-scripts' hunyuan_image_train_network.py

Peer only: run-time adjustments, sd-scripts' files are not modified.
1. The torchvision import guard (flux_bench_launch.import_torchvision_guarded).
2. Tokenizers: sd-scripts reads Qwen2.5-VL's and ByT5's from the Hub by id (`hunyuan_image_text_encoder.
   QWEN_2_5_VL_IMAGE_ID`, `BYT5_TOKENIZER_PATH`); offline, those module names point at the benchmark's local
   tokenizer folders (the same vocabularies).
3. Sizes: sd-scripts builds Qwen2.5-VL, byT5 and the DiT at the released sizes. The benchmark's Qwen2.5-VL keeps the
   real output width (3584) and vocabulary but has 2 layers and a 1-block vision tower; its byT5 keeps the real
   width (1472) but has 1 layer; the DiT has the real block width (3584 = 28 x 128) but 1 double + 1 single block.
   The names `Qwen2_5_VLConfig` / `T5Config` those loaders call are wrapped so that the sizes come from the files'
   shapes, and `hunyuan_image_models.create_model` keeps only as many blocks as the DiT file has; every load is
   still strict (sd-scripts' own `load_state_dict(strict=True)`).
4. sd-scripts 48d368f's in-memory text-encoder cache keeps `ocr_mask` as a numpy bool scalar, which its own collate
   (`torch.FloatTensor(x)`) rejects with "TypeError: new(): data must be a sequence (got numpy.bool)" at the first
   batch (with --cache_text_encoder_outputs). The shim stores it as a 1-element float array instead; the training
   step never reads it.
"""
from __future__ import annotations

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_bench_launch import _arg, import_torchvision_guarded, install_memory_report, safetensors_shapes  # noqa: E402


def _count(shapes: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def patch_peer(rest: list[str]) -> None:
    import library.hunyuan_image_models as hm
    import library.hunyuan_image_text_encoder as te

    tokenizers = _arg(rest, "--tokenizer_cache_dir")
    te.QWEN_2_5_VL_IMAGE_ID = os.path.join(tokenizers, "qwen")
    te.BYT5_TOKENIZER_PATH = os.path.join(tokenizers, "byt5")

    q = safetensors_shapes(_arg(rest, "--text_encoder"))
    text = dict(num_hidden_layers=_count(q, "model.layers."),
                intermediate_size=q["model.layers.0.mlp.gate_proj.weight"][0],
                vocab_size=q["model.embed_tokens.weight"][0])
    vision = dict(depth=_count(q, "visual.blocks."), hidden_size=q["visual.blocks.0.norm1.weight"][0],
                  intermediate_size=q["visual.blocks.0.mlp.gate_proj.weight"][0], num_heads=2,
                  fullatt_block_indexes=[0])
    orig_qwen = te.Qwen2_5_VLConfig

    def Qwen2_5_VLConfig(**config):  # noqa: N802 - stands in for the class name the loader calls
        config = dict(config, **text)
        config["text_config"] = dict(config.get("text_config") or {}, **text)
        config["vision_config"] = dict(config.get("vision_config") or {}, **vision)
        return orig_qwen(**config)

    te.Qwen2_5_VLConfig = Qwen2_5_VLConfig
    b = safetensors_shapes(_arg(rest, "--byt5"))
    byt5 = dict(num_layers=_count(b, "encoder.block."), d_ff=b["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0])
    orig_t5 = te.T5Config

    def T5Config(**config):  # noqa: N802
        return orig_t5(**dict(config, **byt5))

    te.T5Config = T5Config
    d = safetensors_shapes(_arg(rest, "--pretrained_model_name_or_path"))
    double, single = _count(d, "double_blocks."), _count(d, "single_blocks.")
    orig_create = hm.create_model

    def create_model(*args, **kwargs):
        import torch.nn as nn

        model = orig_create(*args, **kwargs)
        model.double_blocks = nn.ModuleList(list(model.double_blocks)[:double])
        model.single_blocks = nn.ModuleList(list(model.single_blocks)[:single])
        model.num_double_blocks, model.num_single_blocks = double, single
        return model

    hm.create_model = create_model

    import numpy as np
    import library.strategy_hunyuan_image as sh

    cls = sh.HunyuanImageTextEncoderOutputsCachingStrategy
    orig_cache = cls.cache_batch_outputs

    def cache_batch_outputs(self, tokenize_strategy, models, text_encoding_strategy, infos):
        orig_cache(self, tokenize_strategy, models, text_encoding_strategy, infos)
        for info in infos:  # ocr_mask: a numpy bool scalar, which sd-scripts' own collate cannot convert
            outputs = getattr(info, "text_encoder_outputs", None)
            if outputs is not None:
                info.text_encoder_outputs = (*outputs[:4], np.atleast_1d(outputs[4]).astype(np.float32))

    cls.cache_batch_outputs = cache_batch_outputs
    print(f"[hunyuan_bench_launch] sd-scripts sizes from the files: qwen {text} vision {vision}, byt5 {byt5}, "
          f"DiT {double} double + {single} single blocks", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("ours", "peer"):
        raise SystemExit(__doc__)
    trainer, root, rest = argv[0], os.path.abspath(argv[1]), argv[2:]
    install_memory_report()
    sys.path.insert(0, root)
    if trainer == "ours":
        sys.argv = ["sd_scripts.hunyuan_image_train_network"] + rest
        runpy.run_module("sd_scripts.hunyuan_image_train_network", run_name="__main__", alter_sys=True)
        return
    os.chdir(root)
    import_torchvision_guarded()
    patch_peer(rest)
    script = os.path.join(root, "hunyuan_image_train_network.py")
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
