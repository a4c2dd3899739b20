"""Tests for sd_scripts.training.sampling: prompt files, samplers, file names and generation on a tiny pipeline."""
import datetime
import functools
import json
import os
import random
import re
import warnings

import numpy as np
import pytest
import torch

from sd_scripts.errors import UserError
from sd_scripts.training.sampling import (SAMPLER_NAMES, SamplePrompt, SamplePromptError, generate_samples,
                                          make_scheduler, parse_prompt_file, parse_prompt_line, sample_file_name)

# diffusers' schedulers hand torch tensors to numpy, which numpy 2 warns about once per element: noise only.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sd_scripts", "families", "sd",
                       "configs")


def _config(family):
    with open(os.path.join(CONFIGS, family, "scheduler.json"), encoding="utf-8") as f:
        return json.load(f)


PROMPT_FILE = """\
# a comment line

a photo of sks dog
  # an indented comment
a cat --n blurry, lowres --w 640 --h 515 --d 42 --s 20 --l 6.5 --ss euler_a
a bird --W 100 --h 32 --S 5000 --ss K_DPM_2_A
a fish --s 0 --g 3.5 --l 7
"""


def test_prompt_file_table(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPT_FILE, encoding="utf-8")
    prompts = parse_prompt_file(str(path), default_sampler="euler")
    assert prompts == [
        SamplePrompt("a photo of sks dog", sampler="euler"),  # defaults: 512x512, 30 steps, 7.5, no seed
        SamplePrompt("a cat", "blurry, lowres", 640, 512, 42, 20, 6.5, "euler_a"),  # 515 -> 512
        SamplePrompt("a bird", width=96, height=64, steps=1000, sampler="k_dpm_2_a"),  # 100 -> 96, 32 -> 64
        SamplePrompt("a fish", steps=1, scale=7.0, sampler="euler", guidance=3.5),  # steps clamped; --g kept
    ]
    assert prompts[3].given == {"steps", "guidance", "scale"} and prompts[0].given == frozenset()
    assert parse_prompt_file(str(path))[0].sampler == "ddim"


@pytest.mark.parametrize("line, words", [
    ("a dog --w big", ["line 2", "--w", "whole number", "'big'"]),
    ("a dog --d -3", ["line 2", "--d", "negative"]),
    ("a dog --l x", ["line 2", "--l", "number"]),
    ("a dog --ss plms", ["line 2", "unknown sampler", "'plms'"]),
    ("a dog --x 1", ["line 2", "unknown option --x"]),
])
def test_bad_prompt_line_names_file_and_line(tmp_path, line, words):
    path = tmp_path / "prompts.txt"
    path.write_text(f"ok prompt\n{line}\n", encoding="utf-8")
    with pytest.raises(SamplePromptError) as err:
        parse_prompt_file(str(path))
    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert str(path) in message and all(w in message for w in words), message
    assert "\n" not in message


def test_missing_prompt_file_and_bad_default_sampler(tmp_path):
    with pytest.raises(SamplePromptError, match="does not exist"):
        parse_prompt_file(str(tmp_path / "nope.txt"))
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(SamplePromptError, match="sample_sampler"):
        parse_prompt_file(str(tmp_path / "p.txt"), default_sampler="nope")


def test_toml_and_json_prompt_files(tmp_path):
    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nwidth = 768\nsample_steps = 12\n\n[[prompt.subset]]\nprompt = "a dog"\nseed = 1\n\n'
                    '[[prompt.subset]]\nprompt = "a cat"\nnegative_prompt = "ugly"\nsample_sampler = "heun"\n'
                    'width = 513\n', encoding="utf-8")
    assert parse_prompt_file(str(toml)) == [
        SamplePrompt("a dog", width=768, seed=1, steps=12, sampler="ddim"),
        SamplePrompt("a cat", "ugly", width=512, steps=12, sampler="heun"),
    ]
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps(["a dog --d 3", {"prompt": "a cat", "scale": 5, "height": 640}]), encoding="utf-8")
    assert parse_prompt_file(str(js)) == [SamplePrompt("a dog", seed=3, sampler="ddim"),
                                          SamplePrompt("a cat", height=640, scale=5.0, sampler="ddim")]
    js.write_text(json.dumps([{"prompt": "a", "size": 3}]), encoding="utf-8")
    with pytest.raises(SamplePromptError, match="entry 1.*'size'"):
        parse_prompt_file(str(js))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_make_scheduler_for_every_sampler(name, family):
    config = _config(family)
    try:
        import scipy  # noqa: F401
        has_scipy = True
    except ImportError:
        has_scipy = False
    if name in ("lms", "k_lms") and not has_scipy:
        with pytest.raises(SamplePromptError, match="scipy"):
            make_scheduler(name, config)
        return
    scheduler = make_scheduler(name, config)
    assert scheduler.config.prediction_type == config["prediction_type"]
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_start == 0.00085
    scheduler.set_timesteps(2)
    scheduler.set_timesteps(30)
    expected = {"dpmsolver": "dpmsolver", "dpmsolver++": "dpmsolver++"}.get(name)
    if expected:
        assert scheduler.config.algorithm_type == expected
    with pytest.raises(SamplePromptError, match="unknown sampler"):
        make_scheduler("ddpm", config)


