"""load_model / save_single_file / save_diffusers on the tiny SD1 and SD2 models: exact round trips, agreement with
diffusers' own single-file loader, layout-independent results, VAE override and one-line errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_scripts.errors import ModelLoadError
from sd_scripts.families.sd.loading import (detect_family, diffusers_config_dir, load_model, save_diffusers,
                                       save_single_file)
from sd_scripts.models.checkpoint import open_checkpoint
from sd_scripts.tools.tiny_model import build_tiny_model

VARIANTS = {"sd1": ("sd1", False), "sd2": ("sd2", False), "sd2-v": ("sd2", True)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_model(str(root), fam, v) for name, (fam, v) in VARIANTS.items()}


def _assert_same_file(a, b):
    ta, tb = load_file(a), load_file(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd2-v"])
def test_detection(tiny, name):
    family, v = VARIANTS[name]
    assert detect_family(open_checkpoint(tiny[name].single_file).shapes) == family
    for path in (tiny[name].single_file, tiny[name].diffusers_dir):
        bundle = load_model(path)
        assert (bundle.family, bundle.v_prediction) == (family, v)
        assert bundle.scheduler_config["prediction_type"] == ("v_prediction" if v else "epsilon")
        assert bundle.tokenizer.pad_token_id == (0 if family == "sd2" else 49407)


def test_detect_family_without_text_encoder():
    shapes = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    assert detect_family(shapes) == "sd2"
    shapes = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    assert detect_family(shapes) == "sd1"
    assert detect_family({"conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}) == "sdxl"


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_round_trip_is_bitwise(tiny, name, tmp_path):
    src = tiny[name].single_file
    bundle = load_model(src)
    out = save_single_file(bundle, str(tmp_path / "saved.safetensors"))
    _assert_same_file(src, out)
    again = load_model(out)
    for a, b in ((bundle.unet, again.unet), (bundle.vae, again.vae), (bundle.text_encoder, again.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(again.extra_state) == set(bundle.extra_state)
    if name == "sd2":  # the OpenCLIP layer diffusers does not use survives
        assert any("resblocks.2." in k for k in bundle.extra_state)
    assert again.vae_id == bundle.vae_id
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_ckpt_round_trip(tiny, tmp_path):
    bundle = load_model(tiny["sd1"].single_file)
    ckpt = save_single_file(bundle, str(tmp_path / "m.ckpt"))
    back = save_single_file(load_model(ckpt), str(tmp_path / "back.safetensors"))
    _assert_same_file(tiny["sd1"].single_file, back)


@pytest.mark.parametrize("name", ["sd1", "sd2-v"])
def test_diffusers_from_single_file_matches(tiny, name, tmp_path):
    from diffusers import StableDiffusionPipeline

    bundle = load_model(tiny[name].single_file)
    saved = save_single_file(bundle, str(tmp_path / "saved.safetensors"))
    config = diffusers_config_dir(bundle.family, bundle.v_prediction, bundle=bundle)
    pipe = StableDiffusionPipeline.from_single_file(saved, config=config, local_files_only=True)
    for theirs, ours in ((pipe.unet, bundle.unet), (pipe.vae, bundle.vae), (pipe.text_encoder, bundle.text_encoder)):
        st, so = theirs.state_dict(), ours.state_dict()
        assert set(st) == set(so)
        assert all(torch.equal(st[k], so[k]) for k in so)
    assert pipe.scheduler.config.prediction_type == bundle.scheduler_config["prediction_type"]


def test_bundled_config_dir_is_offline_pipeline_folder():
    from diffusers import StableDiffusionPipeline

    for family, v in VARIANTS.values():
        folder = diffusers_config_dir(family, v)
        assert diffusers_config_dir(family, v) == folder  # cached
        config = StableDiffusionPipeline.load_config(folder)
        assert config["unet"] == ["diffusers", "UNet2DConditionModel"]
        with open(os.path.join(folder, "unet", "config.json")) as f:
            assert json.load(f)["cross_attention_dim"] == (1024 if family == "sd2" else 768)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_and_diffusers_folder_compute_the_same(tiny, name):
    a, b = load_model(tiny[name].single_file), load_model(tiny[name].diffusers_dir)
    gen = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 12, generator=gen), torch.tensor([10, 900])
    ids = a.tokenizer(["a photo of sks dog", "x"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ha, hb = a.text_encoder(ids).last_hidden_state, b.text_encoder(ids).last_hidden_state
        assert torch.equal(ha, hb)
        assert torch.equal(a.unet(latents, t, ha).sample, b.unet(latents, t, hb).sample)
        image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
        assert torch.equal(a.vae.encode(image).latent_dist.mean, b.vae.encode(image).latent_dist.mean)
    assert a.vae_id == b.vae_id


def test_save_diffusers_round_trip(tiny, tmp_path):
    a = load_model(tiny["sd2-v"].single_file)
    out = save_diffusers(a, str(tmp_path / "pipe"))
    save_diffusers(a, out)  # replacing an existing folder works
    b = load_model(out)
    assert (b.family, b.v_prediction) == ("sd2", True)
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    half = load_model(save_diffusers(a, str(tmp_path / "half"), dtype=torch.float16), dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16


def test_dtype_and_flags(tiny):
    bundle = load_model(tiny["sd2"].single_file, dtype=torch.bfloat16, v_parameterization=True)
    assert bundle.v_prediction and next(bundle.unet.parameters()).dtype == torch.bfloat16
    assert bundle.extra_state["alphas_cumprod"].dtype == torch.float32  # extra tensors are kept as stored
    with pytest.raises(ModelLoadError, match="--v2"):
        load_model(tiny["sd1"].single_file, v2=True)


def test_vae_override(tiny, tmp_path):
    other = build_tiny_model(str(tmp_path / "other"), "sd1", seed=1)
    base = load_model(tiny["sd1"].single_file)
    reference = load_model(other.single_file).vae.state_dict()
    # a VAE-only file without the 'first_stage_model.' prefix
    full = load_file(other.single_file)
    vae_only = {k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, str(tmp_path / "vae.safetensors"), metadata=open_checkpoint(other.single_file).metadata)
    for vae in (other.single_file, str(tmp_path / "vae.safetensors"), os.path.join(other.diffusers_dir, "vae"),
                other.diffusers_dir):
        swapped = load_model(tiny["sd1"].single_file, vae=vae)
        sd = swapped.vae.state_dict()
        assert all(torch.equal(sd[k], reference[k]) for k in reference), vae
        assert swapped.vae_id != base.vae_id
        assert torch.equal(next(swapped.unet.parameters()), next(base.unet.parameters()))


def _one_line(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    return message


def test_errors(tiny, tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path / "missing.safetensors"))
    assert "no such file" in _one_line(e, tmp_path / "missing.safetensors")

    data = open(tiny["sd1"].single_file, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        load_model(str(truncated))
    assert "download" in _one_line(e, truncated)

    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights\n" * 10)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(text))
    _one_line(e, text)

    not_sd = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(not_sd))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(not_sd))
    assert "not a Stable Diffusion" in _one_line(e, not_sd)

    refiner = tmp_path / "sdxl_refiner.safetensors"
    save_file({"conditioner.embedders.0.model.token_embedding.weight": torch.zeros(4, 8)}, str(refiner))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(refiner))
    assert "not supported" in _one_line(e, refiner)

    partial = tmp_path / "partial.safetensors"
    tensors = load_file(tiny["sd1"].single_file)
    save_file({k: v for k, v in tensors.items() if "decoder" not in k}, str(partial))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(partial))
    _one_line(e, partial)

    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder))
    assert "model_index.json" in _one_line(e, folder)

    broken = tmp_path / "broken"
    shutil.copytree(tiny["sd1"].diffusers_dir, broken)
    os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(broken))
    _one_line(e, broken)

    junk_ckpt = tmp_path / "junk.ckpt"
    junk_ckpt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(junk_ckpt))
    _one_line(e, junk_ckpt)


def test_bench_workload_layout(tmp_path):
    """The benchmark's tiny diffusers model (4 heads, CLIP width 32, DDPMScheduler) loads as SD1."""
    import sys

    # the shared folder sits beside the checkout (docs/DEVELOPING.md: `../shared`)
    bench = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench"))
    if not os.path.isfile(os.path.join(bench, "make_workload.py")):
        pytest.skip(f"no benchmark workload generator at {bench}/make_workload.py (../shared/bench beside the "
                    "checkout)")
    sys.path.insert(0, bench)
    try:
        import make_workload
    finally:
        sys.path.remove(bench)
    from sd_scripts.models.tokenizer import TOKENIZER_DIR

    make_workload.build_model("tiny", str(tmp_path / "model"), TOKENIZER_DIR, 0)
    bundle = load_model(str(tmp_path / "model"))
    assert (bundle.family, bundle.v_prediction) == ("sd1", False)
    assert bundle.unet.config.cross_attention_dim == 32
    single = save_single_file(bundle, str(tmp_path / "bench.safetensors"))
    again = load_model(single)
    assert again.unet.config.attention_head_dim == 4 and again.vae.config.norm_num_groups == 8
    sa, sb = bundle.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sd2_from_diffusers_folder_keeps_its_layers_through_a_single_file(tiny, tmp_path):
    """A diffusers SD2 text encoder has no extra OpenCLIP layer: a single file saved from it must not lose one."""
    folder = load_model(tiny["sd2"].diffusers_dir)
    single = load_model(save_single_file(folder, str(tmp_path / "from_folder.safetensors")))
    assert single.text_encoder.config.num_hidden_layers == folder.text_encoder.config.num_hidden_layers == 2
    sa, sb = folder.text_encoder.state_dict(), single.text_encoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_changing_loaded_weights_never_touches_the_file(tiny, tmp_path):
    """Weights may be memory-mapped from the file: in-place training must stay private, and saving over the
    source file must not disturb the loaded model."""
    src = str(tmp_path / "model.safetensors")
    shutil.copyfile(tiny["sd1"].single_file, src)
    before = open(src, "rb").read()
    bundle = load_model(src)
    with torch.no_grad():
        bundle.unet.conv_in.weight.add_(1.0)
    assert open(src, "rb").read() == before
    expected = bundle.unet.conv_in.weight.clone()
    save_single_file(bundle, src)  # over the source, atomically
    assert torch.equal(bundle.unet.conv_in.weight, expected)
    assert torch.equal(load_model(src).unet.conv_in.weight, expected)


def test_sd1_text_encoder_without_text_model_level(tiny, tmp_path):
    """Old SD1 files name the text encoder 'cond_stage_model.transformer.embeddings...' (no 'text_model.')."""
    tensors = load_file(tiny["sd1"].single_file)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tensors.items()}
    path = str(tmp_path / "old.safetensors")
    save_file(old, path, metadata=open_checkpoint(tiny["sd1"].single_file).metadata)
    a, b = load_model(path), load_model(tiny["sd1"].single_file)
    sa, sb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
