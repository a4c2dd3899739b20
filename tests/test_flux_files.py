"""FLUX.1 / Chroma model files: recognising them, loading and saving every part, the tiny models, the T5 tokenizer.

The key table is checked against diffusers' own single-file converter (the independent reference), on tensors with
the real FLUX.1 row counts; the tiny models load through our loaders, through diffusers' from_pretrained, and run
the real diffusers pipelines offline on the CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from sd_scripts.errors import ModelLoadError
from sd_scripts.families.flux import layout, tiny, weights
from sd_scripts.models.checkpoint import open_checkpoint
from sd_scripts.models.safetensors_writer import save_safetensors
from sd_scripts.models.t5 import T5_TOKENIZER_DIR, infer_t5_config, load_t5_encoder, load_t5_tokenizer

CAT_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]


@pytest.fixture(scope="module")
def tiny_dev(tmp_path_factory):
    return tiny.build_tiny_flux(str(tmp_path_factory.mktemp("flux_dev")), model_type="flux_dev", seed=0)


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    return tiny.build_tiny_flux(str(tmp_path_factory.mktemp("flux_schnell")), model_type="flux_schnell",
                                seed=0, layout="single")


@pytest.fixture(scope="module")
def tiny_chroma(tmp_path_factory):
    return tiny.build_tiny_flux(str(tmp_path_factory.mktemp("chroma")), model_type="chroma", seed=0)


def _shapes(path: str) -> dict:
    return open_checkpoint(path).shapes


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tree_hashes(folder: str) -> dict:
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = _sha(full)
    return out


def _real_bfl_shapes(config: dict) -> dict:
    """BFL names and shapes of a real-size denoiser (modules on the meta device: no memory)."""
    model = weights.build_transformer(config)
    return {k: tuple(v.shape) for k, v in weights.diffusers_to_bfl(model.state_dict(), config).items()}


def _inputs(model, batch: int = 1, tokens: int = 4, text: int = 5, seed: int = 0) -> dict:
    """Packed-latent inputs for a transformer (64-channel tokens on a 2x2 grid, text tokens, ids)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // 2
    img_ids[:, 2] = torch.arange(tokens) % 2
    kwargs = dict(hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
                  timestep=torch.full((batch,), 0.7), img_ids=img_ids, txt_ids=torch.zeros(text, 3),
                  return_dict=False)
    if type(model).__name__ == "FluxTransformer2DModel":
        kwargs["pooled_projections"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
        kwargs["guidance"] = torch.full((batch,), 3.5) if cfg.guidance_embeds else None
    return kwargs


# ---------------------------------------------------------------- recognising files (torch-free layout facts)


REAL_DEV_FACTS = {  # shapes of flux1-dev.safetensors tensors (sd-scripts flux_models / diffusers converter facts)
    "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "time_in.in_layer.weight": (3072, 256),
    "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256),
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.img_mod.lin.weight": (18432, 3072),
    "double_blocks.18.txt_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (21504, 3072),
    "single_blocks.37.linear2.weight": (3072, 15360), "single_blocks.0.modulation.lin.weight": (9216, 3072),
    "final_layer.adaLN_modulation.1.weight": (6144, 3072), "final_layer.linear.weight": (64, 3072),
}


def test_real_dev_layout_shapes_and_config():
    shapes = _real_bfl_shapes(dict(layout.FLUX_DEV_CONFIG, _class_name="FluxTransformer2DModel"))
    assert len(shapes) == 780  # the tensor count of flux1-dev.safetensors
    for key, shape in REAL_DEV_FACTS.items():
        assert shapes[key] == shape, key
    assert layout.classify_denoiser(shapes) == "flux_dev"
    cfg = layout.infer_transformer_config(shapes)
    assert cfg.pop("_class_name") == "FluxTransformer2DModel"
    assert cfg == layout.FLUX_DEV_CONFIG
    assert cfg["axes_dims_rope"] == [16, 56, 56] and cfg["num_attention_heads"] == 24
    # ComfyUI's prefix; an all-in-one file also carries text encoders and the autoencoder
    prefixed = {layout.COMFY_PREFIX + k: v for k, v in shapes.items()}
    prefixed["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 768)
    prefixed["vae.decoder.conv_in.weight"] = (512, 16, 3, 3)
    assert layout.classify_denoiser(prefixed) == "flux_dev"
    assert layout.infer_transformer_config(prefixed)["num_single_layers"] == 38
    assert layout.file_kind(prefixed) == "flux"


def test_real_schnell_and_chroma_layouts():
    schnell = _real_bfl_shapes(dict(layout.FLUX_SCHNELL_CONFIG, _class_name="FluxTransformer2DModel"))
    assert not any(k.startswith("guidance_in.") for k in schnell)
    assert layout.classify_denoiser(schnell) == "flux_schnell"
    assert layout.infer_transformer_config(schnell)["guidance_embeds"] is False
    chroma = _real_bfl_shapes(dict(layout.CHROMA_CONFIG, _class_name="ChromaTransformer2DModel"))
    assert "distilled_guidance_layer.in_proj.weight" in chroma and "vector_in.in_layer.weight" not in chroma
    assert not any("_mod." in k or "modulation" in k for k in chroma)
    assert layout.classify_denoiser(chroma) == "chroma"
    assert layout.file_kind(chroma) == "chroma"
    cfg = layout.infer_transformer_config(chroma)
    assert cfg.pop("_class_name") == "ChromaTransformer2DModel"
    assert cfg == layout.CHROMA_CONFIG


def test_file_kinds_of_real_layout_key_sets():
    clip_l = {"text_model.embeddings.token_embedding.weight": (49408, 768),
              "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768), "text_projection.weight": (768, 768)}
    clip_g = {"text_model.embeddings.token_embedding.weight": (49408, 1280),
              "text_model.encoder.layers.0.self_attn.q_proj.weight": (1280, 1280)}
    t5 = {"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
          "encoder.final_layer_norm.weight": (4096,)}
    ae = {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)}
    sd_vae = {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}
    sd = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    sd3 = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}
    diffusers = {"x_embedder.weight": (3072, 64), "transformer_blocks.0.attn.add_k_proj.weight": (3072, 3072)}
    kinds = [layout.file_kind(s) for s in (clip_l, clip_g, t5, ae, sd_vae, sd, sd3, diffusers, {"x": (1,)})]
    assert kinds == ["clip_l", "clip_g", "t5xxl", "ae", "sd_vae", "sd", "sd3", "flux_diffusers", None]
    assert layout.classify_denoiser(t5) is None and layout.classify_denoiser({}) is None


def test_layout_is_torch_free():
    import subprocess
    import sys

    code = ("import sys, sd_scripts.families.flux.layout as l; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_real_ae_and_t5_configs_from_shapes():
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    from sd_scripts.models.keymaps import VAE_PREFIX, vae_keymap
    from sd_scripts.families.sd.loading import build_vae
    from sd_scripts.models.t5 import T5_XXL_CONFIG

    vae = build_vae(layout.AE_CONFIG)
    names = vae.state_dict().keys()
    keymap = vae_keymap(names, 4).with_ldm_prefix(VAE_PREFIX, "")
    shapes = {k: tuple(v.shape) for k, v in keymap.to_ldm(vae.state_dict()).items()}
    assert not any("quant_conv" in k for k in shapes)  # the FLUX autoencoder has none
    assert layout.file_kind(shapes) == "ae"
    assert layout.infer_ae_config(shapes) == layout.AE_CONFIG
    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
    t5_shapes = {k: tuple(v.shape) for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    cfg = infer_t5_config(t5_shapes)
    assert (cfg["d_model"], cfg["num_heads"], cfg["d_kv"], cfg["d_ff"], cfg["num_layers"], cfg["vocab_size"]) == \
        (4096, 64, 64, 10240, 24, 32128)


def test_rope_axes_keep_flux_proportions():
    assert layout.rope_axes(128) == [16, 56, 56]
    assert layout.rope_axes(32) == [4, 14, 14]
    assert layout.rope_axes(16) == [4, 6, 6]
    for head_dim in (8, 16, 24, 64, 96, 128):
        axes = layout.rope_axes(head_dim)
        assert sum(axes) == head_dim and all(a % 2 == 0 and a > 0 for a in axes)


# ---------------------------------------------------------------- the key table vs diffusers' converter


def _synthetic_bfl(config: dict) -> dict:
    """Every BFL tensor of `config` with its real row count and 2 columns, each filled with distinct values."""
    shapes = _real_bfl_shapes(config)
    out, start = {}, 0
    for key in sorted(shapes):
        rows = shapes[key][0]
        n = rows * 2 if len(shapes[key]) > 1 else rows
        out[key] = torch.arange(start, start + n, dtype=torch.float32).reshape(rows, -1).squeeze(-1) \
            if len(shapes[key]) == 1 else torch.arange(start, start + n, dtype=torch.float32).reshape(rows, 2)
        start += n
    return out


@pytest.mark.parametrize("model_type", ["flux_dev", "flux_schnell", "chroma"])
def test_key_table_matches_diffusers_converter(model_type):
    from diffusers.loaders.single_file_utils import (convert_chroma_transformer_checkpoint_to_diffusers,
                                                     convert_flux_transformer_checkpoint_to_diffusers)

    base = {"flux_dev": layout.FLUX_DEV_CONFIG, "flux_schnell": layout.FLUX_SCHNELL_CONFIG,
            "chroma": layout.CHROMA_CONFIG}[model_type]
    # fewer blocks than the real model (the converter counts them); rows keep the real width 3072 that the
    # converter assumes
    cfg = dict(base, num_layers=2, num_single_layers=2,
               _class_name="ChromaTransformer2DModel" if model_type == "chroma" else "FluxTransformer2DModel")
    bfl = _synthetic_bfl(cfg)
    convert = (convert_chroma_transformer_checkpoint_to_diffusers if model_type == "chroma"
               else convert_flux_transformer_checkpoint_to_diffusers)
    reference = convert({layout.COMFY_PREFIX + k: v.clone() for k, v in bfl.items()})
    ours = weights.bfl_to_diffusers(bfl.__getitem__, cfg)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    back = weights.diffusers_to_bfl(ours, cfg)
    assert sorted(back) == sorted(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)


# ---------------------------------------------------------------- tiny models: loading, outputs, round trips


def test_tiny_files_are_what_users_have(tiny_dev):
    assert layout.file_kind(_shapes(tiny_dev.transformer)) == "flux"
    assert layout.classify_denoiser(_shapes(tiny_dev.transformer)) == "flux_dev"
    assert layout.file_kind(_shapes(tiny_dev.clip_l)) == "clip_l"
    assert layout.file_kind(_shapes(tiny_dev.t5xxl)) == "t5xxl"
    assert layout.file_kind(_shapes(tiny_dev.ae)) == "ae"
    assert "text_model.embeddings.token_embedding.weight" in _shapes(tiny_dev.clip_l)
    assert "shared.weight" in _shapes(tiny_dev.t5xxl)
    assert _shapes(tiny_dev.t5xxl)["shared.weight"] == (32128, tiny.TINY_T5["d_model"])
    assert "encoder.down.0.block.0.conv1.weight" in _shapes(tiny_dev.ae)
    cfg = layout.infer_transformer_config(_shapes(tiny_dev.transformer))
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["attention_head_dim"], cfg["axes_dims_rope"]) == \
        (2, 2, 16, [4, 6, 6])
    index = json.load(open(os.path.join(tiny_dev.diffusers_dir, "model_index.json")))
    assert index["_class_name"] == "FluxPipeline"
    for sub in ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_dev.diffusers_dir, sub)), sub


