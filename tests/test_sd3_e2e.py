"""End to end on the tiny SD3 models: real `accelerate launch -m sd_scripts.sd3_train_network` (LoRA, with sample
images) and `-m sd_scripts.sd3_train` (full fine-tune), the outputs read back by diffusers and by our loader."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import accelerate_cmd
from test_train_network_e2e import run_trainer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    from sd_scripts.families.sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("sd3e2e")), variant="sd3_medium", layout="both")


def _read(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    from sd_scripts.models.t5 import load_t5_tokenizer

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, tokenizer_3=load_t5_tokenizer(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> torch.Tensor:
    out = pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=3.0, height=64, width=64,
               max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images[0]


def test_sd3_lora_run_loads_in_diffusers(tmp_path, tiny3, demo_data):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog on grass --w 64 --h 64 --s 2 --d 7\n")
    out = tmp_path / "out"
    events = tmp_path / "events.jsonl"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny3.single_file, "--clip_l", tiny3.clip_l, "--clip_g", tiny3.clip_g,
        "--t5xxl", tiny3.t5xxl, "--train_data_dir", demo_data, "--caption_extension", ".txt",
        "--output_dir", str(out), "--output_name", "sd3lora", "--resolution", "64", "--enable_bucket",
        "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--network_dim", "4", "--network_alpha", "2",
        "--learning_rate", "5e-3", "--max_train_steps", "4", "--cache_latents", "--t5xxl_max_token_length", "16",
        "--weighting_scheme", "logit_normal", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4",
        "--seed", "3", "--events_file", str(events), "--enable_scaled_pos_embed",
        module="sd_scripts.sd3_train_network"))

    tensors, meta = _read(out / "sd3lora.safetensors")
    assert meta["ss_base_model_version"] == "medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["ss_weighting_scheme"] == "logit_normal" and meta["ss_t5xxl_max_token_length"] == "16"
    names = {k.split(".", 1)[0] for k in tensors}
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert not any(n.startswith("lora_te3_") for n in names), "T5 is not trained by default (sd-scripts)"
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert tensors[qkv + ".lora_up.weight"].shape == (3 * 128, 4), "q/k/v saved as one fused module"
    assert tensors[qkv + ".lora_down.weight"].shape == (4, 128)
    assert len(list((out / "sample").glob("sd3lora_*.png"))) == 1

    from sd_scripts.families.sd3.lora_files import to_diffusers_lora

    pipe = _pipeline(tiny3.diffusers_dir)
    before = _image(pipe)
    converted = to_diffusers_lora(tensors, transformer_config=pipe.transformer.config, clip_l=pipe.text_encoder,
                                  clip_g=pipe.text_encoder_2)
    pipe.load_lora_weights(converted, adapter_name="ours")
    from peft.utils import get_peft_model_state_dict

    loaded = sum(len(get_peft_model_state_dict(m, adapter_name="ours")) for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
                 if getattr(m, "peft_config", None))
    assert loaded == len(converted), "every LoRA tensor found its layer"
    after = _image(pipe)
    assert (after - before).abs().max() > 1e-4, "the LoRA changes the image"


def test_sd3_fine_tune_saves_an_sai_single_file(tmp_path, tiny3):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    meta_json = {}
    for i, (colour, name) in enumerate((((220, 40, 40), "red"), ((40, 70, 220), "blue"))):
        Image.new("RGB", (64, 64), colour).save(images / f"{i:02d}.png")
        meta_json[f"{i:02d}"] = {"caption": f"a {name} square"}
    (tmp_path / "meta.json").write_text(json.dumps(meta_json))
    out = tmp_path / "out"
    run_trainer(accelerate_cmd(
        "--pretrained_model_name_or_path", tiny3.single_file_with_text_encoders, "--in_json",
        str(tmp_path / "meta.json"), "--train_data_dir", str(images), "--output_dir", str(out), "--output_name",
        "ft", "--resolution", "64", "--learning_rate", "1e-3", "--max_train_steps", "2", "--cache_latents",
        "--t5xxl_max_token_length", "16", "--training_shift", "3.0", "--save_precision", "fp16", "--seed", "1",
        "--train_text_encoder", "--learning_rate_te2", "0", module="sd_scripts.sd3_train"))

    final = out / "ft.safetensors"
    tensors, meta = _read(final)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium"
    assert meta["ss_base_model_version"] == "medium" and meta["ss_training_shift"] == "3.0"
    assert any(k.startswith("first_stage_model.") for k in tensors)
    # train_text_encoder: CLIP-L trained and written beside the file; CLIP-G (learning_rate_te2 0) and T5-XXL
    # (no train_t5xxl) frozen, so not written again
    assert not os.path.exists(out / "ft_clip_g.safetensors") and not os.path.exists(out / "ft_t5xxl.safetensors")
    clip_l, _ = _read(out / "ft_clip_l.safetensors")
    clip_l_base, _ = _read(os.path.join(os.path.dirname(tiny3.single_file), "clip_l.safetensors"))
    assert clip_l.keys() == clip_l_base.keys()
    assert any(not torch.equal(clip_l[k].float(), clip_l_base[k].float()) for k in clip_l if "layers.0." in k)
    key = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    base, _ = _read(tiny3.single_file)
    assert tensors[key].dtype == torch.float16 and not torch.equal(tensors[key].float(), base[key].float())

    from diffusers import SD3Transformer2DModel

    from sd_scripts.families.sd3.weights import load_transformer

    ref = SD3Transformer2DModel.from_single_file(str(final), config=tiny3.diffusers_dir, subfolder="transformer",
                                                 local_files_only=True, torch_dtype=torch.float32)
    ours = load_transformer(str(final))
    for name, value in ours.state_dict().items():
        assert torch.equal(value, ref.state_dict()[name]), name
    trained = SD3Transformer2DModel.from_pretrained(tiny3.diffusers_dir, subfolder="transformer",
                                                    local_files_only=True)
    assert not torch.equal(ours.state_dict()["transformer_blocks.0.attn.to_q.weight"],
                           trained.state_dict()["transformer_blocks.0.attn.to_q.weight"])
