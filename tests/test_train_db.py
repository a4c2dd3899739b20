"""DreamBooth / full-model method units: prior-loss weighting of class images, text-encoder stop, dtypes, metadata,
option checks. The end-to-end runs are in test_train_db_e2e.py."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from sd_scripts.data.config_types import DatasetConfig, SubsetConfig
from sd_scripts.data.dataset import TrainDataset
from sd_scripts.options import OptionError, parse_args
from sd_scripts.training import noise as noise_math
from sd_scripts.training.full_methods import DreamBoothMethod, FineTuneMethod


def db_args(*extra: str, trainer: str = "db"):
    return parse_args(trainer, ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "out",
                                "--train_data_dir", "img", *extra])


def test_reg_samples_are_weighted_by_prior_loss_weight_in_the_loss(tmp_path):
    for folder, colour in (("inst", (200, 0, 0)), ("reg", (0, 0, 200))):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(tmp_path / folder / f"{i}.png")
    subsets = [SubsetConfig(image_dir=str(tmp_path / "inst"), class_tokens="sks dog"),
               SubsetConfig(image_dir=str(tmp_path / "reg"), class_tokens="dog", is_reg=True)]
    dataset = TrainDataset([DatasetConfig(resolution=(64, 64), batch_size=4, subsets=subsets)], seed=0,
                           prior_loss_weight=0.25)
    batch = dataset[0]
    is_reg = torch.tensor([os.path.basename(os.path.dirname(p)) == "reg" for p in batch["image_paths"]])
    assert is_reg.sum() == 2 and (~is_reg).sum() == 2
    assert batch["loss_weights"].tolist() == [0.25 if r else 1.0 for r in is_reg.tolist()]

    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    alphas = torch.linspace(0.99, 0.01, 1000)
    loss = noise_math.diffusion_loss(pred, target, torch.full((4,), 500), alphas, loss_weights=batch["loss_weights"])
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    expected = (per_sample * torch.where(is_reg, 0.25, 1.0)).mean()
    torch.testing.assert_close(loss, expected)
    unweighted = noise_math.diffusion_loss(pred, target, torch.full((4,), 500), alphas)
    assert not torch.allclose(loss, unweighted)


class _Bundle:
    def __init__(self):
        self.unet = self.denoiser = torch.nn.Linear(3, 3)
        self.text_encoder = torch.nn.Linear(3, 3)
        self.text_encoders = [self.text_encoder]
        self.vae = torch.nn.Linear(3, 3)


def test_text_encoder_trained_until_stop_step_then_frozen():
    method = DreamBoothMethod(db_args("--stop_text_encoder_training", "2", "--learning_rate_te", "1e-5"))
    bundle = _Bundle()
    groups, names = method.build(bundle, family="sd1")
    assert names == ["unet", "textencoder"] and groups[1]["lr"] == 1e-5
    assert [method.before_step(s) for s in range(4)] == [True, True, False, False]
    assert not any(p.requires_grad for p in bundle.text_encoder.parameters())
    assert all(p.requires_grad for p in bundle.unet.parameters())
    assert not any(p.requires_grad for p in bundle.vae.parameters())


@pytest.mark.parametrize("extra, trains_te", [((), True), (("--stop_text_encoder_training", "0"), False),
                                              (("--learning_rate_te", "0"), False)])
def test_dreambooth_text_encoder_rule(extra, trains_te):
    method = DreamBoothMethod(db_args(*extra))
    assert method.trains_text_encoder is trains_te
    groups, names = method.build(_Bundle(), family="sd1")
    assert names == (["unet", "textencoder"] if trains_te else ["unet"])


def test_fine_tune_trains_text_encoder_only_when_asked():
    assert not FineTuneMethod(db_args("--in_json", "m.json", trainer="finetune")).trains_text_encoder
    method = FineTuneMethod(db_args("--in_json", "m.json", "--train_text_encoder", trainer="finetune"))
    assert method.trains_text_encoder
    with pytest.raises(OptionError, match="in_json"):
        FineTuneMethod(db_args(trainer="finetune"))


def test_trained_weights_stay_float32_under_mixed_precision():
    method = DreamBoothMethod(db_args("--mixed_precision", "fp16", "--stop_text_encoder_training", "0"))
    assert method.module_dtype("denoiser", torch.float16) == torch.float32
    assert method.module_dtype("text_encoder", torch.float16) == torch.float16, "frozen: compute dtype"
    bf16 = DreamBoothMethod(db_args("--mixed_precision", "bf16", "--full_bf16"))
    assert bf16.module_dtype("denoiser", torch.bfloat16) == bf16.module_dtype("text_encoder", torch.bfloat16) \
        == torch.bfloat16


def test_sdxl_trains_both_text_encoders_and_saves_a_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sd_scripts.families.sd.tiny import build_tiny_bundle

    bundle = build_tiny_bundle("sdxl", seed=0)
    method = DreamBoothMethod(db_args("--stop_text_encoder_training", "1", "--learning_rate_te", "1e-5",
                                      "--save_model_as", "diffusers_safetensors"))
    groups, names = method.build(bundle, family="sdxl")
    te_params = [p for te in bundle.text_encoders for p in te.parameters()]
    assert names == ["unet", "textencoder"] and groups[1]["lr"] == 1e-5
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in te_params} and len(bundle.text_encoders) == 2
    assert all(p.requires_grad for p in te_params)
    assert set(method.trainable_module().keys()) == {"unet", "text_encoder", "text_encoder_2"}
    assert [method.before_step(s) for s in range(3)] == [True, False, False]
    assert not any(p.requires_grad for p in te_params), "both text encoders frozen at the stop step"
    assert method.module_dtype("text_encoder", torch.bfloat16) == torch.float32

    with torch.no_grad():
        bundle.text_encoder_2.text_projection.weight.add_(0.5)
    method.save(method.trainable_module(), str(tmp_path / "db"), dtype=None, metadata={})
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "db"), local_files_only=True)
    torch.testing.assert_close(pipe.text_encoder_2.text_projection.weight, bundle.text_encoder_2.text_projection.weight)
    meta = method.metadata({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_network_dim": "4"})
    assert meta == {"modelspec.architecture": "stable-diffusion-xl-v1-base",
                    "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}


def test_option_clashes_are_refused():
    with pytest.raises(OptionError, match="reg_data_dir"):
        DreamBoothMethod(db_args("--num_class_images", "4"))
    from sd_scripts.training.fused_backward import check_fused_backward_options  # (every trainer checks it at start)

    with pytest.raises(OptionError, match="gradient_accumulation_steps"):
        check_fused_backward_options(db_args("--fused_backward_pass", "--gradient_accumulation_steps", "2"))
    with pytest.raises(OptionError, match="full_bf16"):
        DreamBoothMethod(db_args("--full_bf16"))
    with pytest.raises(OptionError, match="full_fp16"):
        DreamBoothMethod(db_args("--full_fp16", "--mixed_precision", "fp16"))


def test_metadata_and_names_of_a_full_model():
    method = DreamBoothMethod(db_args())
    meta = method.metadata({"modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation":
                            "diffusers", "ss_network_module": "networks.lora", "ss_network_dim": "4",
                            "ss_learning_rate": "1e-06"})
    assert meta == {"modelspec.architecture": "stable-diffusion-v1", "modelspec.implementation":
                    "https://github.com/Stability-AI/generative-models", "ss_learning_rate": "1e-06"}
    assert method.file_extension() == ".safetensors"
    assert DreamBoothMethod(db_args("--save_model_as", "diffusers_safetensors")).file_extension() == ""
    assert DreamBoothMethod(db_args("--save_model_as", "ckpt")).file_extension() == ".ckpt"


def check_bundled_presets(kind: str, trainer: str, method_class, tmp_path, **paths: str) -> list[str]:
    """Every bundled preset of `kind` stores only changed keys, loads without unknown keys, builds a command whose
    run TOML the trainer parses, and the method accepts the options (`paths`: values for the paths a preset leaves
    to the user). Returns the preset names."""
    import json
    import os

    from kohya_gui import presets
    from kohya_gui.command import build_command, split_accelerate
    from sd_scripts import options

    folder = os.path.join(presets.BUNDLED_DIR, kind)
    for entry in os.listdir(folder):
        with open(os.path.join(folder, entry), encoding="utf-8") as f:
            data = json.load(f)
        assert data["schema_version"] == presets.SCHEMA_VERSION and data["kind"] == kind
        for key, value in data["values"].items():
            if key in options.BY_NAME:
                assert value != options.BY_NAME[key].default, (entry, key)
    names = presets.list_presets(kind, user_dir=str(tmp_path / "user"))
    for name in names:
        values = presets.load_preset(kind, name, user_dir=str(tmp_path / "user"), demo_dir=str(tmp_path / "demo"),
                                     make_demo=False)
        assert values.unknown_keys == [], (name, values.unknown_keys)
        needed = dict(pretrained_model_name_or_path="m.safetensors", train_data_dir="img", output_dir="out", **paths)
        values = dict(values, **{k: values[k] or v for k, v in needed.items()})
        rest, accel = split_accelerate(values)
        cmd = build_command(kind, rest, accel, str(tmp_path / "job" / name.replace(" ", "_")))
        toml = tmp_path / "run.toml"
        toml.write_text(cmd.toml_text)
        method_class(parse_args(trainer, ["--config_file", str(toml)]))
    return names


def test_bundled_dreambooth_presets(tmp_path):
    names = check_bundled_presets("dreambooth", "db", DreamBoothMethod, tmp_path)
    assert {"SD1.5 DreamBooth", "Demo (tiny model, CPU)"} <= set(names)
