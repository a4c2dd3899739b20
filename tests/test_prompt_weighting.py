"""weighted_captions and sample prompts: the (word:1.3) / [word] syntax, and the text encoder's states scaled by the
token weights (states x weight per token) in training captions of SD 1.x/2.x and SDXL and in their sample prompts,
which are encoded like training captions in 75-token windows (up to 225 tokens)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sd_scripts.families.prompt_weighting import DOWN, UP, parse_weights, tokenize_weighted

LONG = ", ".join(f"tag{i}" for i in range(28))  # about 90 tokens: two windows


def test_parse_weights_follows_the_syntax():
    assert parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", pytest.approx(1.3 * UP * UP)), (" ", UP), ("on", pytest.approx(UP * DOWN)),
        (" a ", UP), ("hill", pytest.approx(0.5 * UP)), (", sun, ", UP), ("sky", pytest.approx(UP ** 4)), (".", UP)]
    assert parse_weights(r"\(literal\] (unclosed") == [("(literal] ", 1.0), ("unclosed", UP)]
    assert parse_weights("no brackets: here") == [("no brackets: here", 1.0)]


@pytest.fixture(scope="module")
def sd1_bundle(tiny_sd1):
    from sd_scripts.models.loading import load_model

    return load_model(tiny_sd1.single_file)


def sd_family(bundle, weighted, max_token_length=150):
    from sd_scripts.families.sd.sd import SDFamily

    from sd_scripts.options import parse_args

    argv = (["--weighted_captions"] if weighted else []) + (["--max_token_length", str(max_token_length)]
                                                            if max_token_length else [])
    return SDFamily(bundle, parse_args("network", argv))


def token_weights(tokenizer, weighted_text, plain_text, length):
    """The weights of `weighted_text`'s tokens, checking that its ids are those of the plain text."""
    ids, weights = tokenize_weighted(tokenizer, [weighted_text], length)
    plain = tokenizer([plain_text], padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt").input_ids
    assert torch.equal(ids, plain)
    return weights


def test_sd_weighted_captions_scale_each_token_state(sd1_bundle):
    weighted_text = f"a photo of (sks:1.5) dog, {LONG}, [[blurry]]"
    plain_text = f"a photo of sks dog, {LONG}, blurry"
    plain = sd_family(sd1_bundle, False).encode_captions([plain_text], train_text_encoder=False)
    family = sd_family(sd1_bundle, True)
    got = family.encode_captions([weighted_text], train_text_encoder=False)
    weights = token_weights(sd1_bundle.tokenizer, weighted_text, plain_text, 152)
    assert sorted(set(weights[0].tolist())) == pytest.approx([DOWN * DOWN, 1.0, 1.5])
    assert int((weights[0, 77:] != 1).sum()) > 0, "precondition: a weighted token lies in the second window"
    torch.testing.assert_close(got, plain * weights[..., None], rtol=1e-5, atol=1e-6)
    # without weights in the text the weighted path is the plain one
    torch.testing.assert_close(family.encode_captions([plain_text], train_text_encoder=False), plain)


def test_sd_sample_prompts_are_weighted_and_chunked(sd1_bundle):
    family = sd_family(sd1_bundle, False, max_token_length=None)  # training: 75 tokens
    prompt, plain_prompt = f"(sks:1.2) dog, {LONG}", f"sks dog, {LONG}"
    pipe = family.sample_pipeline("ddim")
    from sd_scripts.training.sampling import SamplePrompt

    inputs = pipe.inputs(SamplePrompt(prompt, negative_prompt="blurry"), "cpu")
    cond, uncond = inputs["prompt_embeds"], inputs["negative_prompt_embeds"]
    assert cond.shape[1] == 152 and uncond.shape == cond.shape  # two windows, not cut at 77
    plain = sd_family(sd1_bundle, False).encode_captions([plain_prompt, "blurry"], train_text_encoder=False)
    weights = token_weights(sd1_bundle.tokenizer, prompt, plain_prompt, 152)
    torch.testing.assert_close(cond, plain[:1] * weights[..., None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond, plain[1:], rtol=1e-5, atol=1e-6)


def test_sdxl_weighted_captions_scale_both_encoders_and_keep_pooled():
    from sd_scripts.families.sd.sdxl import SDXLFamily
    from sdxl_parts import bundle_view, tiny_sdxl_parts

    bundle = bundle_view(tiny_sdxl_parts())
    bundle.scheduler_config = {"num_train_timesteps": 1000, "prediction_type": "epsilon"}
    plain_text, weighted_text = "a photo of sks dog", "a photo of (sks dog:0.5)"
    plain = SDXLFamily(bundle).encode_captions([plain_text], train_text_encoder=False)
    weighted = SDXLFamily(bundle, SimpleNamespace(weighted_captions=True, max_token_length=None, clip_skip=None))
    got = weighted.encode_captions([weighted_text], train_text_encoder=False)
    w1 = token_weights(bundle.tokenizer, weighted_text, plain_text, 77)
    w2 = token_weights(bundle.tokenizer_2, weighted_text, plain_text, 77)
    width = bundle.text_encoder.config.hidden_size
    assert float(w1.min()) == 0.5
    torch.testing.assert_close(got.hidden[..., :width], plain.hidden[..., :width] * w1[..., None])
    torch.testing.assert_close(got.hidden[..., width:], plain.hidden[..., width:] * w2[..., None])
    torch.testing.assert_close(got.pooled, plain.pooled)
    inputs = weighted.sample_pipeline("euler").inputs(SimpleNamespace(prompt=weighted_text, negative_prompt=""),
                                                      "cpu")
    torch.testing.assert_close(inputs["prompt_embeds"], got.hidden)
    torch.testing.assert_close(inputs["pooled_prompt_embeds"], got.pooled)


def test_families_without_weighted_captions_refuse_the_option():
    from sd_scripts.families import all_families, check_run

    others = [name for name, spec in all_families().items() if not spec.accepts_option("weighted_captions")]
    assert others, "precondition: some family has no weighted captions"
    for name in others:
        message = check_run(name, trainer="network", script=None, values={"weighted_captions": True})
        assert message and "weighted_captions" in message
