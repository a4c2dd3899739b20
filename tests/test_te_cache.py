"""Text-encoder output cache: refusals with the reason, in-memory and on-disk caching, reuse and invalidation."""
from __future__ import annotations

import os
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts.data.captions import CaptionOptions
from sd_scripts.data.config_types import DatasetConfig, SubsetConfig
from sd_scripts.data.dataset import TrainDataset
from sd_scripts.options import OptionError
from sd_scripts.families.sd.sdxl import SDXLFamily as SDXLStrategy
from sd_scripts.training import te_cache
from sdxl_parts import PROJ, TE1, TE2, bundle_view, tiny_sdxl_parts


class OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def args(**values) -> Namespace:
    base = dict(cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=False, skip_cache_check=False,
                sample_prompts=None, shuffle_caption=False, caption_dropout_rate=0.0,
                caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_step=0,
                enable_wildcard=False)
    base.update(values)
    return Namespace(**base)


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_parts()


@pytest.fixture
def strategy(parts):
    return SDXLStrategy(bundle_view(parts))


def dataset(folder, captions, caption=None) -> TrainDataset:
    os.makedirs(folder, exist_ok=True)
    for i, text in enumerate(captions):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    subset = SubsetConfig(str(folder), num_repeats=1, class_tokens="sks", caption_extension=".txt",
                          caption=caption or CaptionOptions())
    return TrainDataset([DatasetConfig(resolution=(64, 64), batch_size=1, subsets=[subset])], seed=0)


@pytest.mark.parametrize("option,value", [("shuffle_caption", True), ("caption_dropout_rate", 0.1),
                                          ("caption_dropout_every_n_epochs", 3), ("caption_tag_dropout_rate", 0.2),
                                          ("token_warmup_step", 10), ("enable_wildcard", True)])
def test_varying_captions_are_refused_with_the_reason(option, value):
    with pytest.raises(OptionError) as e:
        te_cache.check_options(args(**{option: value}), trains_text_encoder=False)
    message = str(e.value)
    assert "\n" not in message and option in message and "cache_text_encoder_outputs" in message
    assert f"turn {option} off" in message


def test_trained_text_encoder_is_refused_with_the_fix():
    with pytest.raises(OptionError, match="frozen text encoders.*network_train_unet_only"):
        te_cache.check_options(args(), trains_text_encoder=True)
    te_cache.check_options(args(), trains_text_encoder=False)  # fine
    te_cache.check_options(args(cache_text_encoder_outputs=False, shuffle_caption=True), trains_text_encoder=True)


def test_dataset_subset_options_are_checked(tmp_path):
    ds = dataset(tmp_path / "1_sks", ["a, b"], CaptionOptions(shuffle=True))
    with pytest.raises(OptionError, match="shuffle_caption .*1_sks"):
        te_cache.check_dataset(ds, args())


def test_in_memory_cache_encodes_each_caption_once(tmp_path, strategy, monkeypatch):
    ds = dataset(tmp_path / "1_sks", ["a dog", "a cat", "a dog"])
    calls = []
    original = strategy.encode_ids
    monkeypatch.setattr(strategy, "encode_ids", lambda a, b: calls.append(a.shape[0]) or original(a, b))
    report = te_cache.cache_text_encoder_outputs(strategy, ds, args(), OneProcess())
    assert (report.captions, report.encoded, report.written) == (2, 2, 0) and calls == [2]
    assert not list((tmp_path / "1_sks").glob("*.npz"))
    cond = strategy.encode_captions(["a cat", "a dog"], train_text_encoder=False)
    assert calls == [2] and cond.hidden.shape == (2, 77, TE1 + TE2)


def test_text_encoder_batch_size_sets_the_caching_batches(tmp_path, strategy, monkeypatch):
    ds = dataset(tmp_path / "1_sks", ["a dog", "a cat", "a cow", "a hen", "a pig"])
    calls = []
    original = strategy.encode_ids
    monkeypatch.setattr(strategy, "encode_ids", lambda a, b: calls.append(a.shape[0]) or original(a, b))
    te_cache.cache_text_encoder_outputs(strategy, ds, args(text_encoder_batch_size=2), OneProcess())
    assert calls == [2, 2, 1]


def test_disk_cache_files_reuse_and_invalidation(tmp_path, parts):
    folder = tmp_path / "1_sks"
    ds = dataset(folder, ["a dog", "a cat"])
    a = args(cache_text_encoder_outputs_to_disk=True)
    first = SDXLStrategy(bundle_view(parts))
    report = te_cache.cache_text_encoder_outputs(first, ds, a, OneProcess())
    assert (report.encoded, report.written, report.reused) == (2, 2, 0)
    path = folder / "0_te_outputs.npz"
    with np.load(path) as data:
        assert data["hidden_state1"].shape == (77, TE1) and data["hidden_state2"].shape == (77, TE2)
        assert data["pool2"].shape == (PROJ,) and str(data["caption"]) == "a dog"
        assert data["hidden_state1"].dtype == np.float32
    expected = first.encode_captions(["a dog"], train_text_encoder=False)

    second = SDXLStrategy(bundle_view(parts))
    report = te_cache.cache_text_encoder_outputs(second, ds, a, OneProcess())
    assert (report.encoded, report.reused) == (0, 2)
    got = second.encode_captions(["a dog"], train_text_encoder=False)
    assert torch.allclose(got.hidden, expected.hidden) and torch.allclose(got.pooled, expected.pooled)

    (folder / "1.txt").write_text("a red cat")  # the caption changed: that file is re-made
    ds = dataset(folder, ["a dog", "a red cat"])
    report = te_cache.cache_text_encoder_outputs(SDXLStrategy(bundle_view(parts)), ds, a, OneProcess())
    assert (report.encoded, report.reused, report.written) == (1, 1, 1)

    longer = SDXLStrategy(bundle_view(parts), max_token_length=150)  # another token length: all re-made
    report = te_cache.cache_text_encoder_outputs(longer, ds, a, OneProcess())
    assert (report.encoded, report.reused) == (2, 0)


def test_changed_text_encoder_invalidates(tmp_path):
    folder = tmp_path / "1_sks"
    ds = dataset(folder, ["a dog"])
    a = args(cache_text_encoder_outputs_to_disk=True)
    te_cache.cache_text_encoder_outputs(SDXLStrategy(bundle_view(tiny_sdxl_parts(seed=0))), ds, a, OneProcess())
    other = SDXLStrategy(bundle_view(tiny_sdxl_parts(seed=1)))
    assert te_cache.cache_text_encoder_outputs(other, ds, a, OneProcess()).encoded == 1
    trusted = SDXLStrategy(bundle_view(tiny_sdxl_parts(seed=2)))
    report = te_cache.cache_text_encoder_outputs(trusted, ds, args(cache_text_encoder_outputs_to_disk=True,
                                                                   skip_cache_check=True), OneProcess())
    assert report.reused == 1


def test_a_family_without_the_cache_is_told_it_is_not_needed(tmp_path):
    from sd_scripts.families import family_spec

    class SDLike:
        bundle = None
        spec = family_spec("sd1")

    ds = dataset(tmp_path / "1_sks", ["a dog"])
    with pytest.raises(OptionError, match="not available for Stable Diffusion 1.x"):
        te_cache.cache_text_encoder_outputs(SDLike(), ds, args(), OneProcess())
