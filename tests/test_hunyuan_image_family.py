"""HunyuanImage-2.1 family: detection and key tables on the real model's key sets (shapes from the real configs on the
meta device), prompt handling (template drop, glyph text, byT5's added tokens), the step maths, loading the tiny
files with their checks, and the LoRA files: sd-scripts' names, our loader, diffusers' PEFT loader, ComfyUI's names."""
from __future__ import annotations

import pytest
import torch

from sd_scripts.errors import ModelLoadError
from sd_scripts.families import detect_single_file, family_class, read_safetensors_header
from sd_scripts.families.hunyuan_image import layout, weights
from sd_scripts.families.hunyuan_image.model import (PROMPT_TEMPLATE, TEMPLATE_TOKENS, HunyuanConditioning,
                                                     glyph_text)


def _meta_shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def real_dit_shapes():
    """The official file's key set of the released DiT, from diffusers' model at the real config (meta device)."""
    model = weights.build_dit(layout.REAL_CONFIG)
    shapes = _meta_shapes(model)
    out = {}
    for rule in layout.transformer_key_table(layout.REAL_CONFIG):
        parts = [shapes.pop(k) for k in rule.diffusers]
        out[rule.official] = (sum(p[0] for p in parts), *parts[0][1:])
    assert not shapes, f"diffusers tensors without an official name: {sorted(shapes)[:3]}"
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd_scripts.tools.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("hunyuan_tiny")
    build_tiny_model(str(root), "hunyuan_image", layout="single")
    return {k: str(root / v) for k, v in {"dit": "hunyuanimage2.1-tiny.safetensors",
                                          "text_encoder": "qwen_2.5_vl.safetensors", "byt5": "byt5.safetensors",
                                          "vae": "vae.safetensors"}.items()}


@pytest.fixture(scope="module")
def family(tiny):
    from sd_scripts.models.loading import load_model

    bundle = load_model(tiny["dit"], text_encoder=tiny["text_encoder"], byt5=tiny["byt5"], vae=tiny["vae"])
    return family_class(bundle.family)(bundle, None)


# ---------------------------------------------------------------- files of the real model
def test_real_dit_is_detected_and_its_config_read(real_dit_shapes):
    # every tensor of the official file (sd-scripts' HYImageDiffusionTransformer has these 856, same shapes): img_in,
    # txt_in (embedders + 2 refiner blocks of 14), byt5_in, time_in, 20 double blocks of 24, 40 single of 8, final
    assert len(real_dit_shapes) == 2 + (2 + 4 + 4 + 2 * 14) + 8 + 4 + 20 * 24 + 40 * 8 + 4 == 856
    assert real_dit_shapes["double_blocks.0.img_attn_qkv.weight"] == (3 * 3584, 3584)
    assert real_dit_shapes["single_blocks.0.linear1.weight"] == (3 * 3584 + 4 * 3584, 3584)
    assert detect_single_file(real_dit_shapes, {}).family == "hunyuan_image"
    assert layout.infer_dit_config(real_dit_shapes) == layout.REAL_CONFIG
    comfy = {layout.COMFY_PREFIX + k: v for k, v in real_dit_shapes.items()}
    assert detect_single_file(comfy, {}).family == "hunyuan_image"
    assert layout.infer_dit_config(comfy) == layout.REAL_CONFIG


def test_comfy_module_names_are_read_as_the_official_ones():
    assert layout.official_name("double_blocks.3.img_attn.qkv.weight") == "double_blocks.3.img_attn_qkv.weight"
    assert layout.official_name("double_blocks.3.txt_attn.norm.key_norm.scale") == \
        "double_blocks.3.txt_attn_k_norm.weight"
    assert layout.official_name("double_blocks.0.img_mlp.2.bias") == "double_blocks.0.img_mlp.fc2.bias"
    assert layout.official_name("single_blocks.7.modulation.lin.weight") == "single_blocks.7.modulation.linear.weight"
    assert layout.official_name("txt_in.t_embedder.in_layer.weight") == "txt_in.t_embedder.mlp.0.weight"
    assert layout.official_name("txt_in.individual_token_refiner.blocks.1.mlp.0.weight") == \
        "txt_in.individual_token_refiner.blocks.1.mlp.fc1.weight"
    assert layout.official_name("final_layer.linear.weight") == "final_layer.linear.weight"  # unchanged


