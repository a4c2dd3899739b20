"""SD 1.x/2.x conditioning: 75-token windows for long captions, clip skip, memoised frozen encodings."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sd_scripts.models.loading import load_model
from sd_scripts.families.sd.sd import SDFamily as SDStrategy


@pytest.fixture(scope="module")
def bundle(tiny_sd1):
    return load_model(tiny_sd1.single_file)


LONG = ", ".join(f"tag{i}" for i in range(120))


@pytest.mark.parametrize("max_len,width", [(None, 77), (75, 77), (150, 152), (225, 227)])
def test_long_captions_are_encoded_in_windows(bundle, max_len, width):
    s = SDStrategy(bundle, max_token_length=max_len)
    out = s.encode_captions(["short", LONG], train_text_encoder=False)
    assert out.shape == (2, width, bundle.text_encoder.config.hidden_size)


def test_window_ids_start_with_bos_and_end_with_eos(bundle):
    s = SDStrategy(bundle, max_token_length=150)
    ids = s.tokenize([LONG])
    chunks = s._chunks(ids)
    assert len(chunks) == 2
    for chunk in chunks:
        assert chunk.shape == (1, 77)
        assert chunk[0, 0] == bundle.tokenizer.bos_token_id and chunk[0, -1] == bundle.tokenizer.eos_token_id
    # the first window's text equals the first 75 tokens of the caption
    assert torch.equal(chunks[0][0, 1:76], ids[0, 1:76])


def test_first_window_equals_plain_encoding_of_a_short_caption(bundle):
    plain = SDStrategy(bundle).encode_captions(["a photo of sks dog"], train_text_encoder=False)
    long = SDStrategy(bundle, max_token_length=150).encode_captions(["a photo of sks dog"], train_text_encoder=False)
    assert torch.allclose(long[:, :76], plain[:, :76], atol=1e-6)


def test_clip_skip_changes_the_states(bundle):
    a = SDStrategy(bundle).encode_captions(["sks dog"], train_text_encoder=False)
    b = SDStrategy(bundle, clip_skip=2).encode_captions(["sks dog"], train_text_encoder=False)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_frozen_encoder_outputs_are_memoised(bundle, monkeypatch):
    s = SDStrategy(bundle)
    calls = []
    original = s._encode_ids
    monkeypatch.setattr(s, "_encode_ids", lambda ids: calls.append(ids.shape[0]) or original(ids))
    first = s.encode_captions(["a", "b", "a"], train_text_encoder=False)
    second = s.encode_captions(["b", "a"], train_text_encoder=False)
    assert calls == [2]  # "a" and "b" once, never again
    assert torch.equal(first[1], second[0]) and torch.equal(first[0], first[2])
    trained = s.encode_captions(["a"], train_text_encoder=True)
    assert calls == [2, 1] and trained.shape == (1, 77, first.shape[-1])  # a trained encoder re-encodes


def test_released_text_encoder_serves_every_precomputed_caption(tiny_sd1):
    bundle = load_model(tiny_sd1.single_file)
    s = SDStrategy(bundle)
    expected = s.encode_captions(["sks dog", "ohwx cat"], train_text_encoder=False)
    fresh = SDStrategy(load_model(tiny_sd1.single_file))
    assert fresh.release_text_encoders(["ohwx cat", "sks dog"])
    assert fresh.bundle.text_encoder is None
    assert torch.equal(fresh.encode_captions(["sks dog", "ohwx cat"], train_text_encoder=False), expected)
