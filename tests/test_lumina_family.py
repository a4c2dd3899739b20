"""Lumina Image 2.0 family: detection and the key table at the real 2B size (shapes only, meta device; the table
against diffusers' own converter), the step's maths on known inputs (sd-scripts' lumina_train_util formulas, Lumina's
reversed time), loading the layouts users have, the tokenizer's places, and LoRA names as sd-scripts' lora_lumina
makes them."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_scripts.errors import ModelLoadError
from sd_scripts.families.lumina import detect_single_file, layout
from sd_scripts.families.lumina.model import LuminaFamily, sample_sigmas
from sd_scripts.options import OptionError

DATA = Path(__file__).parent / "data"


def _real_alpha_shapes() -> dict[str, tuple]:
    """The Alpha-VLLM file's tensor shapes of Lumina-Image-2.0, from diffusers' model built on the meta device."""
    from sd_scripts.families.lumina.weights import build_transformer

    state = build_transformer(layout.LUMINA2_CONFIG).state_dict()
    shapes = {}
    for rule in layout.transformer_key_table(layout.LUMINA2_CONFIG):
        parts = [tuple(state[k].shape) for k in rule.diffusers]
        shapes[rule.alpha] = (sum(p[0] for p in parts), *parts[0][1:])
    shapes[layout.UNUSED_NORM] = (2304,)
    return shapes


def test_real_size_files_are_recognised_and_read():
    from sd_scripts.families.lumina.weights import build_gemma2, gemma_config

    shapes = _real_alpha_shapes()
    assert shapes["layers.25.attention.qkv.weight"] == (3840, 2304)  # 24 heads + 2 x 8 kv heads of 96
    assert layout.infer_transformer_config(shapes) == layout.LUMINA2_CONFIG
    assert detect_single_file(shapes, {}).family == "lumina"
    gemma = {"text_encoders.gemma2_2b.transformer.model." + k: tuple(v.shape)
             for k, v in build_gemma2(layout.GEMMA2_CONFIG).state_dict().items()}
    neta = {**{layout.COMFY_PREFIX + k: v for k, v in shapes.items()}, **gemma,
            "vae.decoder.conv_in.weight": (512, 16, 3, 3), "vae.encoder.conv_in.weight": (128, 3, 3, 3)}
    assert detect_single_file(neta, {}).family == "lumina"
    assert layout.infer_transformer_config(layout.strip_prefix(neta)) == layout.LUMINA2_CONFIG
    assert layout.gemma_prefix(neta) == "text_encoders.gemma2_2b.transformer.model."
    assert layout.ae_prefix(neta) == "vae."
    read = gemma_config(gemma, "text_encoders.gemma2_2b.transformer.model.")
    assert {k: read[k] for k in ("head_dim", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                                 "intermediate_size", "vocab_size")} == \
        {"head_dim": 256, "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 26,
         "intermediate_size": 9216, "vocab_size": 256000}
    assert detect_single_file(gemma, {}) is None and layout.file_kind(gemma) == "gemma2"


def test_key_table_agrees_with_diffusers_converter_at_real_size():
    """Each Alpha-VLLM tensor as a [rows, 1] column of its own numbers: ours and diffusers'
    convert_lumina2_to_diffusers (fixed to the 2B's sizes) give the same tensors under the same names."""
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    from sd_scripts.families.lumina.weights import alpha_to_diffusers, diffusers_to_alpha

    tensors = {k: torch.arange(s[0], dtype=torch.float64)[:, None] + 10_000 * i
               for i, (k, s) in enumerate(sorted(_real_alpha_shapes().items()))}
    ours = alpha_to_diffusers(lambda k: tensors[k], layout.LUMINA2_CONFIG)
    theirs = convert_lumina2_to_diffusers(dict(tensors))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = {k: (v.make() if hasattr(v, "make") else v)
            for k, v in diffusers_to_alpha(ours, layout.LUMINA2_CONFIG).items()}
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors if k != layout.UNUSED_NORM)


