"""End to end on a tiny SDXL: real `accelerate launch -m sd_scripts.train_network` runs, checked from the outside."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import REPO, accelerate_cmd, subprocess_env
from sd_scripts.training.events import read_events

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_root):
    from sd_scripts.tools.tiny_model import build_tiny_model

    return build_tiny_model(str(tiny_root / "sdxl"), family="sdxl", layout="both", seed=0)


def run(args, timeout=300, expect_ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(accelerate_cmd(*args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def lora_file(path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_sdxl):
    """A LoRA run from the single file: both text encoders, samples, latents cached to disk, 32-px bucket steps."""
    from sd_scripts.tools.tiny_model import make_demo_dataset

    root = tmp_path_factory.mktemp("sdxl_run")
    data = make_demo_dataset(str(root / "data"), seed=0)
    prompts = root / "prompts.txt"
    prompts.write_text("sks dog --w 64 --h 64 --s 2 --d 7\n")
    out, events = root / "out", root / "events.jsonl"
    run(["--pretrained_model_name_or_path", tiny_sdxl.single_file, "--train_data_dir", data,
         "--output_dir", str(out), "--output_name", "xl", "--resolution", "96", "--enable_bucket",
         "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
         "--caption_extension", ".txt", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "2e-2",
         "--max_train_steps", "4", "--cache_latents", "--cache_latents_to_disk", "--sample_prompts", str(prompts),
         "--sample_every_n_steps", "4", "--save_every_n_steps", "2", "--seed", "1", "--events_file", str(events)])
    return {"data": data, "out": out, "events": events, "file": out / "xl.safetensors"}


def test_sdxl_lora_file_events_and_caches(sdxl_run):
    tensors, meta = lora_file(sdxl_run["file"])
    names = {k.split(".")[0] for k in tensors}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in names  # SAI names of this layout
    assert any(n.startswith("lora_unet_middle_block_1_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_0_1_") for n in names)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.startswith("lora_te2") and "lora_up" in k)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"

    events = read_events(str(sdxl_run["events"]))
    types = [e["type"] for e in events]
    assert types[0] == "start" and events[0]["model_family"] == "sdxl"
    assert {"progress", "sample", "save"} <= set(types) and types[-1] == "done"
    assert events[-1]["status"] == "completed"
    assert {e["kind"] for e in events if e["type"] == "save"} == {"step", "final"}
    assert (sdxl_run["out"] / "xl-step00000002.safetensors").exists()
    assert len(list((sdxl_run["out"] / "sample").glob("xl_*.png"))) == 1

    folder = next(p for p in (sdxl_run["out"].parent / "data" / "train").iterdir() if p.name.startswith("10_"))
    cache = folder / "00_0064x0064_sdxl.npz"  # a 64x64 image in the 96x96 bucket (a 32-px step)
    assert cache.exists() and not list(folder.glob("*_sd.npz"))
    with np.load(cache) as npz:
        assert npz["latents"].shape == (4, 12, 12)


def test_diffusers_loads_the_sdxl_lora_and_our_merge_matches(sdxl_run, tiny_sdxl):
    """diffusers' own loader changes the U-Net and both text encoders; our merge gives the same outputs."""
    from diffusers import StableDiffusionXLPipeline

    from sd_scripts.models.loading import load_model
    from sd_scripts.networks.lora import create_network_from_weights

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl.diffusers_dir, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs(unet, te1, te2):
        with torch.no_grad():
            return (unet(latents, 500, hidden, added_cond_kwargs=added).sample,
                    te1(ids, output_hidden_states=True).hidden_states[-2],
                    te2(ids, output_hidden_states=True).hidden_states[-2])

    before = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    pipe.load_lora_weights(str(sdxl_run["file"]))
    theirs = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for b, t in zip(before, theirs):
        assert not torch.allclose(b, t, atol=1e-5)

    bundle = load_model(tiny_sdxl.diffusers_dir)
    net = create_network_from_weights(str(sdxl_run["file"]), unet=bundle.unet, text_encoders=bundle.text_encoders,
                                      family="sdxl")
    assert len(net.unet_loras) > 0 and len(net.text_encoder_loras) > 0
    net.merge_into_base()
    ours = outputs(bundle.unet, bundle.text_encoder, bundle.text_encoder_2)
    for o, t in zip(ours, theirs):
        assert torch.allclose(o, t, atol=1e-4, rtol=1e-4), (o - t).abs().max()


def test_cached_text_encoder_outputs_with_unet_only(tmp_path, tiny_sdxl, demo_data):
    out, events = tmp_path / "out", tmp_path / "events.jsonl"
    run(["--pretrained_model_name_or_path", tiny_sdxl.diffusers_dir, "--train_data_dir", demo_data,
         "--output_dir", str(out), "--output_name", "u", "--resolution", "64", "--caption_extension", ".txt",
         "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "3", "--network_train_unet_only",
         "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--cache_latents",
         "--max_token_length", "150", "--events_file", str(events)])
    tensors, meta = lora_file(out / "u.safetensors")
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_cache_text_encoder_outputs_to_disk"] == "True"
    assert read_events(str(events))[-1]["status"] == "completed"
    files = sorted(p for p in (tmp_path.parent).rglob("*_te_outputs.npz") if "demo_data" in str(p))
    assert files
    with np.load(files[0]) as npz:
        assert npz["hidden_state1"].shape[0] == 152 and npz["pool2"].ndim == 1 and str(npz["caption"])


@pytest.mark.parametrize("extra,names", [
    (["--network_train_unet_only", "--shuffle_caption"], ["shuffle_caption", "turn shuffle_caption off"]),
    (["--caption_dropout_rate", "0.1", "--network_train_unet_only"], ["caption_dropout_rate"]),
    ([], ["frozen text encoders", "network_train_unet_only"]),  # the LoRA would train both text encoders
])
def test_cached_text_encoder_outputs_refusals(capsys, tmp_path, tiny_sdxl, demo_data, extra, names):
    from sd_scripts.train_network import main

    events = tmp_path / "events.jsonl"
    rc = main(["--pretrained_model_name_or_path", tiny_sdxl.single_file, "--train_data_dir", demo_data,
               "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--caption_extension", ".txt",
               "--cache_text_encoder_outputs", "--max_train_steps", "2", "--events_file", str(events), *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "cache_text_encoder_outputs" in lines[0] and all(n in lines[0] for n in names), lines[0]
    error = [e for e in read_events(str(events)) if e["type"] == "error"]
    assert error and names[0] in error[0]["message"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors"))