def test_tiny_schnell_and_chroma_variants(tiny_schnell, tiny_chroma):
    assert layout.classify_denoiser(_shapes(tiny_schnell.transformer)) == "flux_schnell"
    assert tiny_schnell.diffusers_dir is None
    assert layout.classify_denoiser(_shapes(tiny_chroma.transformer)) == "chroma"
    assert tiny_chroma.clip_l is None
    model = weights.load_transformer(tiny_schnell.transformer)
    assert model.config.guidance_embeds is False
    chroma = weights.load_transformer(tiny_chroma.transformer, model_type="chroma")
    assert type(chroma).__name__ == "ChromaTransformer2DModel"
    assert chroma.config.approximator_layers == 2


def test_single_file_and_diffusers_folder_give_the_same_outputs(tiny_dev):
    from diffusers import FluxTransformer2DModel

    ours = weights.load_transformer(tiny_dev.transformer)
    theirs = FluxTransformer2DModel.from_pretrained(tiny_dev.diffusers_dir, subfolder="transformer",
                                                    local_files_only=True).eval()
    with torch.no_grad():
        a = ours(**_inputs(ours))[0]
        b = theirs(**_inputs(theirs))[0]
    assert torch.equal(a, b)
    assert a.shape == (1, 4, 64) and torch.isfinite(a).all()