# ---------------------------------------------------------------- the step


def test_sigma_sampling_on_known_draws():
    z = torch.randn(4, generator=torch.Generator().manual_seed(5))
    u = torch.rand(4, generator=torch.Generator().manual_seed(5))
    sig = torch.sigmoid(z)
    sigmas, t = sample_sigmas("shift", 4, latent_height=128, latent_width=128,
                              generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sigmas, 6 * sig / (1 + 5 * sig)) and torch.allclose(t, sigmas * 1000)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 * 64 - 256)  # sd-scripts' get_lin_function at 64 x 64 patches
    for mode, base in (("nextdit_shift", u), ("flux_shift", sig)):
        sigmas, _ = sample_sigmas(mode, 4, latent_height=128, latent_width=128,
                                  generator=torch.Generator().manual_seed(5))
        assert torch.allclose(sigmas, math.exp(mu) / (math.exp(mu) + (1 / base - 1)), atol=1e-6), mode
    # sigma 0.5 shifted by 6: 3 / 3.5
    assert abs(6 * 0.5 / (1 + 5 * 0.5) - 0.857142857) < 1e-6
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_sigmas("cosine", 1, latent_height=8, latent_width=8)


class _Recorder(torch.nn.Module):
    """A stand-in denoiser: records its inputs, predicts 2 x its input."""

    config = SimpleNamespace(cap_feat_dim=32)

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict = {}

    def forward(self, **kwargs):
        self.seen = kwargs
        return (kwargs["hidden_states"] * 2,)


def _family(**options) -> LuminaFamily:
    bundle = SimpleNamespace(family="lumina", denoiser=_Recorder(), tokenizers=[None], text_encoders=[None])
    return LuminaFamily(bundle, None, **options)


def _cond(batch: int = 2):
    from sd_scripts.families.lumina.model import LuminaConditioning

    mask = torch.ones(batch, 8, dtype=torch.int64)
    mask[:, 5:] = 0
    return LuminaConditioning(torch.randn(batch, 8, 32), mask, torch.zeros(batch, 8, dtype=torch.int64))


