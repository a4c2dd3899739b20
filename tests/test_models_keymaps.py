"""Key maps: real SD1.5/SD2.1 architectures (built on the meta device) map to exactly the keys diffusers' own
converter expects, and every rule inverts exactly."""
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from sd_scripts.families.sd.arch import bundled_config
from sd_scripts.families.sd.keymaps import model_keymaps
from sd_scripts.models.keymaps import CONV1X1, SPLIT, KeyRule, openclip_keymap
from sd_scripts.families.sd.loading import build_text_encoder, build_unet, build_vae


def _meta_modules(family, v):
    return tuple(build(bundled_config(family, v, c)) for build, c in
                 ((build_unet, "unet"), (build_vae, "vae"), (build_text_encoder, "text_encoder")))


@pytest.fixture(scope="module", params=[("sd1", False), ("sd2", False), ("sd2", True)], ids=["sd1", "sd2", "sd2-v"])
def real(request):
    family, v = request.param
    return family, v, _meta_modules(family, v)


def test_sd15_parameter_counts():
    unet, vae, te = _meta_modules("sd1", False)
    n_unet = sum(p.numel() for p in unet.parameters())
    assert 855_000_000 < n_unet < 865_000_000  # 859.5M
    assert 83_000_000 < sum(p.numel() for p in vae.parameters()) < 84_000_000
    assert 122_000_000 < sum(p.numel() for p in te.parameters()) < 124_000_000
    assert all(p.is_meta for p in unet.parameters())


def test_canonical_keys(real):
    family, v, (unet, vae, te) = real
    unet_map, vae_map, te_map = model_keymaps(family, unet, vae, te)
    keys = set(unet_map.ldm_keys) | set(vae_map.ldm_keys) | set(te_map.ldm_keys)
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in keys
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" in keys
    assert "model.diffusion_model.middle_block.2.emb_layers.1.weight" in keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.proj_out.weight" in keys
    assert len(unet_map.ldm_keys) == 686 and len(vae_map.ldm_keys) == 248
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
        assert len(te_map.ldm_keys) == 196
    else:
        assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in keys
        assert "cond_stage_model.model.positional_embedding" in keys
        assert not any("resblocks.23." in k for k in keys)  # the 24th layer is not part of diffusers' encoder


def _tagged(keymap):
    """One distinct scalar per single-file key, so a converter's renaming can be followed by value."""
    return {k: torch.tensor([float(i)]) for i, k in enumerate(keymap.ldm_keys)}


def test_unet_and_vae_maps_agree_with_diffusers_converter(real):
    family, v, (unet, vae, te) = real
    unet_map, vae_map, _ = model_keymaps(family, unet, vae, te)
    for keymap, convert, config in ((unet_map, convert_ldm_unet_checkpoint, dict(unet.config)),
                                    (vae_map, convert_ldm_vae_checkpoint, dict(vae.config))):
        tagged = _tagged(keymap)
        theirs = convert(dict(tagged), config)
        ours = keymap.to_diffusers(tagged.__getitem__)
        assert set(theirs) == set(ours)
        assert all(torch.equal(theirs[k].reshape(-1), ours[k].reshape(-1)) for k in ours)


def test_rules_invert_exactly():
    fused = torch.randn(12, 4)
    rule = KeyRule("x.in_proj_weight", ("q", "k", "v"), SPLIT)
    parts = rule.to_diffusers(fused)
    assert [p.shape for p in parts] == [(4, 4)] * 3 and torch.equal(parts[1], fused[4:8])
    assert torch.equal(rule.to_ldm(parts), fused)
    conv = torch.randn(8, 8, 1, 1)
    rule = KeyRule("attn.q.weight", ("to_q.weight",), CONV1X1)
    (linear,) = rule.to_diffusers(conv)
    assert linear.shape == (8, 8) and torch.equal(rule.to_ldm([linear]), conv)


def test_openclip_split_order():
    names = [f"encoder.layers.0.self_attn.{p}_proj.weight" for p in ("v", "q", "k")]
    (rule,) = openclip_keymap(names).rules
    assert rule.ldm == "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert [n.split(".")[-2] for n in rule.diffusers] == ["q_proj", "k_proj", "v_proj"]