def test_chroma_single_file_and_folder_give_the_same_outputs(tiny_chroma):
    from diffusers import ChromaTransformer2DModel

    ours = weights.load_transformer(tiny_chroma.transformer, model_type="chroma")
    theirs = ChromaTransformer2DModel.from_pretrained(tiny_chroma.diffusers_dir, subfolder="transformer",
                                                      local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(ours(**_inputs(ours))[0], theirs(**_inputs(theirs))[0])


def test_save_load_round_trip_is_bit_exact(tiny_dev, tmp_path):
    model = weights.load_transformer(tiny_dev.transformer)
    meta = {"modelspec.title": "flux1-tiny", "modelspec.resolution": "64x64"}
    again = weights.save_transformer(model, str(tmp_path / "again.safetensors"), metadata=meta)
    assert _sha(again) == _sha(tiny_dev.transformer)  # same tensors, names, order and header
    original = open_checkpoint(tiny_dev.transformer)
    reloaded = weights.load_transformer(again)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # the temp file is gone
    # ComfyUI's prefix loads the same
    prefixed = {layout.COMFY_PREFIX + k: original.get(k) for k in original.shapes}
    save_safetensors(prefixed, str(tmp_path / "comfy.safetensors"))
    comfy = weights.load_transformer(str(tmp_path / "comfy.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), comfy.state_dict().values()))


def test_text_encoders_and_ae_round_trip(tiny_dev, tmp_path):
    parts = weights.load_single_files(tiny_dev.transformer, t5xxl=tiny_dev.t5xxl, ae=tiny_dev.ae,
                                      clip_l=tiny_dev.clip_l)
    assert parts.model_type == "flux_dev"
    assert parts.ae.config.latent_channels == 16
    assert (parts.ae.config.scaling_factor, parts.ae.config.shift_factor) == (0.3611, 0.1159)
    assert parts.clip_l.config.num_attention_heads == 1 and parts.clip_l.config.hidden_size == 64
    assert parts.t5.config.num_heads == tiny.TINY_T5["num_heads"] and parts.t5.config.d_kv == tiny.TINY_T5["d_kv"]
    assert parts.t5.shared.weight is parts.t5.encoder.embed_tokens.weight
    for save, module, name in ((weights.save_clip_l, parts.clip_l, "clip_l"), (weights.save_t5xxl, parts.t5, "t5xxl"),
                               (weights.save_ae, parts.ae, "ae")):
        path = save(module, str(tmp_path / f"{name}.safetensors"))
        assert _sha(path) == _sha(getattr(tiny_dev, name)), name
    ids = parts.t5_tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    folder = weights.load_diffusers_folder(tiny_dev.diffusers_dir)
    with torch.no_grad():
        assert torch.equal(parts.t5(ids)[0], folder.t5(ids)[0])
        clip_ids = parts.clip_tokenizer(["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids
        assert torch.equal(parts.clip_l(clip_ids).pooler_output, folder.clip_l(clip_ids).pooler_output)
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        latents = parts.ae.encode(image).latent_dist.mean
        assert latents.shape == (1, 16, 8, 8)
        assert torch.equal(latents, folder.ae.encode(image).latent_dist.mean)


def test_fp8_stored_files_load_upcast(tiny_dev, tmp_path):
    model = weights.load_transformer(tiny_dev.transformer)
    fp8 = weights.save_transformer(model, str(tmp_path / "flux1-tiny-fp8.safetensors"), dtype=torch.float8_e4m3fn)
    header = open_checkpoint(fp8)
    assert header.get("double_blocks.0.img_attn.qkv.weight").dtype == torch.float8_e4m3fn
    loaded = weights.load_transformer(fp8, dtype=torch.bfloat16)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.bfloat16
        assert torch.equal(a.to(torch.float8_e4m3fn).to(torch.bfloat16), b), name
    with torch.no_grad():
        out = loaded.float()(**_inputs(loaded))[0]
    assert torch.isfinite(out).all()


def test_scaled_fp8_t5_is_unscaled(tiny_dev, tmp_path):
    """ComfyUI's scaled fp8: weight stored divided by a per-tensor scale, 'scaled_fp8' marker."""
    src = open_checkpoint(tiny_dev.t5xxl)
    tensors = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    expected = {}
    for name in src.shapes:
        t = src.get(name)
        if name.endswith(".weight") and t.ndim == 2 and "SelfAttention" in name:
            scale = t.abs().max() / 448.0
            stored = (t / scale).to(torch.float8_e4m3fn)
            tensors[name], tensors[name[:-len("weight")] + "scale_weight"] = stored, scale.reshape(1)
            expected[name] = (stored.float() * scale).to(torch.float32)
        else:
            tensors[name] = t
            expected[name] = t
    path = str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    save_safetensors(tensors, path)
    assert layout.file_kind(_shapes(path)) == "t5xxl"
    t5 = load_t5_encoder(path, torch.float32)
    state = t5.state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def test_tiny_command_line(tmp_path, capsys):
    assert tiny.main(["--out", str(tmp_path), "--model_type", "flux_schnell", "--layout", "single"]) == 0
    printed = capsys.readouterr().out
    assert "flux1-tiny.safetensors" in printed and "diffusers_dir" not in printed
    assert layout.classify_denoiser(_shapes(str(tmp_path / "flux1-tiny.safetensors"))) == "flux_schnell"


def test_tiny_models_are_deterministic(tiny_dev, tmp_path):
    again = tiny.build_tiny_flux(str(tmp_path / "again"), model_type="flux_dev", seed=0)
    for name in ("transformer", "clip_l", "t5xxl", "ae"):
        assert _sha(getattr(again, name)) == _sha(getattr(tiny_dev, name)), name
    assert _tree_hashes(again.diffusers_dir) == _tree_hashes(tiny_dev.diffusers_dir)
    other = tiny.build_tiny_flux(str(tmp_path / "other"), model_type="flux_dev", seed=1, layout="single")
    assert _sha(other.transformer) != _sha(tiny_dev.transformer)


# ---------------------------------------------------------------- T5 tokenizer, offline


def test_bundled_t5_tokenizer_ids_and_licence():
    tok = load_t5_tokenizer()
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.model_max_length == 512
    assert tok("<extra_id_0>").input_ids[0] == 32099
    padded = tok(["a photo of a cat"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert padded == CAT_IDS + [0] * 8
    for name in ("LICENSE", "NOTICE", "spiece.model", "tokenizer.json"):
        assert os.path.isfile(os.path.join(T5_TOKENIZER_DIR, name)), name
    assert "Apache License" in open(os.path.join(T5_TOKENIZER_DIR, "LICENSE")).read()


def test_t5_tokenizer_from_user_folders(tmp_path):
    cache = tmp_path / "cache"
    (cache / "google_t5-v1_1-xxl").mkdir(parents=True)
    shutil.copy(os.path.join(T5_TOKENIZER_DIR, "tokenizer.json"), cache / "google_t5-v1_1-xxl")
    assert load_t5_tokenizer(str(cache))("a photo of a cat").input_ids == CAT_IDS  # --tokenizer_cache_dir layout
    spiece_only = tmp_path / "spiece_only"
    spiece_only.mkdir()
    shutil.copy(os.path.join(T5_TOKENIZER_DIR, "spiece.model"), spiece_only)
    pytest.importorskip("sentencepiece")
    assert load_t5_tokenizer(str(spiece_only))("a photo of a cat").input_ids == CAT_IDS


def test_t5_tokenizer_missing_files_say_where_to_put_them(tmp_path):
    empty = tmp_path / "tokenizers"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as err:
        load_t5_tokenizer(str(empty))
    message = str(err.value)
    assert "tokenizer.json" in message and "spiece.model" in message
    assert os.path.join(str(empty), "google_t5-v1_1-xxl") in message
    with pytest.raises(ModelLoadError, match="no such tokenizer folder"):
        load_t5_tokenizer(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- wrong files: clear errors


def test_wrong_file_kinds_are_named(tiny_dev, tiny_chroma, tmp_path):
    with pytest.raises(ModelLoadError) as err:
        weights.load_t5xxl(tiny_dev.clip_l)
    assert "CLIP-L" in str(err.value) and "--clip_l" in str(err.value) and "--t5xxl" in str(err.value)
    assert tiny_dev.clip_l in str(err.value)
    with pytest.raises(ModelLoadError, match=r"T5-XXL text encoder, not a CLIP-L.*belongs in --t5xxl"):
        weights.load_clip_l(tiny_dev.t5xxl)
    with pytest.raises(ModelLoadError, match=r"FLUX autoencoder, not a T5-XXL.*--ae"):
        weights.load_t5xxl(tiny_dev.ae)
    with pytest.raises(ModelLoadError, match=r"FLUX.1 denoiser, not the FLUX autoencoder.*"
                                             r"--pretrained_model_name_or_path"):
        weights.load_ae(tiny_dev.transformer)
    with pytest.raises(ModelLoadError, match="not a FLUX.1 / Chroma denoiser"):
        weights.load_transformer(tiny_dev.ae)
    with pytest.raises(ModelLoadError, match="add --model_type chroma"):
        weights.load_transformer(tiny_chroma.transformer)
    with pytest.raises(ModelLoadError, match="FLUX.1-dev model, not Chroma"):
        weights.load_transformer(tiny_dev.transformer, model_type="chroma")
    # an SD VAE given as --ae
    sd_vae = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}
    save_safetensors(sd_vae, str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(ModelLoadError, match="Stable Diffusion VAE.*16-channel"):
        weights.load_ae(str(tmp_path / "sd_vae.safetensors"))
    # the file checks run before any weight is read
    with pytest.raises(ModelLoadError, match="--t5xxl"):
        weights.load_single_files(tiny_dev.transformer, t5xxl=tiny_dev.clip_l, ae=tiny_dev.ae, clip_l=tiny_dev.clip_l)
    with pytest.raises(ModelLoadError, match="FLUX.1 needs the CLIP-L"):
        weights.load_single_files(tiny_dev.transformer, t5xxl=tiny_dev.t5xxl, ae=tiny_dev.ae)
    with pytest.raises(ModelLoadError, match="add --model_type chroma"):  # not "needs CLIP-L"
        weights.load_single_files(tiny_chroma.transformer, t5xxl=tiny_chroma.t5xxl, ae=tiny_chroma.ae)


def test_missing_incomplete_and_damaged_files(tiny_dev, tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        weights.load_transformer(str(tmp_path / "flux1-dev.safetensors"))
    src = open_checkpoint(tiny_dev.transformer)
    partial = {k: src.get(k) for k in src.shapes if k != "single_blocks.1.linear1.weight"}
    save_safetensors(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match=r"incomplete flux_dev checkpoint.*single_blocks.1.linear1.weight"):
        weights.load_transformer(str(tmp_path / "partial.safetensors"))
    data = open(tiny_dev.transformer, "rb").read()
    with open(tmp_path / "truncated.safetensors", "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="download it again"):
        weights.load_transformer(str(tmp_path / "truncated.safetensors"))
    t5 = open_checkpoint(tiny_dev.t5xxl)
    save_safetensors({k: t5.get(k) for k in t5.shapes if "block.1.layer.1" not in k}, str(tmp_path / "t5.safetensors"))
    with pytest.raises(ModelLoadError, match="incomplete T5 encoder"):
        weights.load_t5xxl(str(tmp_path / "t5.safetensors"))
    with pytest.raises(ModelLoadError, match="not a FLUX.1 / Chroma pipeline"):
        os.makedirs(tmp_path / "sd_folder")
        (tmp_path / "sd_folder" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        weights.load_diffusers_folder(str(tmp_path / "sd_folder"))


# ---------------------------------------------------------------- the real pipelines, offline, on the CPU


def _run(pipe, **kwargs):
    out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), max_sequence_length=32, **kwargs).images
    assert out.shape == (1, 64, 64, 3) and (out >= 0).all() and (out <= 1).all()
    return out


def test_flux_pipeline_runs_from_single_files(tiny_dev):
    from diffusers import FluxPipeline

    parts = weights.load_single_files(tiny_dev.transformer, t5xxl=tiny_dev.t5xxl, ae=tiny_dev.ae,
                                      clip_l=tiny_dev.clip_l)
    image = _run(parts.pipeline(), guidance_scale=3.5)
    # diffusers' own loading of our folder gives the same image
    folder = FluxPipeline.from_pretrained(tiny_dev.diffusers_dir, local_files_only=True)
    assert (_run(folder, guidance_scale=3.5) == image).all()


def test_chroma_pipeline_runs_from_single_files(tiny_chroma):
    parts = weights.load_single_files(tiny_chroma.transformer, t5xxl=tiny_chroma.t5xxl, ae=tiny_chroma.ae,
                                      model_type="chroma")
    assert parts.clip_l is None
    _run(parts.pipeline(), guidance_scale=3.0)
    folder = weights.load_diffusers_folder(tiny_chroma.diffusers_dir, model_type="chroma")
    assert folder.model_type == "chroma" and folder.t5_tokenizer("a photo of a cat").input_ids == CAT_IDS


# ---------------------------------------------------------------- diffusers' from_single_file at the real width


@pytest.mark.skipif(not os.environ.get("SD_SCRIPTS_SLOW_TESTS"), reason="set SD_SCRIPTS_SLOW_TESTS=1 (needs ~8 GB "
                    "RAM, ~1 min): diffusers' converter assumes the real width 3072, so tiny files cannot be used")
def test_saved_file_loads_in_diffusers_from_single_file(tmp_path):
    """A denoiser 3072 wide (24 heads of 128, RoPE 16/56/56) with 1 double + 1 single block, saved by
    save_transformer, loads through diffusers' FluxTransformer2DModel.from_single_file and gives our outputs."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(layout.FLUX_DEV_CONFIG, num_layers=1, num_single_layers=1, joint_attention_dim=32,
               pooled_projection_dim=48, _class_name="FluxTransformer2DModel")
    model = weights.build_transformer(cfg)
    tiny._randomise(model, 0, "wide")
    model = model.to(torch.bfloat16)
    path = weights.save_transformer(model, str(tmp_path / "flux-wide.safetensors"))
    config_dir = weights.transformer_config_dir(model, str(tmp_path / "config"))
    theirs = FluxTransformer2DModel.from_single_file(path, config=config_dir, subfolder="transformer",
                                                     local_files_only=True, torch_dtype=torch.bfloat16).eval()
    ours = weights.load_transformer(path, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    with torch.no_grad():
        a = ours(**{k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in _inputs(ours).items()})[0]
        b = theirs(**{k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
                      for k, v in _inputs(theirs).items()})[0]
    assert torch.equal(a, b)
