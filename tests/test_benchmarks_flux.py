"""benchmarks/flux_lora_step.py: its workload builder at a tiny size (not the timing), so a change that breaks the
benchmark's model files, its sd-scripts launch shim's size reading or its command line shows up here."""
from __future__ import annotations

import importlib.util
import os
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.timeout(120)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("flux_lora_step")


@pytest.fixture(scope="module")
def workload(bench, tmp_path_factory):
    spec = bench.workload_spec(1, 2, 64, 2, 0, "fp32", bench.TEST_SIZES)
    root = tmp_path_factory.mktemp("flux_bench")
    return spec, str(root), bench.build_workload(str(root), spec, log=lambda m: None)


def test_real_config_is_flux_dev_width_with_fewer_blocks(bench):
    from sd_scripts.families.flux import layout

    cfg = bench.transformer_config(1, 2)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 3072 and cfg["attention_head_dim"] == 128
    assert cfg["axes_dims_rope"] == [16, 56, 56] and cfg["joint_attention_dim"] == 4096
    assert cfg["pooled_projection_dim"] == 768 and cfg["in_channels"] == 64 and cfg["guidance_embeds"]
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (1, 2)
    assert {k: v for k, v in cfg.items() if k not in ("num_layers", "num_single_layers", "_class_name")} == \
        {k: v for k, v in layout.FLUX_DEV_CONFIG.items() if k not in ("num_layers", "num_single_layers")}


def test_workload_files_load_with_our_loaders(bench, workload):
    from sd_scripts.families.flux import layout
    from sd_scripts.families.flux.weights import load_single_files
    from sd_scripts.models.checkpoint import open_checkpoint

    spec, _, paths = workload
    shapes = open_checkpoint(paths["transformer"]).shapes
    assert layout.classify_denoiser(shapes) == "flux_dev" and "double_blocks.0.img_attn.qkv.weight" in shapes
    cfg = layout.infer_transformer_config(shapes)
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["attention_head_dim"]) == (1, 2, 128)
    assert cfg["axes_dims_rope"] == [16, 56, 56] and cfg["joint_attention_dim"] == spec["context_dim"]
    parts = load_single_files(paths["transformer"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"], ae=paths["ae"])
    assert parts.t5.config.d_model == spec["context_dim"] and parts.clip_l.config.hidden_size == spec["vec_dim"]
    assert parts.ae.config.latent_channels == 16
    assert sum(p.numel() for p in parts.transformer.parameters()) == paths["params"]
    images = os.listdir(os.path.join(paths["train_data_dir"], "10_sks dog"))
    assert sorted(images) == ["img00.png", "img00.txt", "img01.png", "img01.txt"]
    for sub in ("openai_clip-vit-large-patch14", "google_t5-v1_1-xxl"):
        assert os.listdir(os.path.join(paths["tokenizers"], sub))


def test_workload_is_reused(bench, workload):
    spec, root, paths = workload
    mtime = os.path.getmtime(paths["transformer"])
    t0 = time.time()
    again = bench.build_workload(root, spec, log=lambda m: None)
    assert again == paths and os.path.getmtime(paths["transformer"]) == mtime and time.time() - t0 < 5


def test_launch_shim_reads_the_encoder_sizes_sd_scripts_needs(bench, workload):
    """The shim (stdlib only) reads the sizes sd-scripts' fixed CLIP-L / T5 configs must take from the files."""
    from sd_scripts.families.flux.weights import load_clip_l, load_t5xxl

    launch = _load("flux_bench_launch")
    _, _, paths = workload
    clip = launch.clip_sizes(launch.safetensors_shapes(paths["clip_l"]))
    t5 = launch.t5_sizes(launch.safetensors_shapes(paths["t5xxl"]))
    c, t = load_clip_l(paths["clip_l"]).config, load_t5xxl(paths["t5xxl"]).config
    assert clip == dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads)
    assert t5 == dict(d_model=t.d_model, num_heads=t.num_heads, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers)
    assert launch._arg(["--a", "1", "--t5xxl=x"], "--t5xxl") == "x" and launch._arg(["--a", "1"], "--a") == "1"


def test_command_line_is_the_same_for_both_trainers_and_names_each_variant(bench, workload):
    _, _, paths = workload
    kw = dict(resolution=64, steps=3, rank=16, t5_tokens=32, precision="no", swap=2, extra=[])
    base = bench.trainer_args(paths, "/o", variant="base", **kw)
    assert "--cache_text_encoder_outputs" in base and "--cache_latents" in base
    assert base[base.index("--network_dim") + 1] == "16" and base[base.index("--mixed_precision") + 1] == "no"
    swap = bench.trainer_args(paths, "/o", variant="swap", **kw)
    assert swap[-2:] == ["--blocks_to_swap", "2"]
    fp8 = bench.trainer_args(paths, "/o", variant="fp8", **kw)
    assert fp8[-1] == "--fp8_base" and fp8[fp8.index("--mixed_precision") + 1] == "bf16"
