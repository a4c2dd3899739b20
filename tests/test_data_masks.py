"""Loss masks: masked_loss with mask images (conditioning_data_dir), alpha_mask, the latent cache that holds them,
and the loss that a masked pixel does not reach (training/loss.py apply_loss_mask, as sd-scripts' apply_masked_loss).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts.data.config_types import DatasetConfig, SubsetConfig
from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.dataset_config import load_datasets
from sd_scripts.errors import DatasetError
from sd_scripts.options import parse_args
from sd_scripts.training.loss import training_loss

pytestmark = pytest.mark.timeout(300)


def half_mask(path, size=(64, 64), right_white=True):
    """A mask image: the right half white (trained), the left half black (ignored)."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2:] = 255 if right_white else 0
    Image.fromarray(mask, "L").save(path)


@pytest.fixture()
def masked_data(tmp_path):
    """train/1_sks dog with two 64x64 images; masks/1_sks dog with their half masks."""
    train, masks = tmp_path / "train" / "1_sks dog", tmp_path / "masks" / "1_sks dog"
    train.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i, colour in enumerate([(200, 40, 40), (40, 200, 90)]):
        Image.new("RGB", (64, 64), colour).save(train / f"{i}.png")
        half_mask(masks / f"{i}.png")
    return tmp_path


def folder_args(root, *extra):
    return parse_args("network", ["--pretrained_model_name_or_path", "x", "--output_dir", str(root / "out"),
                                  "--train_data_dir", str(root / "train"), "--resolution", "64", *extra])


# ---------------------------------------------------------------- the loss
def test_masked_pixels_get_no_gradient_and_the_loss_follows_the_formula():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 64, 64)
    mask[:, :, 32:] = 1.0  # right half trained
    mask[1, :8, 32:40] = 0.5  # one latent pixel of sample 1 half weighted (8x8 pixels area-averaged)
    loss = training_loss(pred, target, torch.tensor([1.0, 2.0]), mask=mask)
    loss.backward()
    assert float(pred.grad[:, :, :, :4].abs().max()) == 0.0  # masked: no gradient
    assert float(pred.grad[:, :, :, 4:].abs().min()) > 0.0
    latent_mask = torch.zeros(2, 1, 8, 8)
    latent_mask[:, :, :, 4:] = 1.0
    latent_mask[1, :, 0, 4] = 0.5
    expected = (((pred - target) ** 2 * latent_mask).mean(dim=(1, 2, 3)) * torch.tensor([1.0, 2.0])).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(training_loss(pred, target, torch.tensor([1.0, 2.0]))) != pytest.approx(float(loss), rel=1e-3)


# ---------------------------------------------------------------- the dataset
def test_mask_images_follow_crop_and_flip(masked_data):
    configs = load_datasets(folder_args(masked_data, "--masked_loss", "--conditioning_data_dir",
                                        str(masked_data / "masks")), 64)
    assert configs[0].subsets[0].conditioning_data_dir == str(masked_data / "masks" / "1_sks dog")
    batch = TrainDataset(configs, seed=0)[0]
    masks = batch["loss_masks"]
    assert masks.shape == (1, 64, 64)
    assert float(masks[0, :, :32].max()) == 0.0 and float(masks[0, :, 32:].min()) == 1.0
    flipped = replace_subsets(configs, flip_aug=True)
    ds = TrainDataset(flipped, seed=0)
    seen = set()
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            b = ds[i]
            left_white = float(b["loss_masks"][0, :, :32].mean()) == 1.0
            assert left_white == b["flipped"][0]  # the mask is mirrored with the image
            seen.add(left_white)
    assert seen == {True, False}


def replace_subsets(configs, **changes):
    from dataclasses import replace

    return [replace(ds, subsets=[replace(s, **changes) for s in ds.subsets]) for ds in configs]


def test_mask_options_are_checked(masked_data, tmp_path):
    with pytest.raises(DatasetError, match="masked_loss"):  # masks without masked_loss
        load_datasets(folder_args(masked_data, "--conditioning_data_dir", str(masked_data / "masks")), 64)
    with pytest.raises(DatasetError, match="no masks"):  # masked_loss without masks
        load_datasets(folder_args(masked_data, "--masked_loss"), 64)
    os.remove(masked_data / "masks" / "1_sks dog" / "1.png")
    configs = load_datasets(folder_args(masked_data, "--masked_loss", "--conditioning_data_dir",
                                        str(masked_data / "masks")), 64)
    with pytest.raises(DatasetError, match=r"no mask for 1\.png"):
        TrainDataset(configs, seed=0)
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{masked_data / 'train' / '1_sks dog'}'\n"
                    f"conditioning_data_dir = '{masked_data / 'masks' / '1_sks dog'}'\nalpha_mask = true\n")
    with pytest.raises(DatasetError, match="alpha_mask and conditioning_data_dir"):
        load_datasets(folder_args(masked_data, "--dataset_config", str(toml), "--masked_loss"), 64)


