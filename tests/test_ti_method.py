"""sd_scripts.training.ti_method: new tokens, their initialisation, training only their rows, captions, saving."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from sd_scripts.models.loading import load_model
from sd_scripts.networks.embeddings import load_embedding, save_embedding
from sd_scripts.options import OptionError, parse_args
from sd_scripts.families.sd.sd import SDFamily as SDStrategy
from sd_scripts.training.sampling import SamplePrompt
from sd_scripts.training.ti_method import (TextualInversionMethod, check_new_token, init_token_ids, token_names)
from sd_scripts.training.ti_templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, fill_templates


def make_args(tmp_path, *extra: str):
    return parse_args("ti", ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path),
                             "--train_data_dir", str(tmp_path), "--seed", "0", *extra])


@pytest.fixture
def bundle(tiny_sd1):
    return load_model(tiny_sd1.single_file)


def build(bundle, args):
    method = TextualInversionMethod(args)
    groups, names = method.build(bundle, family=bundle.family)
    return method, groups


def encode(bundle, caption: str, grad: bool = False) -> torch.Tensor:
    return SDStrategy(bundle).encode_captions([caption], train_text_encoder=grad)


def test_token_names_and_init_ids(bundle):
    assert token_names("mychar", 3) == ["mychar", "mychar1", "mychar2"]
    tok = bundle.tokenizer
    dog = tok("dog", add_special_tokens=False).input_ids
    assert init_token_ids(tok, "dog", 3) == dog * 3
    two = tok("red dog", add_special_tokens=False).input_ids
    assert init_token_ids(tok, "red dog", 3) == [two[0], two[1], two[0]]
    with pytest.raises(OptionError, match="init_word.*2 tokens but num_vectors_per_token is 1"):
        init_token_ids(tok, "red dog", 1)


@pytest.mark.parametrize("word", ["dog", "sks", "<|endoftext|>"])
def test_existing_words_are_refused(bundle, word):
    with pytest.raises(OptionError, match="already a token"):
        check_new_token(bundle.tokenizer, word)
    check_new_token(bundle.tokenizer, "mychar")


def test_build_adds_tokens_initialised_from_the_init_word(tmp_path, bundle):
    table_before = bundle.text_encoder.get_input_embeddings().weight.detach().clone()
    plain = encode(bundle, "a photo of mychar")
    method, groups = build(bundle, make_args(tmp_path, "--token_string", "mychar", "--init_word", "dog",
                                             "--num_vectors_per_token", "2"))
    tok, te = bundle.tokenizer, bundle.text_encoder
    ids = tok.convert_tokens_to_ids(["mychar", "mychar1"])
    assert ids == [49408, 49409] and len(tok) == 49410
    table = te.get_input_embeddings().weight
    assert table.shape[0] == 49410 and not table.requires_grad
    dog = tok("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(table[ids[0]], table_before[dog]) and torch.equal(table[ids[1]], table_before[dog])
    [vectors] = groups[0]["params"]
    assert vectors.shape == (2, te.config.hidden_size) and vectors.requires_grad
    assert all(not p.requires_grad for p in te.parameters())
    assert all(not p.requires_grad for p in bundle.unet.parameters())
    # the token now encodes as its own rows, not as the BPE pieces of 'mychar'
    assert not torch.allclose(encode(bundle, "a photo of mychar mychar1"), plain)


def test_training_moves_only_the_new_rows(tmp_path, bundle):
    method, groups = build(bundle, make_args(tmp_path, "--token_string", "mychar", "--init_word", "dog",
                                             "--num_vectors_per_token", "2"))
    te = bundle.text_encoder
    table_before = te.get_input_embeddings().weight.detach().clone()
    params_before = {n: p.detach().clone() for n, p in te.named_parameters()}
    optimizer = torch.optim.AdamW(groups[0]["params"], lr=1e-2, weight_decay=0.01)
    captions = method.captions(["a photo of mychar, red circle", "mychar on grass"])
    assert captions[0] == "a photo of mychar mychar1, red circle"
    for step in range(3):
        out = encode(bundle, captions[step % 2], grad=True)
        out.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_optimizer_step(step + 1)
    table = te.get_input_embeddings().weight.detach()
    assert torch.equal(table[:49408], table_before[:49408]), "old token rows are unchanged"
    assert not torch.equal(table[49408:], table_before[49408:]), "the new rows trained"
    assert torch.equal(table[49408:], method.vectors["emb_params"].detach()), "the table follows the vectors"
    for name, p in te.named_parameters():
        if "token_embedding" not in name:
            assert torch.equal(p, params_before[name]), name


def test_captions_without_the_token_get_it_in_front_with_one_warning(tmp_path):
    method = TextualInversionMethod(make_args(tmp_path, "--token_string", "MyChar", "--num_vectors_per_token", "3"))
    warnings = []
    method.warn = lambda message, hint="": warnings.append(message)
    out = method.captions(["a photo of a dog", "mychar smiling", "", "another dog"])
    assert out == ["MyChar MyChar1 MyChar2, a photo of a dog", "MyChar MyChar1 MyChar2 smiling", "",
                   "MyChar MyChar1 MyChar2, another dog"]
    assert len(warnings) == 1 and "does not contain token_string 'MyChar'" in warnings[0]
    assert method.expand("mychars and mychar") == "mychars and MyChar MyChar1 MyChar2"
    [p] = method.sample_prompts([SamplePrompt("mychar at the beach", negative_prompt="blurry mychar")])
    assert p.prompt == "MyChar MyChar1 MyChar2 at the beach" and p.negative_prompt.endswith("MyChar2")


def test_templates_replace_captions(tmp_path):
    method = TextualInversionMethod(make_args(tmp_path, "--token_string", "tok", "--num_vectors_per_token", "2",
                                              "--use_style_template"))
    out = method.captions(["ignored caption"] * 5)
    assert all("tok tok1" in c and "ignored" not in c for c in out)
    assert all(any(c == t.format("tok tok1") for t in STYLE_TEMPLATES) for c in out)
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)
    assert fill_templates(OBJECT_TEMPLATES, "x", 3, random.Random(1)) == \
        fill_templates(OBJECT_TEMPLATES, "x", 3, random.Random(1))


@pytest.mark.parametrize("extra,match", [
    ([], "token_string' is required"),
    (["--token_string", "my char"], "without spaces"),
    (["--token_string", "t", "--use_object_template", "--use_style_template"], "exclude each other"),
    (["--token_string", "t", "--save_model_as", "diffusers"], "safetensors or pt"),
])
def test_bad_options_are_refused_before_loading(tmp_path, extra, match):
    with pytest.raises(OptionError, match=match):
        TextualInversionMethod(make_args(tmp_path, *extra))


def test_weights_continue_from_a_file(tmp_path, bundle):
    start = torch.randn(2, bundle.text_encoder.config.hidden_size)
    path = tmp_path / "old.pt"
    save_embedding(path, {"emb_params": start}, name="old")  # A1111 layout
    method, groups = build(bundle, make_args(tmp_path, "--token_string", "mychar", "--num_vectors_per_token", "2",
                                             "--weights", str(path), "--init_word", "dog"))
    assert torch.equal(groups[0]["params"][0].detach(), start)


def test_weights_with_another_vector_count_or_size_are_refused(tmp_path, tiny_sd1):
    path = tmp_path / "three.safetensors"
    save_embedding(path, {"emb_params": torch.randn(3, 32)}, name="x")
    with pytest.raises(OptionError, match="holds 3 vectors per token; set num_vectors_per_token to 3"):
        build(load_model(tiny_sd1.single_file), make_args(tmp_path, "--token_string", "t1x", "--weights", str(path)))
    save_embedding(path, {"emb_params": torch.randn(1, 768)}, name="x")
    with pytest.raises(OptionError, match="size 768 but this model's text encoder uses 32"):
        build(load_model(tiny_sd1.single_file), make_args(tmp_path, "--token_string", "t1x", "--weights", str(path)))


def test_save_writes_only_modelspec_metadata(tmp_path, bundle):
    method, _ = build(bundle, make_args(tmp_path, "--token_string", "mychar", "--init_word", "dog"))
    meta = method.metadata({"ss_steps": "5", "ss_sd_model_name": "tiny.safetensors", "modelspec.title": "last",
                            "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.date": "d"})
    assert meta == {"modelspec.title": "mychar", "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
                    "modelspec.date": "d"}
    path = tmp_path / "e.safetensors"
    method.save(method.trainable_module(), str(path), dtype=torch.float16, metadata=meta)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("emb_params").dtype == torch.float16 and f.metadata() == meta
    method.args.save_model_as = "pt"
    method.save(method.trainable_module(), str(tmp_path / "e.pt"), dtype=None, metadata=meta)
    data = torch.load(tmp_path / "e.pt", weights_only=True)
    assert data["name"] == "mychar" and data["step"] == 5 and data["sd_checkpoint_name"] == "tiny.safetensors"
    assert torch.equal(load_embedding(tmp_path / "e.pt").vectors["emb_params"], method.vectors["emb_params"].data)


@pytest.fixture(scope="module")
def tiny_sdxl_model(tmp_path_factory):
    from sd_scripts.tools.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("ti_sdxl")), "sdxl", layout="both", seed=0)


def test_sdxl_trains_one_set_of_vectors_per_text_encoder(tmp_path, tiny_sdxl_model):
    """SDXL: the same loop over (key, tokenizer, text encoder) gives clip_l and clip_g vectors, both trained; the
    file loads into diffusers' SDXL pipeline with one load_textual_inversion call per encoder."""
    from diffusers import StableDiffusionXLPipeline

    from sd_scripts.families import family_class

    bundle = load_model(tiny_sdxl_model.single_file)
    args = make_args(tmp_path, "--token_string", "mychar", "--init_word", "dog", "--num_vectors_per_token", "2")
    method, groups = build(bundle, args)
    sizes = {"clip_l": bundle.text_encoder.config.hidden_size, "clip_g": bundle.text_encoder_2.config.hidden_size}
    assert {k: tuple(v.shape) for k, v in method.vectors.items()} == {k: (2, d) for k, d in sizes.items()}
    cond = family_class(bundle.family)(bundle, args).encode_captions(method.captions(["a photo of mychar"]), train_text_encoder=True)
    (cond.hidden.pow(2).mean() + cond.pooled.pow(2).mean()).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in method.vectors.values())

    meta = method.metadata({"modelspec.title": "x"})
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    path = tmp_path / "xl.safetensors"
    method.save(method.trainable_module(), str(path), dtype=None, metadata=meta)
    saved = load_embedding(path)
    assert {k: tuple(v.shape) for k, v in saved.vectors.items()} == {k: (2, d) for k, d in sizes.items()}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model.diffusers_dir, local_files_only=True)
    pipe.load_textual_inversion(saved.vectors["clip_l"], token="mychar", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(saved.vectors["clip_g"], token="mychar", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ids = pipe.tokenizer_2.convert_tokens_to_ids(["mychar", "mychar_1"])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids].detach(), saved.vectors["clip_g"])
