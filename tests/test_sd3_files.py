"""SD3 / SD3.5 model files: variant detection on key sets, configs from shapes (real sizes built on the meta device),
the SAI <-> diffusers table checked against diffusers' own converter, loading the tiny models through our code and
through diffusers' from_single_file with equal outputs, a bit-exact round trip, a StableDiffusion3Pipeline run from
the loaded parts, and clear errors for wrong files. Offline and deterministic."""
import json
import os

import pytest
import torch

from sd_scripts.errors import ModelLoadError
from sd_scripts.families.sd3 import layout
from sd_scripts.families.sd3.tiny import TINY_TRANSFORMER, TINY_VARIANTS, build_tiny_parts, build_tiny_sd3
from sd_scripts.families.sd3.weights import (check_text_encoders, load_clip_g, load_clip_l, load_diffusers_folder,
                                             load_sd3, load_transformer, load_vae, require_text_encoders,
                                             save_transformer, transformer_to_diffusers, transformer_to_sai)

REAL = {  # diffusers configs of the released models (stabilityai/*/transformer/config.json)
    "sd3_medium": dict(num_layers=24, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd35_medium": dict(num_layers=24, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                        dual_attention_layers=tuple(range(13))),
    "sd35_large": dict(num_layers=38, num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                       pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm"),
}


def sai_shapes(config: dict, prefix: str = layout.SAI_PREFIX) -> dict:
    """SAI names and shapes of an SD3Transformer2DModel built on the meta device (no memory for real sizes)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    with init_empty_weights(include_buffers=True):
        model = SD3Transformer2DModel(**config)
    state = model.state_dict()
    full = dict(model.config)
    shapes = {}
    for sai, names, kind in layout.transformer_key_table(full):
        dims = [tuple(state[n].shape) for n in names]
        shape = (sum(d[0] for d in dims),) + dims[0][1:] if kind == layout.SPLIT else dims[0]
        shapes[prefix + sai] = shape
    return shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {v: build_tiny_sd3(str(root / v), variant=v, seed=0) for v in ("sd3_medium", "sd35_medium")}


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def transformer_out(model, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                     timestep=torch.tensor([500.0]), return_dict=False)[0]


# ---------------------------------------------------------------- torch-free layout


@pytest.mark.parametrize("variant", sorted(REAL))
def test_real_sizes_classify_and_infer_the_released_configs(variant):
    shapes = sai_shapes(REAL[variant])
    assert layout.classify(shapes) == variant
    cfg = layout.infer_transformer_config(shapes)
    for key, value in REAL[variant].items():
        assert cfg[key] == (list(value) if isinstance(value, tuple) else value), key
    assert cfg["attention_head_dim"] == 64 and cfg["patch_size"] == 2 and cfg["in_channels"] == 16
    assert cfg["out_channels"] == 16 and (cfg["qk_norm"] is None) == (variant == "sd3_medium")
    # without the prefix (a bare MMDiT state dict) and with bundled encoders and VAE: the same answer
    bare = {k[len(layout.SAI_PREFIX):]: v for k, v in shapes.items()}
    assert layout.classify(bare) == variant and layout.infer_transformer_config(bare) == cfg
    bundled = dict(shapes, **{layout.CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight": (49408, 768),
                              layout.CLIP_G_PREFIX + "text_model.embeddings.token_embedding.weight": (49408, 1280),
                              layout.T5_PREFIX + "shared.weight": (32128, 4096),
                              "first_stage_model.decoder.conv_in.weight": (512, 16, 3, 3)})
    assert layout.classify(bundled) == variant
    assert layout.bundled_parts(bundled) == {"vae": True, "clip_l": True, "clip_g": True, "t5xxl": True}
    assert layout.bundled_parts(shapes) == {"vae": False, "clip_l": False, "clip_g": False, "t5xxl": False}


def test_classify_other_models_is_none():
    assert layout.classify({}) is None
    assert layout.classify({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) is None
    flux = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "img_in.weight": (3072, 64)}
    assert layout.classify(flux) is None and "FLUX" in layout.what_else(flux)
    assert layout.classify({layout.CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight": (1, 1)}) is None


def test_layout_is_torch_free():
    import subprocess
    import sys

    code = ("import sys; import sd_scripts.families.sd3.layout as l; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# ---------------------------------------------------------------- the key table against diffusers' converter


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_key_table_matches_diffusers_converter(variant):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = build_tiny_parts(variant)["transformer"]
    sai = transformer_to_sai(model.state_dict(), model.config)
    assert layout.classify({k: tuple(v.shape) for k, v in sai.items()}) == variant
    ours = transformer_to_diffusers(sai.__getitem__, model.config)
    reference = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sai.items()})
    assert ours.keys() == reference.keys() == model.state_dict().keys()
    for k in reference:
        assert torch.equal(ours[k], reference[k]), k
        assert torch.equal(ours[k], model.state_dict()[k]), k  # and back: both directions agree


# ---------------------------------------------------------------- loading the tiny models


@pytest.mark.parametrize("variant", ["sd3_medium", "sd35_medium"])
def test_tiny_loads_through_ours_and_diffusers_with_equal_outputs(tiny, variant):
    from diffusers import SD3Transformer2DModel

    paths = tiny[variant]
    ours = load_transformer(paths.single_file)
    ref = SD3Transformer2DModel.from_single_file(paths.single_file, config=paths.diffusers_dir,
                                                 subfolder="transformer", local_files_only=True).eval()
    folder = SD3Transformer2DModel.from_pretrained(paths.diffusers_dir, subfolder="transformer",
                                                   local_files_only=True).eval()
    same_state(ours, ref)
    same_state(ours, folder)
    assert torch.equal(transformer_out(ours), transformer_out(ref))
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                "pooled_projection_dim", "caption_projection_dim", "pos_embed_max_size", "qk_norm", "patch_size"):
        assert ours.config[key] == folder.config[key], key
    assert tuple(ours.config.dual_attention_layers) == tuple(folder.config.dual_attention_layers)
    assert not any(p.is_meta for p in ours.parameters()) and not any(b.is_meta for b in ours.buffers())


def test_fused_qkv_are_views_not_copies(tiny):
    model = load_transformer(tiny["sd3_medium"].single_file)
    attn = model.transformer_blocks[0].attn
    q, k = attn.to_q.weight, attn.to_k.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()


def test_round_trip_is_bit_exact(tiny, tmp_path):
    from safetensors import safe_open

    from diffusers import SD3Transformer2DModel

    for variant in ("sd3_medium", "sd35_medium"):
        paths = tiny[variant]
        model = load_transformer(paths.single_file)
        out = save_transformer(model, str(tmp_path / f"{variant}.safetensors"), metadata={"ss_note": "x"})
        with safe_open(paths.single_file, "pt") as a, safe_open(out, "pt") as b:
            mmdit = [k for k in a.keys() if k.startswith(layout.SAI_PREFIX)]
            assert sorted(b.keys()) == sorted(mmdit)
            for k in mmdit:
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
            assert b.metadata()["ss_note"] == "x"
        same_state(model, load_transformer(out))
        ref = SD3Transformer2DModel.from_single_file(out, config=paths.diffusers_dir, subfolder="transformer",
                                                     local_files_only=True).eval()
        assert torch.equal(transformer_out(model), transformer_out(ref))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_save_in_bf16_and_fp8_loads_back(tiny, tmp_path):
    model = load_transformer(tiny["sd3_medium"].single_file)
    bf16 = save_transformer(model, str(tmp_path / "bf16.safetensors"), dtype=torch.bfloat16)
    fp8 = save_transformer(model, str(tmp_path / "fp8.safetensors"), dtype=torch.float8_e4m3fn)
    kept = load_transformer(bf16, dtype=None)
    assert next(kept.parameters()).dtype == torch.bfloat16
    cast = load_transformer(fp8, dtype=torch.float32)
    assert next(cast.parameters()).dtype == torch.float32
    torch.testing.assert_close(transformer_out(cast), transformer_out(model), atol=0.5, rtol=0.2)
    with pytest.raises(ModelLoadError, match="safetensors"):
        save_transformer(model, str(tmp_path / "x.ckpt"))


def test_vae_and_text_encoders_match_the_diffusers_folder(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    paths = tiny["sd35_medium"]
    folder = load_diffusers_folder(paths.diffusers_dir)
    assert folder.variant == "sd35_medium" and folder.t5xxl_source.endswith("text_encoder_3")
    vae = load_vae(paths.single_file)
    same_state(vae, folder.vae)
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == 1.5305
    assert vae.config.shift_factor == 0.0609 and not vae.config.use_quant_conv
    # a VAE-only file (no prefix) and the pipeline folder's vae/
    vae_only = {k[len(layout.VAE_PREFIX):]: v for k, v in load_file(paths.single_file).items()
                if k.startswith(layout.VAE_PREFIX)}
    save_file(vae_only, str(tmp_path / "sd3_vae.safetensors"))
    same_state(load_vae(str(tmp_path / "sd3_vae.safetensors")), vae)
    same_state(load_vae(paths.diffusers_dir), vae)
    ids = torch.tensor([[49406, 320, 1125, 539, 48136, 1929, 49407] + [49407] * 70])
    for source in (paths.clip_l, paths.single_file_with_text_encoders):
        clip_l = load_clip_l(source)
        same_state(clip_l, folder.clip_l)
        assert torch.equal(clip_l.text_projection.weight, torch.eye(32))
    for source in (paths.clip_g, paths.single_file_with_text_encoders):
        clip_g = load_clip_g(source)
        same_state(clip_g, folder.clip_g)
        with torch.no_grad():
            a, b = clip_g(ids, output_hidden_states=True), folder.clip_g(ids, output_hidden_states=True)
        assert torch.equal(a.text_embeds, b.text_embeds)
        assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])


def test_load_sd3_single_files_with_and_without_bundled_encoders(tiny):
    paths = tiny["sd3_medium"]
    full = load_sd3(paths.single_file_with_text_encoders)
    assert full.variant == "sd3_medium" and full.vae is not None
    assert full.clip_l is not None and full.clip_g is not None
    assert full.t5xxl_source == os.path.abspath(paths.single_file_with_text_encoders)
    require_text_encoders(full)
    bare = load_sd3(paths.single_file)
    assert bare.clip_l is None and bare.t5xxl_source is None and bare.vae is not None
    with pytest.raises(ModelLoadError, match="--clip_l"):
        require_text_encoders(bare)
    given = load_sd3(paths.single_file, clip_l=paths.clip_l, clip_g=paths.clip_g, t5xxl=paths.t5xxl)
    require_text_encoders(given)
    same_state(given.clip_g, full.clip_g)
    assert given.t5xxl_source == os.path.abspath(paths.t5xxl)
    # the T5 file holds a transformers T5 encoder (what sd_scripts.models.t5 reads); check with transformers itself
    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel

    from sd_scripts.families.sd3.tiny import TINY_T5

    t5 = T5EncoderModel(T5Config(**TINY_T5))
    missing, unexpected = t5.load_state_dict(load_file(paths.t5xxl), strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}


def test_pipeline_from_loaded_parts_runs_two_steps(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sd_scripts.models.tokenizer import load_clip_tokenizer

    paths = tiny["sd35_medium"]
    parts = load_sd3(paths.single_file_with_text_encoders)

    def run(pipe):
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    pipe = StableDiffusion3Pipeline(
        transformer=parts.transformer, vae=parts.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**{k: v for k, v in layout.SCHEDULER_CONFIG.items()
                                                     if not k.startswith("_")}),
        text_encoder=parts.clip_l, tokenizer=load_clip_tokenizer("eos"), text_encoder_2=parts.clip_g,
        tokenizer_2=load_clip_tokenizer("zero"), text_encoder_3=None, tokenizer_3=None)
    images = run(pipe)
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(images)).all()
    reference = StableDiffusion3Pipeline.from_pretrained(paths.diffusers_dir, text_encoder_3=None, tokenizer_3=None,
                                                         local_files_only=True)
    assert (run(reference) == images).all()


# ---------------------------------------------------------------- wrong files


def test_wrong_files_give_clear_errors(tiny, tmp_path):
    from sd_scripts.tools.tiny_model import build_tiny_model

    paths = tiny["sd3_medium"]
    sdxl = build_tiny_model(str(tmp_path / "sdxl"), "sdxl", layout="single").single_file
    with pytest.raises(ModelLoadError, match=r"SD 1.x/2.x/XL model .*train_network"):
        load_transformer(sdxl)
    with pytest.raises(ModelLoadError, match="not an SD3"):
        load_sd3(paths.clip_l)
    with pytest.raises(ModelLoadError, match="T5 encoder.*--t5xxl"):
        load_clip_l(paths.t5xxl)
    with pytest.raises(ModelLoadError, match="no bundled clip_g.*--clip_g"):
        load_clip_g(paths.single_file)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_sd3(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="--t5xxl"):
        load_sd3(paths.single_file, t5xxl=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelLoadError, match="pooled features"):  # CLIP-G given as CLIP-L
        load_sd3(paths.single_file, clip_l=paths.clip_g, clip_g=paths.clip_g)
    with pytest.raises(ModelLoadError, match="autoencoder"):
        load_vae(paths.clip_l)
    sdxl_vae_file = build_tiny_model(str(tmp_path / "sd1"), "sd1", layout="single").single_file
    with pytest.raises(ModelLoadError, match="16-channel"):
        load_vae(sdxl_vae_file)
    # a truncated download
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(paths.single_file, "rb").read()[:5000])
    with pytest.raises(ModelLoadError, match="truncated.safetensors"):
        load_transformer(str(truncated))
    # an MMDiT with a tensor missing
    header_only = tmp_path / "partial.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(paths.single_file)
    del state[layout.SAI_PREFIX + "joint_blocks.1.x_block.mlp.fc2.weight"]
    save_file(state, str(header_only))
    with pytest.raises(ModelLoadError, match=r"missing \(e.g. model.diffusion_model.joint_blocks.1"):
        load_transformer(str(header_only))
    # a folder of another pipeline
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        load_sd3(str(tmp_path / "other"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_diffusers_folder(str(tmp_path))


def test_check_text_encoders_rejects_a_too_wide_pair():
    class Cfg:
        def __init__(self, hidden, proj):
            self.config = type("C", (), {"hidden_size": hidden, "projection_dim": proj})()

    config = {"pooled_projection_dim": 2048, "joint_attention_dim": 4096}
    check_text_encoders(config, Cfg(768, 768), Cfg(1280, 1280))
    with pytest.raises(ModelLoadError, match="pooled"):
        check_text_encoders(config, Cfg(1280, 1280), Cfg(1280, 1280))
    with pytest.raises(ModelLoadError, match="joint attention"):
        check_text_encoders({"pooled_projection_dim": 2048, "joint_attention_dim": 1024}, Cfg(768, 768),
                            Cfg(1280, 1280))


def test_tiny_is_deterministic(tmp_path):
    a = build_tiny_sd3(str(tmp_path / "a"), variant="sd3_medium", seed=1, layout="single")
    b = build_tiny_sd3(str(tmp_path / "b"), variant="sd3_medium", seed=1, layout="single")
    for x, y in ((a.single_file, b.single_file), (a.clip_g, b.clip_g), (a.t5xxl, b.t5xxl)):
        assert open(x, "rb").read() == open(y, "rb").read()
    assert TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"] == 128


def test_diffusers_pipeline_from_single_file_reads_the_bundled_file_like_we_do(tiny):
    """diffusers' own single-file reader takes every part of the tiny 'incl_clips_t5' file (MMDiT, VAE, CLIP-L,
    CLIP-G, T5) to the same tensors as our loader and the separate t5xxl file."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    paths = tiny["sd35_medium"]
    pipe = StableDiffusion3Pipeline.from_single_file(paths.single_file_with_text_encoders, config=paths.diffusers_dir,
                                                     local_files_only=True, tokenizer_3=None)
    parts = load_sd3(paths.single_file_with_text_encoders)
    for theirs, ours in ((pipe.transformer, parts.transformer), (pipe.vae, parts.vae),
                         (pipe.text_encoder, parts.clip_l), (pipe.text_encoder_2, parts.clip_g)):
        same_state(theirs, ours)
    t5 = pipe.text_encoder_3.state_dict()
    for key, tensor in load_file(paths.t5xxl).items():
        assert torch.equal(t5[key], tensor), key