def test_step_runs_lumina_time_backwards_with_the_reversed_target():
    family = _family()
    assert (family.timestep_sampling, family.model_prediction_type, family.discrete_flow_shift) == ("shift", "raw", 6.0)
    latents = torch.randn(2, 16, 8, 8)
    noised = family.noised(latents, torch.Generator().manual_seed(0), timesteps=torch.tensor([250, 750]))
    s = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1)
    noise = (noised.noisy - (1 - s) * latents) / s
    assert torch.allclose(noised.target, latents - noise, atol=1e-5)  # x0 - noise: FLUX.1's target reversed
    pred = family.predict(noised, _cond(), {})
    seen = family.bundle.denoiser.seen
    assert torch.allclose(seen["timestep"], torch.tensor([0.75, 0.25]))  # t = 1 - sigma: 1 is the image
    assert seen["encoder_attention_mask"].dtype == torch.bool and int(seen["encoder_attention_mask"].sum()) == 10
    assert torch.equal(pred, noised.noisy * 2) and noised.weights is None
    scaled = _family(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    noised = scaled.noised(latents, torch.Generator().manual_seed(0), timesteps=torch.tensor([250, 750]))
    pred = scaled.predict(noised, _cond(), {})
    assert torch.allclose(pred, noised.noisy * 2 * -s + noised.noisy)  # sd-scripts' sigma_scaled, same target
    assert torch.allclose(noised.weights.flatten(), torch.tensor([16.0, 1 / 0.5625]))
    drawn = _family().noised(latents, torch.Generator().manual_seed(1))
    assert drawn.timesteps.shape == (2,) and bool(((drawn.timesteps > 0) & (drawn.timesteps < 1000)).all())


def test_flash_attention_is_refused_without_its_kernel():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(OptionError, match="use_flash_attn.*CUDA"):
        _family(use_flash_attn=True)


def test_block_swap_takes_the_main_blocks():
    from sd_scripts.families.lumina.tiny import TINY_TRANSFORMER
    from sd_scripts.families.lumina.weights import build_transformer

    model = build_transformer(dict(TINY_TRANSFORMER, num_layers=4))
    (group,) = LuminaFamily.block_swap_groups(model, 2)
    assert group.blocks is model.layers and group.count == 2


# ---------------------------------------------------------------- files


def test_tokenizer_with_system_prompt_and_sd_scripts_padding(tiny_lumina):
    from sd_scripts.families.lumina.weights import find_tokenizer
    from sd_scripts.models.checkpoint import open_checkpoint

    tokenizer = find_tokenizer(gemma2=tiny_lumina["gemma2"], gemma_checkpoint=open_checkpoint(tiny_lumina["gemma2"]))
    family = LuminaFamily(SimpleNamespace(family="lumina", denoiser=_Recorder(), tokenizers=[tokenizer],
                                          text_encoders=[None]), None, system_prompt="You are an assistant",
                          gemma2_max_token_length=32)
    ids, mask = family.tokenize(["a photo of sks dog"])
    assert ids.shape == (1, 32) and ids[0, 0] == 2 and mask[0, -1] == 0  # bos, multiple of 8, right padding
    expected = tokenizer("You are an assistant <Prompt Start> a photo of sks dog").input_ids
    assert ids[0, :len(expected)].tolist() == expected and int(mask.sum()) == len(expected)
    negative, _ = family.tokenize(["blurry"], negative=True)
    assert negative[0, :3].tolist() == tokenizer("blurry").input_ids[:3]  # no system prompt before negatives
    with pytest.raises(OptionError, match="gemma2_max_token_length.*multiple of 8"):
        LuminaFamily(family.bundle, None, gemma2_max_token_length=30)


def test_layouts_load_the_same_model_and_wrong_files_name_the_option(tiny_lumina, tmp_path):
    from sd_scripts.families.lumina.weights import save_transformer
    from sd_scripts.models.loading import load_model

    single = load_model(tiny_lumina["transformer"], gemma2=tiny_lumina["gemma2"], ae=tiny_lumina["ae"])
    folder = load_model(tiny_lumina["diffusers_dir"])
    for a, b in ((single.denoiser, folder.denoiser), (single.text_encoders[0], folder.text_encoders[0]),
                 (single.vae, folder.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Neta Lumina's all-in-one file: denoiser, autoencoder and Gemma-2 under their prefixes, no tokenizer inside
    neta = {layout.COMFY_PREFIX + k: v for k, v in load_file(tiny_lumina["transformer"]).items()}
    neta.update({"vae." + k: v for k, v in load_file(tiny_lumina["ae"]).items()})
    neta.update({"text_encoders.gemma2_2b.transformer." + k: v for k, v in load_file(tiny_lumina["gemma2"]).items()
                 if k != layout.SPIECE_KEY})
    path = tmp_path / "neta.safetensors"
    save_file(neta, str(path))
    with pytest.raises(ModelLoadError, match="no Gemma tokenizer.*--tokenizer_cache_dir"):
        load_model(str(path))
    bundle = load_model(str(path), tokenizer_cache_dir=str(Path(tiny_lumina["diffusers_dir"]) / "tokenizer"))
    assert all(torch.equal(v, single.denoiser.state_dict()[k]) for k, v in bundle.denoiser.state_dict().items())
    assert torch.equal(bundle.text_encoders[0].embed_tokens.weight, single.text_encoders[0].embed_tokens.weight)
    with pytest.raises(ModelLoadError, match="--gemma2"):
        load_model(tiny_lumina["transformer"], gemma2=tiny_lumina["ae"], ae=tiny_lumina["ae"])
    with pytest.raises(ModelLoadError, match="--gemma2"):
        load_model(tiny_lumina["transformer"], ae=tiny_lumina["ae"])
    with pytest.raises(ModelLoadError, match="--ae"):
        load_model(tiny_lumina["transformer"], gemma2=tiny_lumina["gemma2"], ae=tiny_lumina["gemma2"])
    # saved back in sd-scripts' layout: the same tensors, bare keys, with its unused norm_final
    out = save_transformer(single.denoiser, str(tmp_path / "again.safetensors"))
    assert load_file(out).keys() == load_file(tiny_lumina["transformer"]).keys()
    assert "norm_final.weight" in load_file(out) and "layers.1.attention.qkv.weight" in load_file(out)


@pytest.mark.parametrize("case,args", [("default", {}),
                                       ("train_blocks=transformer embedder_dims=[4,4,4]",
                                        {"train_blocks": "transformer", "embedder_dims": "[4,4,4]"})])
def test_lora_names_are_sd_scripts_lora_lumina_names(tiny_lumina, case, args):
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    expected = json.loads((DATA / "lumina_lora_names.json").read_text())[case]
    bundle = load_model(tiny_lumina["diffusers_dir"])
    net = lora.create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders, family="lumina",
                              network_dim=4, network_alpha=2, network_args=args)
    state = net.lora_state_dict()
    assert sorted({k.split(".")[0] for k in state}) == expected
    assert state["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (96, 4)  # q 48 + k 24 + v 24
    split = lora.create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders, family="lumina",
                                network_dim=4, network_alpha=2, network_args={"split_qkv": "True",
                                                                              "attn_dim": "2", "mod_dim": "0"})
    state = split.lora_state_dict()
    assert state["lora_unet_layers_0_attention_qkv.lora_down.weight"].shape == (6, 48)  # 3 parts x attn_dim 2
    assert not any("adaLN" in k for k in state)


def test_denoiser_matches_sd_scripts_nextdit(tiny_lumina):
    """diffusers' Lumina2Transformer2DModel loaded from the tiny Alpha-VLLM file gives what sd-scripts' own NextDiT
    gave on the same file and inputs (t in Lumina's time, a caption mask with padding; stored reference)."""
    from safetensors import safe_open

    from sd_scripts.families.lumina.weights import load_transformer

    with safe_open(str(DATA / "lumina_nextdit_reference.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    model = load_transformer(tiny_lumina["transformer"])
    with torch.no_grad():
        out = model(hidden_states=ref["x"], timestep=ref["t"], encoder_hidden_states=ref["cap"],
                    encoder_attention_mask=ref["mask"].bool(), return_dict=False)[0]
    assert torch.allclose(out, ref["out"], atol=1e-4)
    with torch.no_grad():  # the time matters: the other convention (sigma instead of 1 - sigma) gives another output
        other = model(hidden_states=ref["x"], timestep=1 - ref["t"], encoder_hidden_states=ref["cap"],
                      encoder_attention_mask=ref["mask"].bool(), return_dict=False)[0]
    assert not torch.allclose(other, ref["out"], atol=1e-2)


def test_cfg_truncation_covers_the_steps_sd_scripts_guides():
    """sd-scripts guides while Lumina's time 1 - t/1000 < 0.25; diffusers' pipeline guides the first ratio x steps.
    On the pipeline's own schedule (shift 6), the ratio given covers exactly the steps sd-scripts guides."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sd_scripts.families.lumina.model import cfg_step_ratio

    for steps in (4, 10, 36):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(layout.SCHEDULER_CONFIG)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
        guided_sd_scripts = [bool(1 - float(t) / 1000 < 0.25) for t in scheduler.timesteps]
        ratio = cfg_step_ratio(steps, 0.25)
        guided_diffusers = [not ((i + 1) / steps > ratio) for i in range(steps)]
        assert guided_diffusers == guided_sd_scripts and any(guided_sd_scripts) and not all(guided_sd_scripts)
