"""Model tools: convert_diffusers20_original_sd, show_metadata, merge_models (in-process, on the tiny models)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd_scripts.tools import convert_diffusers20_original_sd as convert
from sd_scripts.tools import merge_models, show_metadata


def _same_tensors(a: str, b: str, folder_drops: bool = False) -> None:
    """Equal tensors; with `folder_drops` `a` may hold the buffers a diffusers folder does not store (the schedule's
    alphas_cumprod, CLIP position ids: sd-scripts' conversions drop them too)."""
    ta, tb = load_file(a), load_file(b)
    dropped = set(ta) - set(tb)
    assert set(tb) <= set(ta) and (not dropped or folder_drops)
    assert all("." not in k or k.endswith("position_ids") for k in dropped), dropped
    for k in tb:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


# ------------------------------------------------------------------ convert
def test_convert_round_trip_exact_and_diffusers_reads_it(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, back = str(tmp_path / "dif"), str(tmp_path / "back.safetensors")
    assert convert.main([tiny_sd1.single_file, folder, "--use_safetensors", "--v1"]) == 0
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    ours = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in ours.items())
    assert convert.main([folder, back, "--metadata", "{'name': 'round trip'}"]) == 0
    _same_tensors(tiny_sd1.single_file, back, folder_drops=True)
    # and folder -> file -> folder gives the same weight files
    again = str(tmp_path / "again")
    assert convert.main([back, again, "--use_safetensors"]) == 0
    for sub in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        _same_tensors(os.path.join(folder, sub + ".safetensors"), os.path.join(again, sub + ".safetensors"))
    with safe_open(back, "pt") as f:
        assert f.metadata()["name"] == "round trip"


def test_convert_bin_by_default_precision_and_reference(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    ref = tmp_path / "ref"
    (ref / "scheduler").mkdir(parents=True)
    with open(os.path.join(tiny_sd1.diffusers_dir, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    sched.update(_class_name="EulerDiscreteScheduler", beta_end=0.0234)
    (ref / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    folder = str(tmp_path / "dif")
    assert convert.main([tiny_sd1.single_file, folder, "--fp16", "--reference_model", str(ref)]) == 0
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
    assert os.path.isfile(os.path.join(folder, "text_encoder", "pytorch_model.bin"))
    assert not any(n.endswith(".safetensors") for _r, _d, fs in os.walk(folder) for n in fs)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert pipe.scheduler.config.beta_end == 0.0234 and pipe.scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    unet_bin = torch.load(os.path.join(folder, "unet", "diffusion_pytorch_model.bin"), weights_only=True)
    assert {t.dtype for t in unet_bin.values()} == {torch.float16}
    assert all(torch.equal(pipe.unet.state_dict()[k].half(), v) for k, v in unet_bin.items())
    for flag, dtype in (("--bf16", torch.bfloat16), ("--float", torch.float32)):
        out = str(tmp_path / f"m{flag}.safetensors")
        assert convert.main([folder, out, flag]) == 0
        assert {t.dtype for t in load_file(out).values() if t.is_floating_point()} == {dtype}
    out = str(tmp_path / "p.safetensors")
    assert convert.main([folder, out, "--save_precision_as", "bf16"]) == 0
    assert {t.dtype for t in load_file(out).values() if t.is_floating_point()} == {torch.bfloat16}


def test_convert_ckpt_steps_variant_flags_and_errors(tiny_sd1, tmp_path, capsys):
    out = str(tmp_path / "m.ckpt")
    assert convert.main([tiny_sd1.diffusers_dir, out, "--epoch", "3", "--global_step", "120"]) == 0
    data = torch.load(out, weights_only=True)
    assert data["epoch"] == 3 and data["global_step"] == 120 and "state_dict" in data
    # --variant: the folder's *.fp16.* files are read instead of the plain ones
    var = tmp_path / "var"
    convert.main([tiny_sd1.single_file, str(var), "--use_safetensors"])
    unet = var / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(unet))
    save_file({k: v * 0 for k, v in weights.items()}, str(var / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    plain, zeroed = str(tmp_path / "plain.safetensors"), str(tmp_path / "zero.safetensors")
    assert convert.main([str(var), plain]) == 0 and convert.main([str(var), zeroed, "--variant", "fp16"]) == 0
    unet_keys = [k for k in load_file(zeroed) if k.startswith("model.diffusion_model.") and "weight" in k]
    assert all(load_file(zeroed)[k].abs().sum() == 0 for k in unet_keys[:5])
    assert any(load_file(plain)[k].abs().sum() > 0 for k in unet_keys[:5])
    # --v2 on an SD1 model, --v1 with --v2, a bad --metadata: one line each, exit 1
    assert convert.main([tiny_sd1.single_file, str(tmp_path / "x.safetensors"), "--v2"]) == 1
    assert convert.main([tiny_sd1.single_file, str(tmp_path / "x.safetensors"), "--v1", "--v2"]) == 1
    assert convert.main([tiny_sd1.single_file, str(tmp_path / "x.safetensors"), "--metadata", "os.system('x')"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 3 and "--v2" in err[0] and "--v1" in err[1] and "--metadata" in err[2]


def test_convert_v2_and_linear_projection(tiny_sd1, tiny_sd2v, tmp_path):
    from diffusers import UNet2DConditionModel

    out = str(tmp_path / "dif")
    assert convert.main([tiny_sd2v.single_file, out, "--v2", "--v1"]) == 1
    assert convert.main([tiny_sd2v.single_file, out, "--v1"]) == 1  # an SD2 model is not --v1
    assert convert.main([tiny_sd2v.single_file, out, "--v2", "--use_safetensors"]) == 0
    # the tiny SD1 U-Net has 1x1-conv projections: the flag makes them Linear layers, values unchanged
    plain, linear = str(tmp_path / "plain"), str(tmp_path / "linear")
    assert convert.main([tiny_sd1.single_file, plain, "--use_safetensors"]) == 0
    assert convert.main([tiny_sd1.single_file, linear, "--use_safetensors", "--unet_use_linear_projection"]) == 0
    a = UNet2DConditionModel.from_pretrained(plain, subfolder="unet", local_files_only=True)
    b = UNet2DConditionModel.from_pretrained(linear, subfolder="unet", local_files_only=True)
    assert a.config.use_linear_projection is False and b.config.use_linear_projection is True
    conv, lin = a.down_blocks[0].attentions[0].proj_in.weight, b.down_blocks[0].attentions[0].proj_in.weight
    assert conv.ndim == 4 and lin.ndim == 2 and torch.equal(conv.flatten(1), lin)


# ------------------------------------------------------------------ show_metadata
def test_show_metadata(tmp_path, capsys):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.zeros(1)}, path, metadata={"z": "1", "ss_network_dim": "4"})
    assert show_metadata.main(["--model", path]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"z": "1", "ss_network_dim": "4"} and out.index("ss_network_dim") < out.index('"z"')
    assert '    "ss_network_dim"' in out  # indented by 4, as sd-scripts
    save_file({"a": torch.zeros(1)}, path)
    assert show_metadata.main(["--model", path]) == 0 and capsys.readouterr().out == ""
    (tmp_path / "t.safetensors").write_text("not a model")
    assert show_metadata.main(["--model", str(tmp_path / "t.safetensors")]) == 1
    assert "t.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------ merge_models
@pytest.fixture(scope="module")
def three_models(tiny_sd1, tmp_path_factory):
    """The tiny SD1 file and two copies with every float tensor scaled (x2, x-1), and one key removed from the last."""
    root = tmp_path_factory.mktemp("merge")
    base = load_file(tiny_sd1.single_file)
    with safe_open(tiny_sd1.single_file, "pt") as f:
        meta = f.metadata()
    paths = [tiny_sd1.single_file]
    for i, scale in enumerate((2.0, -1.0)):
        t = {k: (v * scale if v.is_floating_point() else v) for k, v in base.items()}
        if i == 1:
            t.pop(next(k for k in t if k.startswith("model.diffusion_model.") and k.endswith("weight")))
        paths.append(str(root / f"m{i}.safetensors"))
        save_file(t, paths[-1], metadata=meta)
    return base, paths


def test_merge_values_ratios_precision_and_unet_only(three_models, tmp_path):
    base, paths = three_models
    out = str(tmp_path / "merged")
    assert merge_models.main(["--models", *paths, "--output", out, "--ratios", "0.5", "0.25", "0.25"]) == 0
    merged = load_file(out + ".safetensors")
    missing = next(k for k in base if k.startswith("model.diffusion_model.") and k.endswith("weight"))
    for k, v in base.items():
        if not v.is_floating_point():
            assert torch.equal(merged[k], v)
            continue
        factor = 0.5 + 0.25 * 2 + (0.25 if k == missing else -0.25)  # missing: the first model's value for its share
        torch.testing.assert_close(merged[k], v * factor, rtol=1e-5, atol=1e-6)
    with safe_open(out + ".safetensors", "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["ratios"] == [0.5, 0.25, 0.25]
    # default ratios 1/N; --unet_only keeps autoencoder and text encoder of the first model; saving precision
    out2 = str(tmp_path / "m2.safetensors")
    assert merge_models.main(["--models", paths[0], paths[1], "--output", out2, "--unet_only",
                              "--saving_precision", "fp16", "--precision", "bf16"]) == 0
    m2 = load_file(out2)
    vae = next(k for k in base if k.startswith("first_stage_model.") and base[k].is_floating_point())
    unet = next(k for k in base if k.startswith("model.diffusion_model.") and base[k].abs().sum() > 0)
    assert m2[vae].dtype == torch.float16
    torch.testing.assert_close(m2[vae].float(), base[vae].half().float())
    torch.testing.assert_close(m2[unet].float(), (base[unet] * 1.5).bfloat16().half().float(), rtol=1e-2, atol=1e-3)
    # the merged file still loads as a model
    from sd_scripts.models.loading import load_model

    assert load_model(out2).family == "sd1"  # noqa: family name in a test only


def test_merge_errors(three_models, tmp_path, capsys, caplog):
    _base, paths = three_models
    out = str(tmp_path / "x.safetensors")
    if not torch.cuda.is_available():  # --device reaches the computation
        assert merge_models.main(["--models", *paths, "--output", out, "--device", "cuda"]) == 1
        assert "--device cuda" in capsys.readouterr().err
    assert merge_models.main(["--models", *paths, "--output", out, "--ratios", "1"]) == 1
    assert merge_models.main(["--models", paths[0], str(tmp_path / "none.safetensors"), "--output", out]) == 1
    save_file({"model.diffusion_model.extra": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    assert merge_models.main(["--models", paths[0], str(tmp_path / "other.safetensors"), "--output", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--ratios" in err[0] and "none.safetensors" in err[1] and "other.safetensors" in err[2]
    assert not os.path.exists(out)
    # --show_skipped lists keys only a later model has
    t = load_file(paths[1])
    t["model.diffusion_model.only_here"] = torch.zeros(1)
    save_file(t, str(tmp_path / "extra.safetensors"), metadata={})
    import logging

    with caplog.at_level(logging.INFO):
        assert merge_models.main(["--models", paths[0], str(tmp_path / "extra.safetensors"), "--output", out,
                                  "--show_skipped"]) == 0
    assert "only_here" in caplog.text


def test_convert_part_file_family_round_trip(tmp_path):
    """A family whose single file is the denoiser alone (FLUX.1: plus --clip_l, --t5xxl, --ae): file -> diffusers
    folder (FluxPipeline reads it) -> file gives the same tensors."""
    from diffusers import FluxPipeline

    from sd_scripts.families import tiny_files
    from sd_scripts.tools.tiny_model import build_tiny_model

    build_tiny_model(str(tmp_path / "m"), "flux", layout="single")
    files = {k: str(tmp_path / "m" / v) for k, v in tiny_files("flux").items()}
    model = files.pop("pretrained_model_name_or_path")
    parts = [a for k, v in files.items() for a in (f"--{k}", v)]
    folder, back = str(tmp_path / "dif"), str(tmp_path / "back.safetensors")
    assert convert.main([model, folder, "--use_safetensors"]) == 1  # the parts are needed
    assert convert.main([model, folder, "--use_safetensors", *parts]) == 0
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    ours = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in ours.items())
    assert convert.main([folder, back]) == 0
    _same_tensors(model, back)
