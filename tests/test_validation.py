"""The validation loss (training/validation.py): held-out images, fixed timesteps and noise, no trace on training.

The real `Trainer` runs in-process on the tiny SD 1.x model: its set-up steps only for the loss's own properties,
and two whole 2-step runs (with and without validation) to show that validation leaves training unchanged and
reaches the event stream and TensorBoard under sd-scripts' tags.
"""
from __future__ import annotations

import inspect
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts.data.config_types import DatasetConfig, SubsetConfig
from sd_scripts.data.dataset import TrainDataset
from sd_scripts.options import OptionError, parse_args
from sd_scripts.training.events import read_events
from sd_scripts.training.loop import Trainer
from sd_scripts.training.methods import NetworkMethod
from sd_scripts.training.validation import validation_timesteps

pytestmark = pytest.mark.timeout(300)

VAE_SCALE = 0.18215
SET_UP = ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents",
          "cache_text_encoder_outputs", "build_method", "release_unused_models", "create_optimizer", "prepare")


def alphas_cumprod() -> torch.Tensor:
    """SD 1.x's scaled_linear DDPM schedule."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """Five distinct 64x64 images in '1_sks dog'."""
    root = tmp_path_factory.mktemp("val_data")
    folder = root / "1_sks dog"
    os.makedirs(folder)
    for i in range(5):
        image = Image.new("RGB", (64, 64), (50 * i, 200 - 40 * i, 90))
        image.paste((255 - 50 * i, 128, 30), (4 + 8 * i, 8, 30 + 8 * i, 48))
        image.save(folder / f"{i}.png")
    return str(root)


def arguments(model: str, data: str, out, *options: str):
    return parse_args("network", [
        "--pretrained_model_name_or_path", model, "--output_dir", str(out), "--train_data_dir", data,
        "--resolution", "64", "--train_batch_size", "2", "--cache_latents", "--seed", "3", "--max_train_steps", "2",
        "--learning_rate", "1e-2", *options])


def set_up(model: str, data: str, out, *options: str, until: str = "prepare") -> Trainer:
    args = arguments(model, data, out, *options)
    trainer = Trainer(args, NetworkMethod(args))
    for step in SET_UP[:SET_UP.index(until) + 1]:
        getattr(trainer, step)()
    return trainer


def rng_states(trainer: Trainer) -> list:
    return [torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(),
            trainer.noise_rng.generator.get_state()]


def test_validation_timesteps_follow_sd_scripts():
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]
    assert validation_timesteps(100, 600) == [200, 300, 400, 500]


def test_split_sizes_and_seeding(tmp_path):
    folder = tmp_path / "3_x"
    os.makedirs(folder)
    for i in range(10):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"{i}.png")
    reg = tmp_path / "reg" / "1_y"
    os.makedirs(reg)
    Image.new("RGB", (64, 64)).save(reg / "r.png")

    def split(fraction, seed, dataset_seed=0):
        config = DatasetConfig(resolution=(64, 64), validation_split=fraction, validation_seed=seed,
                               subsets=[SubsetConfig(str(folder), num_repeats=3), SubsetConfig(str(reg), is_reg=True)])
        train = TrainDataset([config], seed=dataset_seed)
        val = TrainDataset([config], seed=dataset_seed, split="validation")
        return {r.path for r in train.records}, {r.path for r in val.records}, train, val

    train, val, train_ds, val_ds = split(0.25, 1)
    assert len(val) == 2 and len(train) == 9 and not train & val  # 8 images + the (never split) reg image
    assert str(reg / "r.png") in train and len(val_ds.draws[0]) == 2  # validation images once each, no repeats
    assert split(0.25, 1)[1] == val  # same seed: same images
    assert any(split(0.25, s)[1] != val for s in (2, 3, 4))  # validation_seed picks them
    assert split(0.25, None, dataset_seed=5)[1] == split(0.25, None, dataset_seed=5)[1]  # else the run's seed
    assert len(split(0.35, 1)[1]) == 4  # sd-scripts' count: round(10 * 0.35)
    with pytest.raises(OptionError, match="validation_split"):
        parse_args("network", ["--validation_split", "1.0"])


def test_command_line_split_reaches_the_datasets_and_toml_wins(tmp_path, images):
    from sd_scripts.data.dataset_config import load_datasets

    args = arguments("m", images, tmp_path, "--validation_split", "0.4", "--validation_seed", "9")
    (ds,) = load_datasets(args, bucket_step_default=64)
    assert (ds.validation_split, ds.validation_seed) == (0.4, 9)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nvalidation_split = 0.2\n[[datasets.subsets]]\nimage_dir = "{images}/1_sks dog"\n')
    (ds,) = load_datasets(arguments("m", images, tmp_path, "--validation_split", "0.4", "--dataset_config",
                                    str(toml)), bucket_step_default=64)
    assert (ds.validation_split, ds.validation_seed) == (0.2, None)


def test_validation_loss_fixed_timesteps_and_noise_without_touching_training(tiny_sd1, images, tmp_path):
    trainer = set_up(tiny_sd1.diffusers_dir, images, tmp_path / "out", "--validation_split", "0.4",
                     "--validation_seed", "7", "--min_timestep", "100", "--max_timestep", "600",
                     "--network_dropout", "0.5", "--train_batch_size", "1")
    validation = trainer.validation
    assert len(validation.dataset.records) == 2 and len(trainer.dataset.records) == 3
    assert validation.timesteps == [200, 300, 400, 500] and validation.seed == 7

    unet, network = trainer.bundle.denoiser, trainer.module
    original, signature = unet.forward, inspect.signature(unet.forward)
    calls = []

    def recording_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        pred = out[0] if isinstance(out, tuple) else out.sample
        calls.append((bound["sample"].detach().clone(), torch.as_tensor(bound["timestep"]).clone(),
                      pred.detach().clone(), network.training, torch.is_grad_enabled()))
        return out

    network.train()
    before = rng_states(trainer)
    unet.forward = recording_forward
    try:
        first = validation.evaluate(trainer.batch_loss, network, trainer.accelerator)
        second = validation.evaluate(trainer.batch_loss, network, trainer.accelerator)
    finally:
        del unet.forward
    after = rng_states(trainer)
    assert first == second, "two validations of the same weights differ"
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    assert torch.equal(before[3], after[3]), "validation drew from the training noise generator"
    assert network.training and not any(c[3] or c[4] for c in calls), "not in eval mode / under no_grad"

    # the first validation by hand: each batch i at each timestep, noise from a generator seeded validation_seed + i
    a = alphas_cumprod()
    losses = []
    assert validation.num_batches == 2 and len(calls) == 2 * 2 * 4
    for index in range(2):
        x0 = validation.dataset[index]["latents"].float() * VAE_SCALE
        generator = torch.Generator().manual_seed(7 + index)
        for (noisy, t, pred, *_), timestep in zip(calls[4 * index:4 * index + 4], validation.timesteps):
            noise = torch.randn(x0.shape, generator=generator)
            assert torch.equal(t.cpu(), torch.full((1,), timestep))
            torch.testing.assert_close(noisy, a[timestep].sqrt() * x0 + (1 - a[timestep]).sqrt() * noise)
            losses.append(float(((pred - noise) ** 2).mean()))
    assert first == pytest.approx(sum(losses) / 8, rel=1e-5)

    with torch.no_grad():  # other weights, another loss: the number follows the weights
        next(p for p in network.parameters() if p.abs().sum() == 0).add_(0.5)
    assert validation.evaluate(trainer.batch_loss, network, trainer.accelerator) != first


def lora(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_run_with_validation_trains_exactly_like_one_without(tiny_sd1, images, tmp_path):
    common = ("--validation_split", "0.4", "--network_dropout", "0.3", "--network_args", "rank_dropout=0.2",
              "--validation_seed", "11")
    plain = arguments(tiny_sd1.diffusers_dir, images, tmp_path / "plain", *common, "--validate_every_n_epochs", "9")
    assert Trainer(plain, NetworkMethod(plain)).run() == "completed"
    events = tmp_path / "events.jsonl"
    validated = arguments(tiny_sd1.diffusers_dir, images, tmp_path / "val", *common, "--validate_every_n_steps", "1",
                          "--events_file", str(events), "--logging_dir", str(tmp_path / "logs"))
    assert Trainer(validated, NetworkMethod(validated)).run() == "completed"

    a, b = lora(tmp_path / "plain" / "last.safetensors"), lora(tmp_path / "val" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "validation changed the training"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_up" in k)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "val" / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_validation_images"], meta["ss_validation_split"], meta["ss_validate_every_n_steps"]) == \
        ("2", "0.4", "1")

    found = [e for e in read_events(str(events)) if e["type"] == "validation"]
    assert [(e["kind"], e["step"], e["epoch"]) for e in found] == [("step", 1, 1), ("step", 2, 1), ("epoch", 2, 1)]
    assert found[0]["loss"] != found[1]["loss"] and found[1]["loss"] == found[2]["loss"]  # same weights at the end
    assert found[0]["timesteps"] == [200, 400, 600, 800] and found[0]["divergence"] is not None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = [str(p) for p in (tmp_path / "logs").rglob("events.out.tfevents*")]
    tags = {}
    for file in files:
        acc = EventAccumulator(file)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags[tag] = [(s.step, s.value) for s in acc.Scalars(tag)]
    assert [s for s, _ in tags["loss/validation/step_average"]] == [1, 2]
    assert tags["loss/validation/step_average"][0][1] == pytest.approx(found[0]["loss"], rel=1e-6)
    assert [s for s, _ in tags["loss/validation/epoch_average"]] == [1]  # logged at step = epoch
    assert "loss/validation/step_divergence" in tags and "loss/validation/epoch_divergence" in tags


def test_validation_options_without_held_out_images_warn(tiny_sd1, images, tmp_path):
    trainer = set_up(tiny_sd1.diffusers_dir, images, tmp_path, "--validate_every_n_steps", "5",
                     "--events_file", str(tmp_path / "e.jsonl"), until="load_dataset")
    assert trainer.validation is None
    warnings = [e["message"] for e in read_events(str(tmp_path / "e.jsonl")) if e["type"] == "warning"]
    assert any("validate_every_n_steps" in w and "validation_split" in w for w in warnings)
