"""SDXL models: detection, exact single-file round trip, agreement with diffusers' own SDXL loader and converters,
both layouts computing the same, and the bundled SDXL base 1.0 configs at their real sizes (meta device)."""
import json
import os

import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import save_file

from sd_scripts.errors import ModelLoadError
from sd_scripts.families.sd.arch import bundled_config
from sd_scripts.models.checkpoint import open_checkpoint
from sd_scripts.families import probe_model
from sd_scripts.families.sd.detect import detect_diffusers_family
from sd_scripts.families.sd.keymaps import model_keymaps
from sd_scripts.models.keymaps import SPLIT
from sd_scripts.families.sd.loading import (build_text_encoder, build_text_encoder_2, build_unet, build_vae,
                                       detect_family, diffusers_config_dir, load_model, save_diffusers,
                                       save_single_file)
from sd_scripts.tools.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_sdxl")), "sdxl")


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _modules(bundle):
    return (bundle.unet, bundle.vae, bundle.text_encoder, bundle.text_encoder_2)


def test_detection_file_and_folder(tiny):
    shapes = open_checkpoint(tiny.single_file).shapes
    assert detect_family(shapes) == "sdxl"
    unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    assert detect_family(unet_only) == "sdxl"  # from label_emb alone
    assert probe_model(tiny.single_file).family == probe_model(tiny.diffusers_dir).family == "sdxl"
    with open(os.path.join(tiny.diffusers_dir, "unet", "config.json")) as f:
        unet_cfg = json.load(f)
    assert unet_cfg["addition_embed_type"] == "text_time"
    plain = {k: v for k, v in unet_cfg.items() if k != "addition_embed_type"}
    assert detect_diffusers_family(plain, {}, has_text_encoder_2=True) == "sdxl"
    assert detect_diffusers_family(unet_cfg, {}) == "sdxl"


