"""SDXL conditioning: both encoders' penultimate states, pooled te2 output, 75-token windows, time ids, memo."""
from __future__ import annotations

import pytest
import torch

from sd_scripts.families import family_class
from sd_scripts.families.base import NoisedLatents
from sd_scripts.families.sd.sdxl import SDXLConditioning, SDXLFamily as SDXLStrategy, clip_windows, join_windows
from sdxl_parts import PROJ, TE1, TE2, bundle_view, tiny_sdxl_parts

LONG = ", ".join(f"tag{i}" for i in range(120))


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_parts()


@pytest.fixture
def bundle(parts):
    return bundle_view(parts)


@pytest.mark.parametrize("max_len,width", [(None, 77), (150, 152), (225, 227)])
def test_shapes_and_windows(bundle, max_len, width):
    s = SDXLStrategy(bundle, max_token_length=max_len)
    cond = s.encode_captions(["short", LONG], train_text_encoder=False)
    assert cond.hidden.shape == (2, width, TE1 + TE2)
    assert cond.pooled.shape == (2, PROJ)


def test_hidden_states_are_both_penultimate_layers_and_pooled_is_te2_projection(bundle):
    s = SDXLStrategy(bundle)
    cond = s.encode_captions(["a photo of sks dog"], train_text_encoder=False)
    ids1 = bundle.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = bundle.tokenizer_2(["a photo of sks dog"], padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
    assert ids2[0, -1] == 0 and ids1[0, -1] == 49407  # te2 pads with 0, te1 with EOS
    with torch.no_grad():
        h1 = bundle.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = bundle.text_encoder_2(ids2, output_hidden_states=True)
    assert torch.allclose(cond.hidden[..., :TE1], h1, atol=1e-6)
    assert torch.allclose(cond.hidden[..., TE1:], out2.hidden_states[-2], atol=1e-6)
    assert torch.allclose(cond.pooled, out2.text_embeds, atol=1e-6)  # transformers' own pooling agrees here


def test_long_caption_pooled_comes_from_the_first_window(bundle):
    short_first = SDXLStrategy(bundle).encode_captions([LONG], train_text_encoder=False)  # truncated to 75
    windowed = SDXLStrategy(bundle, max_token_length=225).encode_captions([LONG], train_text_encoder=False)
    assert torch.allclose(windowed.pooled, short_first.pooled, atol=1e-6)
    assert torch.allclose(windowed.hidden[:, :76], short_first.hidden[:, :76], atol=1e-6)


def test_windows_of_the_zero_padded_tokenizer_end_with_pad_after_the_text(bundle):
    s = SDXLStrategy(bundle, max_token_length=150)
    ids1, ids2 = s.tokenize(["sks dog"])
    w2 = clip_windows(ids2, pad_id=0, eos_id=49407)
    assert [w.shape for w in w2] == [(1, 77), (1, 77)]
    assert w2[0][0, 0] == 49406 and w2[0][0, -1] == 0 and w2[1][0, -1] == 0
    w1 = clip_windows(ids1, pad_id=49407, eos_id=49407)
    assert all(w[0, -1] == 49407 for w in w1)
    long_ids = s.tokenize([LONG])[1]
    assert clip_windows(long_ids, pad_id=0, eos_id=49407)[0][0, -1] == 49407  # the text goes on: EOS
    states = [torch.full((1, 77, 1), float(i)) for i in range(3)]
    joined = join_windows(states)
    assert joined.shape == (1, 227, 1) and joined[0, 0, 0] == 0 and joined[0, -1, 0] == 2


def test_time_ids_follow_the_batch(bundle):
    batch = {"original_sizes_hw": [(96, 64), (64, 64)], "crop_top_lefts": [(16, 0), (0, 0)],
             "target_sizes_hw": [(64, 64), (64, 64)]}
    ids = SDXLStrategy.time_ids(batch)
    assert ids.tolist() == [[96, 64, 16, 0, 64, 64], [64, 64, 0, 0, 64, 64]]


def test_predict_passes_time_ids_and_pooled_to_the_unet(bundle):
    s = SDXLStrategy(bundle)
    cond = s.encode_captions(["a", "b"], train_text_encoder=False)
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    base = {"original_sizes_hw": [(64, 64)] * 2, "crop_top_lefts": [(0, 0)] * 2, "target_sizes_hw": [(64, 64)] * 2}
    other = dict(base, original_sizes_hw=[(64, 64), (1024, 512)])
    with torch.no_grad():
        a = s.predict(NoisedLatents(latents, t, latents), cond, base)
        b = s.predict(NoisedLatents(latents, t, latents), cond, other)
        expected = bundle.unet(latents, t, cond.hidden, added_cond_kwargs={
            "text_embeds": cond.pooled, "time_ids": SDXLStrategy.time_ids(base)}).sample
    assert a.shape == latents.shape and torch.allclose(a, expected)
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])  # per-sample size conditioning


def test_frozen_encodings_are_memoised_and_trained_ones_are_not(bundle, monkeypatch):
    s = SDXLStrategy(bundle)
    calls = []
    original = s.encode_ids
    monkeypatch.setattr(s, "encode_ids", lambda i1, i2: calls.append(i1.shape[0]) or original(i1, i2))
    first = s.encode_captions(["a", "b", "a"], train_text_encoder=False)
    second = s.encode_captions(["b", "a"], train_text_encoder=False)
    assert calls == [2]
    assert torch.equal(first.hidden[1], second.hidden[0]) and torch.equal(first.pooled[0], first.pooled[2])
    s.encode_captions(["a"], train_text_encoder=True)
    assert calls == [2, 1]


def test_release_text_encoders_keeps_every_caption(bundle):
    s = SDXLStrategy(bundle)
    before = s.encode_captions(["x"], train_text_encoder=False)
    assert s.release_text_encoders(["x", "y"])
    assert bundle.text_encoder is None and bundle.text_encoder_2 is None
    after = s.encode_captions(["y", "x"], train_text_encoder=False)
    assert torch.equal(after.hidden[1], before.hidden[0])
    with pytest.raises(RuntimeError, match="not encoded"):
        s.encode_captions(["z"], train_text_encoder=False)


def test_encode_images_and_conditioning_dtype(bundle):
    s = SDXLStrategy(bundle)
    latents = s.encode_images(torch.zeros(1, 3, 16, 16))
    assert latents.dtype == torch.float32 and latents.shape == (1, 4, 8, 8)
    assert s.spec.vae_scaling_factor == pytest.approx(0.13025)
    cond = SDXLConditioning(torch.zeros(1, 77, 8), torch.zeros(1, 4)).to(torch.float16)
    assert cond.hidden.dtype == cond.pooled.dtype == torch.float16


def test_the_registry_picks_sdxl(bundle):
    from types import SimpleNamespace

    s = family_class(bundle.family)(bundle, SimpleNamespace(clip_skip=2, max_token_length=150))
    assert isinstance(s, SDXLStrategy) and s.max_length == 152 and s.latent_cache_suffix == "_sdxl"