def test_sample_file_names():
    now = datetime.datetime(2024, 3, 5, 7, 8, 9)
    assert sample_file_name("mylora", epoch=3, index=1, seed=42, now=now) == "mylora_e000003_01_20240305070809_42.png"
    assert sample_file_name(None, step=250, index=0, seed=None, now=now) == "000250_00_20240305070809.png"
    assert sample_file_name("x", epoch=1, step=9, index=12, seed=None, now=now) == "x_e000001_12_20240305070809.png"
    assert re.fullmatch(r"\d{6}_00_\d{14}\.png", sample_file_name("", step=1, index=0, seed=None))
    with pytest.raises(ValueError):
        sample_file_name("x", index=0, seed=None, now=now)


# ------------------------------------------------------------------ generation on a tiny random-weight pipeline
@pytest.fixture(scope="module")
def tiny():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_scripts.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=77, projection_dim=32))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer())


def _generate(tiny, out_dir, prompts, **kw):
    from sd_scripts.families.sd.sd import SDFamily
    from sd_scripts.models.bundle import ModelBundle

    bundle = ModelBundle("sd1", tiny["unet"], tiny["vae"], [tiny["text_encoder"]], [tiny["tokenizer"]], "<test>",
                         False, _config("sd1"))
    args = dict(out_dir=str(out_dir), output_name="tiny", device="cpu", dtype=torch.float32)
    args.update(kw)
    return generate_samples(SDFamily(bundle), prompts=prompts, **args)


def test_generate_samples_writes_named_pngs_and_restores_state(tiny, tmp_path):
    from PIL import Image

    tiny["unet"].train()
    tiny["unet"].conv_in.eval()  # a submodule in a different mode than its parent must come back as it was
    tiny["text_encoder"].eval()
    tiny["vae"].eval()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()

    prompts = [SamplePrompt("a photo of sks dog", width=64, height=64, seed=42, steps=2, sampler="ddim"),
               SamplePrompt("a cat", "blurry", width=64, height=72, steps=2, scale=3.0, sampler="euler_a")]
    out = tmp_path / "sample"
    paths = _generate(tiny, out, prompts, step=5)

    assert [os.path.dirname(p) for p in paths] == [str(out)] * 2
    assert re.fullmatch(r"tiny_000005_00_\d{14}_42\.png", os.path.basename(paths[0]))
    assert re.fullmatch(r"tiny_000005_01_\d{14}\.png", os.path.basename(paths[1]))
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)  # no temp files left
    assert Image.open(paths[0]).size == (64, 64) and Image.open(paths[1]).size == (64, 72)

    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert tiny["unet"].training and not tiny["unet"].conv_in.training and tiny["unet"].conv_out.training
    assert not tiny["text_encoder"].training and not tiny["vae"].training
    assert all(p.requires_grad for p in tiny["unet"].parameters())


def test_same_seed_same_image_and_epoch_names(tiny, tmp_path):
    from PIL import Image

    prompt = SamplePrompt("a dog", width=64, height=64, seed=7, steps=2, sampler="ddim")
    first = _generate(tiny, tmp_path / "a", [prompt], epoch=2, output_name=None)
    second = _generate(tiny, tmp_path / "b", [prompt], epoch=2, output_name=None, clip_skip=2)
    third = _generate(tiny, tmp_path / "c", [prompt], epoch=2, output_name=None)
    assert re.fullmatch(r"e000002_00_\d{14}_7\.png", os.path.basename(first[0]))
    pixels = [np.asarray(Image.open(p[0])) for p in (first, second, third)]
    assert np.array_equal(pixels[0], pixels[2])  # deterministic for a fixed seed
    assert not np.array_equal(pixels[0], pixels[1])  # clip_skip 2 uses another text-encoder layer


def test_generate_samples_under_bf16_autocast(tiny, tmp_path):
    prompt = SamplePrompt("a dog", width=64, height=64, seed=1, steps=2, sampler="euler")
    paths = _generate(tiny, tmp_path, [prompt], step=1, dtype=torch.bfloat16)
    assert len(paths) == 1 and os.path.getsize(paths[0]) > 0