def test_cache_holds_the_mask_and_a_changed_mask_is_re_made(masked_data):
    configs = load_datasets(folder_args(masked_data, "--masked_loss", "--conditioning_data_dir",
                                        str(masked_data / "masks")), 64)
    encode = lambda images: images[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4]  # noqa: E731 - a stand-in VAE
    ds = TrainDataset(configs, seed=0)
    report = ds.cache_latents(encode, vae_id="v", to_disk=True, batch_size=2)
    assert report.encoded == 2
    npz = masked_data / "train" / "1_sks dog" / "0_0064x0064_sd.npz"
    with np.load(npz) as data:
        assert data["alpha_mask"].shape == (64, 64) and float(data["alpha_mask"][:, :32].max()) == 0.0
        assert str(data["mask_source"]).startswith("file:")
    assert float(ds[0]["loss_masks"][0, :, :32].max()) == 0.0 and "latents" in ds[0]
    again = TrainDataset(configs, seed=0)
    assert again.cache_latents(encode, vae_id="v", to_disk=True, batch_size=2).reused == 2
    assert torch.equal(again.records[0].mask, ds.records[0].mask)
    half_mask(masked_data / "masks" / "1_sks dog" / "0.png", right_white=False)  # the mask changes
    changed = TrainDataset(configs, seed=0)
    report = changed.cache_latents(encode, vae_id="v", to_disk=True, batch_size=2)
    assert (report.encoded, report.reused) == (1, 1)
    rec = next(r for r in changed.records if r.path.endswith("0.png"))
    assert float(rec.mask.max()) == 0.0
    # the same files are not valid for a run without masks' source being the alpha channel
    alpha = TrainDataset(replace_subsets(configs, conditioning_data_dir=None, alpha_mask=True), seed=0)
    assert alpha.cache_latents(encode, vae_id="v", to_disk=True, batch_size=2).reused == 0


def test_alpha_mask_reaches_the_batch_from_the_cache(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[:, :, 3] = 255
    pixels[:16, :, 3] = 0  # top rows transparent
    Image.fromarray(pixels, "RGBA").save(folder / "a.png")
    ds = TrainDataset([DatasetConfig(resolution=(64, 64), subsets=[SubsetConfig(str(folder), alpha_mask=True)])],
                      seed=0)
    ds.cache_latents(lambda x: x[:, :, ::8, ::8], vae_id="v", to_disk=False, batch_size=1)
    mask = ds[0]["loss_masks"][0]
    assert float(mask[:16].max()) == 0.0 and float(mask[16:].min()) == 1.0


# ---------------------------------------------------------------- through the trainer's step
def test_training_step_gives_masked_pixels_no_gradient(tiny_sd1, masked_data):
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    args = folder_args(masked_data, "--masked_loss", "--conditioning_data_dir", str(masked_data / "masks"),
                       "--train_batch_size", "2", "--cache_latents", "--seed", "1", "--max_train_steps", "1")
    args.pretrained_model_name_or_path = tiny_sd1.diffusers_dir
    trainer = Trainer(args, NetworkMethod(args))
    for step in ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents",
                 "cache_text_encoder_outputs", "build_method", "release_unused_models", "create_optimizer",
                 "prepare"):
        getattr(trainer, step)()
    batch = next(iter(trainer.loader))
    unet = trainer.bundle.denoiser
    original = unet.forward
    preds = []

    def recording_forward(*a, **k):
        out = original(*a, **k)
        pred = out[0] if isinstance(out, tuple) else out.sample
        pred.retain_grad()
        preds.append(pred)
        return out

    unet.forward = recording_forward
    try:
        trainer.training_step(batch)
    finally:
        del unet.forward
    grad = preds[0].grad
    assert grad is not None and grad.shape[-1] == 8
    assert float(grad[..., :4].abs().max()) == 0.0 and float(grad[..., 4:].abs().min()) > 0.0
