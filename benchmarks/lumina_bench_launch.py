#!/usr/bin/env python3
"""Launch shim for benchmarks/lumina_lora_step.py: runs one Lumina LoRA trainer UNCHANGED in this process and records
its peak memory when it exits (LUMINA_BENCH_MEM_OUT, as flux_bench_launch.py does with FLUX_BENCH_MEM_OUT).

    python lumina_bench_launch.py ours  CHECKOUT   [trainer args...]   # python -m sd_scripts.lumina_train_network
    python lumina_bench_launch.py peer  SD_SCRIPTS [trainer args...]   # sd-scripts' lumina_train_network.py

Standard library only at import time (it runs in our venv and in the peer's). Peer only, run-time adjustments
(sd-scripts is not modified):
1. the torchvision import guard of flux_bench_launch.py;
2. sizes from the files: sd-scripts builds the NextDiT from the fixed 2B config (26 layers) and Gemma-2 from the
   fixed 2B config (26 layers, vocabulary 256,000), loading with strict=False. The benchmark's denoiser has the real
   width but fewer layers, its Gemma-2 the real output width (2304) but 1 layer, a narrow MLP and the test
   tokenizer's vocabulary; `lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner` and `lumina_util.Gemma2Config` are
   wrapped so that those counts come from the files' safetensors headers (a real-size file gives the real config);
3. after each loader (NextDiT, Gemma-2, AE) no parameter may be left on the meta device.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _flux_shim():
    spec = importlib.util.spec_from_file_location("flux_bench_launch", os.path.join(_HERE, "flux_bench_launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def patch_peer(rest: list[str], shim) -> None:
    from library import lumina_models, lumina_util

    model_path, gemma_path = shim._arg(rest, "--pretrained_model_name_or_path"), shim._arg(rest, "--gemma2")
    if model_path:
        shapes = shim.safetensors_shapes(model_path)
        layers = len({k.split(".")[1] for k in shapes if k.startswith("layers.")})
        orig_model = lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner

        def NextDiT_2B_GQA_patch2_Adaln_Refiner(params=None, **kwargs):  # noqa: N802 - the name sd-scripts calls
            params = params or lumina_models.LuminaParams.get_2b_config()
            params.n_layers = layers
            return orig_model(params, **kwargs)

        lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner = NextDiT_2B_GQA_patch2_Adaln_Refiner
        print(f"[lumina_bench_launch] sd-scripts NextDiT layers from {model_path}: {layers}", flush=True)
    if gemma_path:
        shapes = shim.safetensors_shapes(gemma_path)
        prefix = "model." if "model.embed_tokens.weight" in shapes else ""
        sizes = dict(vocab_size=shapes[prefix + "embed_tokens.weight"][0],
                     num_hidden_layers=len({k.split(".")[len(prefix.split(".")) ] for k in shapes
                                            if k.startswith(prefix + "layers.")}),
                     intermediate_size=shapes[prefix + "layers.0.mlp.gate_proj.weight"][0])
        orig_config = lumina_util.Gemma2Config

        def Gemma2Config(**kwargs):  # noqa: N802
            return orig_config(**dict(kwargs, **sizes))

        lumina_util.Gemma2Config = Gemma2Config
        print(f"[lumina_bench_launch] sd-scripts Gemma-2 sizes from {gemma_path}: {sizes}", flush=True)

    def checked(name: str):
        orig = getattr(lumina_util, name)

        def wrapper(*args, **kwargs):
            result = orig(*args, **kwargs)
            shim._no_meta(name, result)
            return result

        setattr(lumina_util, name, wrapper)

    for name in ("load_lumina_model", "load_gemma2", "load_ae"):
        checked(name)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("ours", "peer"):
        raise SystemExit(__doc__)
    trainer, root, rest = argv[0], os.path.abspath(argv[1]), argv[2:]
    shim = _flux_shim()
    if os.environ.get("LUMINA_BENCH_MEM_OUT"):
        os.environ["FLUX_BENCH_MEM_OUT"] = os.environ["LUMINA_BENCH_MEM_OUT"]
    shim.install_memory_report()
    sys.path.insert(0, root)
    if trainer == "ours":
        sys.argv = ["sd_scripts.lumina_train_network"] + rest
        runpy.run_module("sd_scripts.lumina_train_network", run_name="__main__", alter_sys=True)
        return
    os.chdir(root)
    shim.import_torchvision_guarded()
    patch_peer(rest, shim)
    script = os.path.join(root, "lumina_train_network.py")
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