def test_parse_prompt_line_default_sampler_none():
    assert parse_prompt_line("x --s 3", default_sampler=None) == SamplePrompt("x", steps=3)


def test_encode_prompt_clip_skip(tiny):
    from sd_scripts.families.sd.sd import encode_prompt

    te, tok = tiny["text_encoder"], tiny["tokenizer"]
    with torch.no_grad():
        ids = tok("a dog", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        torch.testing.assert_close(encode_prompt(te, tok, "a dog", "cpu"), out.last_hidden_state)
        torch.testing.assert_close(encode_prompt(te, tok, "a dog", "cpu", clip_skip=1), out.last_hidden_state)
        penultimate = te.final_layer_norm(out.hidden_states[-2]) if hasattr(te, "final_layer_norm") else \
            te.text_model.final_layer_norm(out.hidden_states[-2])
        torch.testing.assert_close(encode_prompt(te, tok, "a dog", "cpu", clip_skip=2), penultimate)
    assert encode_prompt(te, tok, "a dog", "cpu").shape == (1, 77, 32)


def test_eval_modules_are_put_back_in_their_mode(tiny, tmp_path):
    lora_like = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    prompt = SamplePrompt("a dog", width=64, height=64, seed=1, steps=1, sampler="ddim")
    _generate(tiny, tmp_path, [prompt], step=1, eval_modules=[lora_like])
    assert lora_like.training and lora_like[0].training


# ---------------------------------------------------------------- a real run's sample follows --n and --l
@functools.lru_cache(maxsize=1)
def _diffusers_parts(model_dir: str):
    """U-Net, VAE, text encoder, tokenizer and the folder's scheduler config as DDIM, read with diffusers and
    transformers alone (none of our loading code)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).eval()
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    with warnings.catch_warnings():  # the folder's scheduler is PNDM: DDIM ignores its PNDM-only keys
        warnings.simplefilter("ignore")
        scheduler = DDIMScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))
    return unet, vae, text_encoder, tokenizer, scheduler


def _hand_ddim_sample(model_dir: str, prompt: str, negative: str, scale: float, steps: int, seed: int,
                      size: int) -> np.ndarray:
    """The image DDIM with classifier-free guidance makes, written out step by step on the diffusers folder's parts:
    x_T ~ N(0, I) from a CPU generator seeded with `seed`; at each step eps = eps(neg) + scale * (eps(prompt) -
    eps(neg)); the VAE decodes x_0 / scaling_factor; pixels = round(255 * clamp(x / 2 + 0.5, 0, 1))."""
    unet, vae, text_encoder, tokenizer, scheduler = _diffusers_parts(model_dir)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        ids = tokenizer([negative, prompt], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        states = text_encoder(ids)[0]
        latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_negative, eps_prompt = unet(model_input, t, states).sample.chunk(2)
            latents = scheduler.step(eps_negative + scale * (eps_prompt - eps_negative), t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def test_training_run_sample_uses_negative_prompt_and_cfg_scale(tiny_sd1, demo_data, tmp_path):
    """`--sample_at_first` in a real LoRA run: the LoRA starts at zero, so the sample is the base model's DDIM image
    for the prompt, its `--n` negative prompt and its `--l` guidance scale."""
    from PIL import Image

    from sd_scripts.train_network import main

    prompt, negative, scale, steps, seed = "a photo of sks dog", "blurry, red square", 4.0, 3, 11
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{prompt} --n {negative} --l {scale} --s {steps} --d {seed} --w 64 --h 64\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--pretrained_model_name_or_path", tiny_sd1.diffusers_dir, "--train_data_dir", demo_data,
                 "--output_dir", str(out), "--resolution", "64", "--caption_extension", ".txt",
                 "--max_train_steps", "1", "--seed", "1", "--sample_prompts", str(prompts),
                 "--sample_at_first"]) == 0
    (sample,) = os.listdir(out / "sample")
    got = np.asarray(Image.open(out / "sample" / sample).convert("RGB")).astype(int)

    expected = _hand_ddim_sample(tiny_sd1.diffusers_dir, prompt, negative, scale, steps, seed, 64).astype(int)
    without_negative = _hand_ddim_sample(tiny_sd1.diffusers_dir, prompt, "", scale, steps, seed, 64).astype(int)
    default_scale = _hand_ddim_sample(tiny_sd1.diffusers_dir, prompt, negative, 7.5, steps, seed, 64).astype(int)
    # float rounding moves a few pixels by a level or two; the options move the whole image by about ten
    for other in (without_negative, default_scale):  # precondition: both options visibly change the image
        assert np.abs(other - expected).mean() > 5
    difference = np.abs(got - expected)
    assert difference.max() <= 3 and difference.mean() < 0.5