def test_real_vae_names_and_config():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLHunyuanImage

    with init_empty_weights():
        vae = AutoencoderKLHunyuanImage(**layout.VAE_CONFIG)
    shapes = _meta_shapes(vae)
    official = weights.vae_official_names(shapes)
    assert official["encoder.down_blocks.2.conv.weight"] == "encoder.down.0.downsample.conv.weight"
    assert official["decoder.up_blocks.3.conv.weight"] == "decoder.up.0.upsample.conv.weight"
    assert official["encoder.down_blocks.4.conv1.weight"] == "encoder.down.1.block.1.conv1.weight"
    assert len(official) == 324  # sd-scripts' HunyuanVAE2D has these 324 tensors, same names and shapes
    assert official["decoder.mid_block.attentions.0.proj.weight"] == "decoder.mid.attn_1.proj_out.weight"
    file_shapes = {official[k]: v for k, v in shapes.items()}
    assert layout.file_kind(file_shapes) == "vae"
    assert layout.vae_key_map(file_shapes) == {v: k for k, v in official.items()}  # the loader's map inverts it
    assert weights.vae_config_from_shapes(file_shapes) == layout.VAE_CONFIG


def test_real_qwen_config_from_the_released_file_layout():
    model = weights.build_qwen(weights.qwen_config(dict(layout.QWEN_CONFIG)))
    shapes = {"model." + k: v for k, v in _meta_shapes(model).items()}
    shapes.update({"lm_head.weight": (152064, 3584), "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14)})
    assert layout.file_kind(shapes) == "qwen" and layout.qwen_prefix(shapes) == "model."
    cfg = weights.qwen_config_from_shapes(shapes, "model.")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size"):
        assert cfg[key] == layout.QWEN_CONFIG[key], key
    assert cfg["rope_scaling"]["mrope_section"] == [16, 24, 24] and cfg["head_dim"] == 128


# ---------------------------------------------------------------- prompts
def test_template_drop_leaves_the_caption_and_im_end():
    from sd_scripts.models.qwen_tokenizer import load_qwen_tokenizer

    tok = load_qwen_tokenizer()
    ids = tok(PROMPT_TEMPLATE.format("a cat")).input_ids
    assert ids[TEMPLATE_TOKENS - 3:TEMPLATE_TOKENS] == [151644, 872, 198]  # '<|im_start|>' 'user' '\n'
    assert ids[TEMPLATE_TOKENS:] == [64, 8251, 151645]  # 'a', ' cat', '<|im_end|>'


def test_glyph_text_as_sd_scripts_collects_it():
    assert glyph_text("a cat") is None
    caption = "a sign 'no' saying \"HI\" and “你好” and ‘x’"  # ASCII single quotes are not glyph text
    assert glyph_text(caption) == 'Text "HI". Text "x". Text "你好". '


def test_byt5_tokenizer_has_the_colour_and_font_tokens():
    tok = weights.load_byt5_tokenizer()
    assert len(tok) == 1510
    assert tok.convert_tokens_to_ids(["<color-0>", "<en-font-0>", "<kr-font-121>"]) == [384, 522, 1509]
    assert tok("Hi").input_ids == [75, 108, 1]  # bytes + 3, then </s>


def test_conditioning_items_keep_their_tokens_and_stack_pads():
    vl = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    cond = HunyuanConditioning(vl, torch.tensor([[1, 1, 1], [1, 0, 0]]), torch.zeros(2, 128, 4),
                               torch.zeros(2, 128, dtype=torch.long))
    short = cond[1]
    assert short.vl.shape == (1, 2) and short.vl_mask.tolist() == [1]
    again = HunyuanConditioning.stack([cond[0], short])
    assert torch.equal(again.vl_mask, cond.vl_mask) and torch.equal(again.vl[1, 0], vl[1, 0])
    assert float(again.vl[1, 1:].abs().sum()) == 0


# ---------------------------------------------------------------- loading and the step
def test_tiny_files_load_and_wrong_files_are_named(tiny, family):
    assert layout.file_kind(read_safetensors_header(tiny["dit"])[0]) == "dit"
    assert type(family.bundle.denoiser).__name__ == "HunyuanImageTransformer2DModel"
    assert type(family.bundle.text_encoders[0]).__name__ == "Qwen2_5_VLTextModel"
    with pytest.raises(ModelLoadError, match=r"a byT5 text encoder, not the Qwen2.5-VL text encoder .*--byt5\)"):
        weights.check_file(tiny["byt5"], "text_encoder")
    with pytest.raises(ModelLoadError, match=r"--vae"):
        family_class("hunyuan_image").load(tiny["dit"], text_encoder=tiny["text_encoder"], byt5=tiny["byt5"])


def test_step_maths_on_known_inputs(family):
    latents = torch.randn(2, 64, 2, 2, generator=torch.Generator().manual_seed(1))
    noised = family.noised(latents, torch.Generator().manual_seed(2), timesteps=torch.tensor([250, 750]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    sig = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1)
    assert torch.allclose(noised.noisy, (1 - sig) * latents + sig * noise)
    assert torch.allclose(noised.target, noise - latents) and noised.weights is None  # raw: no weights
    cond = family.encode_captions(["a photo", 'a sign "HI"'], train_text_encoder=False)
    assert int(cond.byt5_mask[0].sum()) == 0 and int(cond.byt5_mask[1].sum()) > 0
    with torch.no_grad():
        pred = family.predict(noised, cond, {})
        direct = family.bundle.denoiser(hidden_states=noised.noisy, timestep=torch.tensor([250.0, 750.0]),
                                        encoder_hidden_states=cond.vl, encoder_attention_mask=cond.vl_mask,
                                        encoder_hidden_states_2=cond.byt5, encoder_attention_mask_2=cond.byt5_mask,
                                        return_dict=False)[0]
    assert pred.shape == latents.shape and torch.allclose(pred, direct)


# ---------------------------------------------------------------- LoRA files
@pytest.fixture(scope="module")
def lora_file(family, tmp_path_factory):
    from sd_scripts.networks import lora

    net = lora.create_network(unet=family.bundle.denoiser, text_encoders=family.bundle.text_encoders,
                              family="hunyuan_image", network_dim=4, network_alpha=2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    path = tmp_path_factory.mktemp("hy_lora") / "lora.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path


def _prediction(family):
    latents = torch.randn(1, 64, 2, 3, generator=torch.Generator().manual_seed(5))
    noised = family.noised(latents, torch.Generator().manual_seed(6), timesteps=torch.tensor([500]))
    cond = family.encode_captions(['a sign "HI"'], train_text_encoder=False)
    with torch.no_grad():
        return family.predict(noised, cond, {})


def test_lora_names_are_sd_scripts_and_every_key_reaches_diffusers(family, lora_file):
    from safetensors.torch import load_file

    from sd_scripts.families.hunyuan_image.lora_files import to_diffusers_lora
    from sd_scripts.networks import lora

    tensors = load_file(str(lora_file))
    names = {k.split(".")[0] for k in tensors}
    expected = {f"lora_unet_double_blocks_{b}_{s}_{m}" for b in range(2) for s in ("img", "txt")
                for m in ("mod_linear", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")} | \
        {f"lora_unet_single_blocks_{b}_{m}" for b in range(2) for m in ("linear1", "linear2", "modulation_linear")}
    assert names == expected
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 64 + 4 * 64, 4)

    base = _prediction(family)
    net = lora.create_network_from_weights(str(lora_file), unet=family.bundle.denoiser,
                                           text_encoders=family.bundle.text_encoders, family="hunyuan_image")
    net.apply_to()
    ours = _prediction(family)
    net.unapply()
    assert (ours - base).abs().max() > 1e-3  # the file changes the output

    dit = family.bundle.denoiser
    converted = to_diffusers_lora(tensors, transformer_config=dit.config)
    # lora_A + lora_B per layer: 2 blocks x 2 streams x 7 layers (q, k, v split), 2 single blocks x 6 (q, k, v, mlp)
    assert len(converted) == 2 * (2 * 2 * 7 + 2 * 6)
    dit.load_lora_adapter(converted, prefix="transformer", adapter_name="hy")
    try:
        theirs = _prediction(family)
    finally:
        dit.delete_adapters("hy")
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_comfy_names_round_trip(lora_file, tmp_path):
    from safetensors.torch import load_file

    from sd_scripts.families.hunyuan_image.lora_files import comfy_main

    out, back = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"
    assert comfy_main([str(lora_file), str(out)]) == 0
    comfy = load_file(str(out))
    assert "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight" in comfy
    assert "lora_unet_single_blocks_1_modulation_lin.alpha" in comfy
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in comfy  # kept
    assert comfy_main([str(out), str(back), "--reverse"]) == 0
    original = load_file(str(lora_file))
    assert load_file(str(back)).keys() == original.keys()


def test_diffusers_conversion_command(lora_file, tiny, tmp_path):
    from safetensors.torch import load_file

    from sd_scripts.families.hunyuan_image.lora_files import main, to_diffusers_lora

    out = tmp_path / "peft.safetensors"
    assert main(["--lora", str(lora_file), "--model", tiny["dit"], "--out", str(out)]) == 0
    expected = to_diffusers_lora(load_file(str(lora_file)),
                                 transformer_config=layout.infer_dit_config(read_safetensors_header(tiny["dit"])[0]))
    written = load_file(str(out))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_comfy_named_dit_file_loads_the_same_weights(tiny, tmp_path):
    """A DiT file with ComfyUI's prefix and FLUX-style module names loads into the same diffusers weights."""
    from safetensors.torch import load_file, save_file

    renames = {".img_attn_qkv.": ".img_attn.qkv.", ".txt_mlp.fc1.": ".txt_mlp.0.",
               ".img_mod.linear.": ".img_mod.lin.", ".modulation.linear.": ".modulation.lin.",
               "time_in.mlp.0.": "time_in.in_layer."}
    comfy = {}
    for key, value in load_file(tiny["dit"]).items():
        for a, b in renames.items():
            key = key.replace(a, b)
        key = key.replace("single_blocks.0.q_norm.weight", "single_blocks.0.norm.query_norm.scale")
        comfy[layout.COMFY_PREFIX + key] = value
    path = tmp_path / "comfy_dit.safetensors"
    save_file(comfy, str(path))
    assert layout.file_kind(read_safetensors_header(str(path))[0]) == "dit"
    loaded = weights.load_dit(str(path))
    ours = weights.load_dit(tiny["dit"]).state_dict()
    assert loaded.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())


def test_fp8_vl_stores_qwen_in_float8(tiny):
    from types import SimpleNamespace

    from sd_scripts.models.loading import load_model

    bundle = load_model(tiny["dit"], text_encoder=tiny["text_encoder"], byt5=tiny["byt5"], vae=tiny["vae"])
    fam = family_class(bundle.family)(bundle, SimpleNamespace(fp8_vl=True, mixed_precision="bf16"))
    qwen = bundle.text_encoders[0]
    assert qwen.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cond = fam.encode_batch(["a photo"])
    assert torch.isfinite(cond.vl.float()).all() and cond.vl.shape[-1] == 64
    with pytest.raises(Exception, match="fp8_vl"):
        family_class(bundle.family)(bundle, SimpleNamespace(fp8_vl=True, mixed_precision="no"))


def test_fp8_scaled_is_the_denoisers_float8_base():
    from types import SimpleNamespace

    from sd_scripts.training.memory import fp8_denoiser, fp8_text_encoders

    args = SimpleNamespace(fp8_scaled=True, fp8_base=False, fp8_base_unet=False)
    assert fp8_denoiser(args) and not fp8_text_encoders(args)  # the DiT only; Qwen2.5-VL has fp8_vl
    assert not fp8_denoiser(SimpleNamespace(fp8_scaled=False, fp8_base=False, fp8_base_unet=False))