@pytest.mark.parametrize("layout", ["single_file", "diffusers_dir"])
def test_bundle_contract(tiny, layout):
    bundle = load_model(getattr(tiny, layout))
    assert (bundle.family, bundle.v_prediction) == ("sdxl", False)
    assert bundle.text_encoders == [bundle.text_encoder, bundle.text_encoder_2]
    assert bundle.tokenizers == [bundle.tokenizer, bundle.tokenizer_2]
    assert type(bundle.text_encoder).__name__ == "CLIPTextModel"
    assert type(bundle.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert bundle.tokenizer.pad_token_id == 49407 and bundle.tokenizer_2.pad_token_id == 0
    assert bundle.tokenizer_2("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert bundle.vae_scaling_factor == 0.13025
    sched = bundle.scheduler_config
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"],
            sched["prediction_type"]) == ("scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    unet = bundle.unet.config
    assert unet.addition_embed_type == "text_time" and list(unet.transformer_layers_per_block) == [1, 2]
    assert unet.cross_attention_dim == (bundle.text_encoder.config.hidden_size
                                        + bundle.text_encoder_2.config.hidden_size)
    assert unet.projection_class_embeddings_input_dim == (6 * unet.addition_time_embed_dim
                                                          + bundle.text_encoder_2.config.projection_dim)


def test_sd_bundles_have_one_text_encoder(tiny_sd1):
    bundle = load_model(tiny_sd1.single_file)
    assert bundle.text_encoder_2 is None and bundle.tokenizer_2 is None
    assert bundle.text_encoders == [bundle.text_encoder] and bundle.tokenizers == [bundle.tokenizer]


def test_single_file_round_trip_is_bitwise(tiny, tmp_path):
    bundle = load_model(tiny.single_file)
    assert set(bundle.extra_state) == {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                                       "conditioner.embedders.1.model.logit_scale"}
    out = save_single_file(bundle, str(tmp_path / "saved.safetensors"), metadata=bundle.metadata)
    with open(tiny.single_file, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
    again = load_model(out)
    for a, b in zip(_modules(bundle), _modules(again)):
        _same_state(a, b)
    assert again.vae_id == bundle.vae_id


def test_diffusers_from_single_file_matches(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    bundle = load_model(tiny.single_file)
    saved = save_single_file(bundle, str(tmp_path / "saved.safetensors"))
    config = diffusers_config_dir("sdxl", False, bundle=bundle)
    pipe = StableDiffusionXLPipeline.from_single_file(saved, config=config, local_files_only=True)
    for theirs, ours in zip((pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2), _modules(bundle)):
        _same_state(theirs, ours)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.vae.config.scaling_factor == 0.13025


def test_single_file_and_diffusers_folder_compute_the_same(tiny):
    a, b = load_model(tiny.single_file), load_model(tiny.diffusers_dir)
    gen = torch.Generator().manual_seed(0)
    captions = ["a photo of sks dog", "x"]
    with torch.no_grad():
        states, pooled = [], None
        for model_a, model_b, tok in zip(a.text_encoders, b.text_encoders, a.tokenizers):
            ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
            out_a = model_a(ids, output_hidden_states=True)
            out_b = model_b(ids, output_hidden_states=True)
            assert torch.equal(out_a.hidden_states[-2], out_b.hidden_states[-2])
            states.append(out_a.hidden_states[-2])
        assert torch.equal(out_a.text_embeds, out_b.text_embeds)
        pooled = out_a.text_embeds
        cond = torch.cat(states, dim=-1)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        latents, t = torch.randn(2, 4, 8, 12, generator=gen), torch.tensor([10, 900])
        assert torch.equal(a.unet(latents, t, cond, added_cond_kwargs=added).sample,
                           b.unet(latents, t, cond, added_cond_kwargs=added).sample)


def test_save_diffusers_round_trip(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    a = load_model(tiny.single_file)
    out = save_diffusers(a, str(tmp_path / "pipe"))
    b = load_model(out)
    for x, y in zip(_modules(a), _modules(b)):
        _same_state(x, y)
    assert StableDiffusionXLPipeline.load_config(out)["text_encoder_2"] == ["transformers",
                                                                           "CLIPTextModelWithProjection"]
    back = save_single_file(b, str(tmp_path / "back.safetensors"))  # folder -> file keeps every weight
    for x, y in zip(_modules(a), _modules(load_model(back))):
        _same_state(x, y)


def test_v_prediction_marker(tiny, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(tiny.single_file)
    tensors["v_pred"] = torch.tensor([])
    path = str(tmp_path / "vpred.safetensors")
    save_file(tensors, path, metadata=open_checkpoint(tiny.single_file).metadata)
    bundle = load_model(path)
    assert bundle.v_prediction and bundle.scheduler_config["prediction_type"] == "v_prediction"
    assert "v_pred" in bundle.extra_state  # written back on save


def test_errors(tiny, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(tiny.single_file)
    no_te2 = tmp_path / "no_te2.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}, str(no_te2))
    with pytest.raises(ModelLoadError, match="incomplete SDXL") as e:
        load_model(str(no_te2))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="--v2"):
        load_model(tiny.single_file, v2=True)


# ---------------------------------------------------------------- the real SDXL base 1.0 architecture


@pytest.fixture(scope="module")
def real_sdxl():
    builders = ((build_unet, "unet"), (build_vae, "vae"), (build_text_encoder, "text_encoder"),
                (build_text_encoder_2, "text_encoder_2"))
    return tuple(build(bundled_config("sdxl", False, c)) for build, c in builders)


def test_bundled_configs_build_with_real_parameter_counts(real_sdxl):
    counts = [sum(p.numel() for p in m.parameters()) for m in real_sdxl]
    assert 2_560_000_000 < counts[0] < 2_575_000_000  # U-Net 2.567B
    assert 83_000_000 < counts[1] < 84_000_000
    assert 122_000_000 < counts[2] < 124_000_000  # CLIP-L 123.1M
    assert 690_000_000 < counts[3] < 700_000_000  # OpenCLIP-bigG 694.7M
    assert all(p.is_meta for m in real_sdxl for p in m.parameters())
    folder = diffusers_config_dir("sdxl", False)
    with open(os.path.join(folder, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionXLPipeline"
    with open(os.path.join(folder, "tokenizer_2", "special_tokens_map.json")) as f:
        assert json.load(f)["pad_token"] == "!"


def _tagged(keymap):
    """One distinct value per single-file key (fused q/k/v get one per third), so a converter's renaming can be
    followed by value."""
    out = {}
    for i, rule in enumerate(keymap.rules):
        n = len(rule.diffusers) if rule.kind == SPLIT else 1
        out[rule.ldm] = torch.arange(n, dtype=torch.float32) + 10 * i
    return out


def test_key_maps_agree_with_diffusers_converters(real_sdxl):
    unet, vae, te1, te2 = real_sdxl
    unet_map, vae_map, te1_map, te2_map = model_keymaps("sdxl", *real_sdxl)
    assert len(unet_map.ldm_keys) == 1680 and len(te2_map.ldm_keys) == 32 * 12 + 5
    keys = set(unet_map.ldm_keys)
    assert {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
            "model.diffusion_model.output_blocks.5.2.conv.weight"} <= keys
    for keymap, convert, config in ((unet_map, convert_ldm_unet_checkpoint, dict(unet.config)),
                                    (vae_map, convert_ldm_vae_checkpoint, dict(vae.config))):
        tagged = _tagged(keymap)
        theirs = convert(dict(tagged), config)
        ours = keymap.to_diffusers(tagged.__getitem__)
        assert set(theirs) == set(ours)
        assert all(torch.equal(theirs[k].reshape(-1), ours[k].reshape(-1)) for k in ours)
    tagged = _tagged(te1_map)
    theirs = convert_ldm_clip_checkpoint(dict(tagged))
    ours = te1_map.to_diffusers(tagged.__getitem__)
    assert {k.removeprefix("text_model.") for k in theirs} == set(ours)
    assert all(torch.equal(theirs[k], ours[k.removeprefix("text_model.")]) for k in theirs)
    # bigG: fused in_proj split into q/k/v at the width, text_projection transposed
    tagged = {k: _openclip_tag(k, i, te2.config.hidden_size) for i, k in enumerate(te2_map.ldm_keys)}
    theirs = convert_open_clip_checkpoint(te2, dict(tagged), prefix="conditioner.embedders.1.model.")
    ours = te2_map.to_diffusers(tagged.__getitem__)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def _openclip_tag(key, i, width):
    """A small tensor of distinct values with just the shape a converter indexes: fused in_proj [3w, 1] / [3w],
    text_projection [w, 2], anything else one value."""
    values = torch.arange(3 * width, dtype=torch.float32) + 1e5 * i
    if key.endswith("in_proj_weight"):
        return values.reshape(3 * width, 1)
    if key.endswith("in_proj_bias"):
        return values
    if key.endswith("text_projection"):
        return values[: 2 * width].reshape(width, 2)
    return torch.tensor([float(i)])
