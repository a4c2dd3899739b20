"""The SD3 / SD3.5 family: registry facts and detection, which options and scripts take it, the training step's
maths on known inputs, conditioning, text-encoder cache arrays, file metadata names and loading errors."""
from __future__ import annotations

import random

import pytest
import torch

from sd_scripts.errors import ModelLoadError
from sd_scripts.families import detect_single_file, family_for_script, family_spec, probe_model, tiny_variants
from sd_scripts.options import OptionError, parse_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd_scripts.families.sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("sd3")), variant="sd3_medium", layout="both")


@pytest.fixture(scope="module")
def family(tiny):
    from argparse import Namespace

    from sd_scripts.families.sd3.model import SD3Family
    from sd_scripts.models.loading import load_model

    bundle = load_model(tiny.single_file_with_text_encoders)
    args = Namespace(t5xxl_max_token_length=8, weighting_scheme="uniform", training_shift=1.0)
    return SD3Family(bundle, args)


def test_facts():
    spec = family_spec("sd3")
    assert (spec.bucket_step, spec.default_resolution) == (32, 1024)
    assert (spec.vae_scaling_factor, spec.vae_shift_factor) == (1.5305, 0.0609)
    assert spec.lora_te_prefixes == ("lora_te1", "lora_te2", "lora_te3")
    assert family_for_script("sd3_train_network").name == "sd3" and family_for_script("sd3_train").name == "sd3"
    assert spec.architecture_for(False, "lora") == "stable-diffusion-3-medium/lora"
    assert spec.base_model_version == "medium" and spec.trainers == {"network", "finetune"}
    assert tiny_variants()["sd3"] == ("sd3", False) and tiny_variants()["sd35-medium"] == ("sd3", False)


def test_detection(tiny):
    assert probe_model(tiny.single_file).family == "sd3"
    assert probe_model(tiny.single_file_with_text_encoders).family == "sd3"
    assert probe_model(tiny.diffusers_dir).family == "sd3"
    # a real-size key set (SD3.5 large: q/k norms, 38 blocks) without weights
    shapes = {"model.diffusion_model.x_embedder.proj.weight": (2432, 16, 2, 2),
              "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (7296, 2432),
              "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight": (64,)}
    assert detect_single_file(shapes).family == "sd3"
    with pytest.raises(ModelLoadError):
        detect_single_file({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)})


def _why(family: str, script: str, trainer: str = "network", **values) -> str | None:
    from sd_scripts.families import check_run
    from sd_scripts.options import BY_NAME

    return check_run(family, trainer=trainer, script=script, values=values,
                     defaults={n: o.default for n, o in BY_NAME.items()}, source="model")


def test_scripts_take_their_family_only():
    assert _why("sd3", "sd3_train_network", clip_g="clip_g.safetensors", training_shift=3.0) is None
    assert "train it with sd3_train_network instead of train_network" in _why("sd3", "train_network")
    assert "train it with sd3_train instead" in _why("sd3", "fine_tune", trainer="finetune")
    assert "sd3_train_network trains Stable Diffusion 3 / 3.5 models" in _why("sd1", "sd3_train_network")
    assert "cannot be trained with the db trainer" in _why("sd3", "train_db", trainer="db")
    assert _why("sd1", "train_network") is None


def test_family_options_accepted_and_refused():
    assert _why("sd3", "sd3_train_network", apply_lg_attn_mask=True, clip_l_dropout_rate=0.1,
                weighting_scheme="logit_normal", pos_emb_random_crop_rate=0.2) is None
    assert "option 'v2' is for Stable Diffusion 2.x models" in _why("sd3", "sd3_train_network", v2=True)
    assert _why("sd3", "sd3_train_network", blocks_to_swap=4, fp8_base=True) is None  # sd-scripts' SD3 has both
    assert "option 'model_type' is for" in _why("sd3", "sd3_train_network", model_type="chroma")
    with pytest.raises(OptionError, match="training_shift"):
        parse_args("network", ["--training_shift", "0"])
    with pytest.raises(OptionError, match="weighting_scheme"):
        parse_args("network", ["--weighting_scheme", "nope"])


def test_lora_names_follow_sd_scripts(tiny):
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    b = load_model(tiny.single_file_with_text_encoders)
    net = lora.create_network(unet=b.denoiser, text_encoders=b.text_encoders, family="sd3", network_dim=4,
                              network_alpha=1)
    names = {m.lora_name for m in net.all_loras()}
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in names, sorted(names)[-5:]
    assert "lora_unet_joint_blocks_1_context_block_mlp_fc2" in names
    assert "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1" in names  # saved with its halves swapped
    assert any(n.startswith("lora_te1_text_model_") for n in names)
    assert any(n.startswith("lora_te2_text_model_") for n in names)
    assert not any(n.startswith("lora_te3_") for n in names)


def test_lora_network_args_ranks_embedders_blocks_and_t5(tiny, tmp_path):
    """lora_sd3's network_args: ranks per layer kind (0 leaves it out), emb_dims adapts the layers outside the joint
    blocks (the 2x2 patch conv too), train_block_indices keeps those blocks, split_qkv, train_t5xxl; the file loads
    back into a network shaped from it, and diffusers' transformer with the converted file equals ours."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from sd_scripts.families.sd3.lora_files import to_diffusers_lora
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    b = load_model(tiny.diffusers_dir)
    args = ["x_attn_dim=2", "context_mlp_dim=0", "emb_dims=[3,2,2,0,4,5]", "train_block_indices=0,2",
            "split_qkv=True", "train_t5xxl=True"]
    net = lora.create_network(unet=b.denoiser, text_encoders=b.text_encoders, family="sd3", network_dim=4,
                              network_alpha=2, network_args=args)
    ranks = {m.lora_name: m.rank for m in net.all_loras()}
    assert ranks["lora_unet_joint_blocks_0_x_block_attn_qkv"] == ranks["lora_unet_joint_blocks_2_x_block_attn_proj"] == 2
    assert ranks["lora_unet_joint_blocks_0_context_block_attn_qkv"] == 4
    assert not any("context_block_mlp" in n or "joint_blocks_1_" in n for n in ranks)
    assert (ranks["lora_unet_context_embedder"], ranks["lora_unet_t_embedder_mlp_0"], ranks["lora_unet_x_embedder_proj"],
            ranks["lora_unet_final_layer_adaLN_modulation_1"], ranks["lora_unet_final_layer_linear"]) == (3, 2, 2, 4, 5)
    assert not any("y_embedder" in n for n in ranks)
    assert any(n.startswith("lora_te3_") for n in ranks)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.all_loras():
            m.lora_up.weight.normal_(std=0.05)
    path = tmp_path / "ranks.safetensors"
    net.save_weights(str(path))
    tensors = load_file(str(path))
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 6  # split: 3 x 2
    cfg = b.denoiser.config
    inputs = dict(hidden_states=torch.randn(1, cfg.in_channels, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim))
    with torch.no_grad():
        plain = b.denoiser(**inputs).sample
        net.apply_to()
        ours = b.denoiser(**inputs).sample
        net.unapply()
        again = lora.create_network_from_weights(str(path), unet=b.denoiser, text_encoders=b.text_encoders,
                                                 family="sd3")
        assert {m.lora_name for m in again.all_loras()} == set(ranks)
        again.apply_to()
        torch.testing.assert_close(b.denoiser(**inputs).sample, ours, atol=1e-5, rtol=1e-4)
        again.unapply()
    assert (ours - plain).abs().max() > 1e-3
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    theirs_model = SD3Transformer2DModel.from_pretrained(tiny.diffusers_dir, subfolder="transformer",
                                                         local_files_only=True)
    theirs_model.load_lora_adapter(to_diffusers_lora(unet_only, transformer_config=cfg), prefix="transformer",
                                   adapter_name="ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs_model(**inputs).sample, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra, want", [
    ([], {"textencoder": 1e-3}),  # CLIP-L + CLIP-G at learning_rate, T5-XXL frozen
    (["--learning_rate_te1", "2e-4", "--learning_rate_te3", "5e-5", "--train_t5xxl"],
     {"textencoder1": 2e-4, "textencoder2": 1e-3, "textencoder3": 5e-5}),
    (["--learning_rate_te", "3e-4", "--learning_rate_te1", "0"], {"textencoder": 3e-4}),  # CLIP-G only
])
def test_fine_tune_text_encoder_rates(tiny, tmp_path, extra, want):
    """sd3_train's train_text_encoder with learning_rate_te1/2/3 and train_t5xxl: each trained encoder's group and
    rate; frozen ones (rate 0, or T5-XXL without train_t5xxl) take no gradient and drop to the compute dtype."""
    from sd_scripts.models.loading import load_model
    from sd_scripts.training.full_methods import FineTuneMethod

    args = parse_args("finetune", ["--pretrained_model_name_or_path", tiny.single_file_with_text_encoders,
                                   "--in_json", "m.json", "--output_dir", str(tmp_path), "--train_text_encoder",
                                   "--learning_rate", "1e-3", "--mixed_precision", "bf16", *extra])
    bundle = load_model(tiny.single_file_with_text_encoders)
    groups, names = FineTuneMethod(args).build(bundle, family="sd3")
    assert dict(zip(names[1:], (g["lr"] for g in groups[1:]))) == want
    trained = [all(p.requires_grad for p in te.parameters()) for te in bundle.text_encoders]
    in_groups = {id(p) for g in groups[1:] for p in g["params"]}
    for te, on in zip(bundle.text_encoders, trained):
        assert all((id(p) in in_groups) == on for p in te.parameters())
        assert next(te.parameters()).dtype == (torch.float32 if on else torch.bfloat16)
    assert trained[2] == ("--train_t5xxl" in extra)
    why = _why("sd3", "sd3_train", "finetune", use_t5xxl_cache_only=True)
    assert why and "use_t5xxl_cache_only" in why and "not implemented" in why


def test_num_last_block_to_freeze_keeps_the_last_blocks(tiny, tmp_path):
    from sd_scripts.models.loading import load_model
    from sd_scripts.training.full_methods import FolderFineTuneMethod

    args = parse_args("finetune", ["--pretrained_model_name_or_path", tiny.single_file_with_text_encoders,
                                   "--output_dir", str(tmp_path), "--num_last_block_to_freeze", "1"])
    bundle = load_model(tiny.single_file_with_text_encoders)
    groups, _ = FolderFineTuneMethod(args).build(bundle, family="sd3")
    blocks = bundle.denoiser.transformer_blocks
    trained = {id(p) for p in groups[0]["params"]}
    assert not any(p.requires_grad or id(p) in trained for p in blocks[-1].parameters())
    assert all(p.requires_grad and id(p) in trained for p in blocks[0].parameters())
    args.num_last_block_to_freeze = len(blocks) + 1
    with pytest.raises(OptionError, match="num_last_block_to_freeze"):
        FolderFineTuneMethod(args).build(load_model(tiny.single_file_with_text_encoders), family="sd3")


def test_scaled_positional_tables(tiny):
    """enable_scaled_pos_embed: sd-scripts' scaled sine-cosine tables, one per training resolution, chosen by the
    latent's area and centre-cropped; without scaling (grid = sample) the table is diffusers' own 2D sincos table."""
    from argparse import Namespace

    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from sd_scripts.families.sd3.model import SD3Family, scaled_sincos_table
    from sd_scripts.models.loading import load_model

    theirs = get_2d_sincos_pos_embed(32, 6, base_size=16, interpolation_scale=1.0, output_type="pt")
    torch.testing.assert_close(scaled_sincos_table(32, 6, 6), theirs.float(), atol=1e-6, rtol=1e-5)
    bundle = load_model(tiny.single_file_with_text_encoders)
    pe = bundle.denoiser.pos_embed
    native = pe.cropped_pos_embed(8, 8).clone()
    family = SD3Family(bundle, Namespace(enable_scaled_pos_embed=True, t5xxl_max_token_length=8))
    family.use_resolutions([(64, 64), (128, 128), (64, 64)])
    width = pe.pos_embed.shape[-1]
    for latent, patched in ((8, 4), (16, 8)):
        grid = int(patched * 1.5)
        top = (grid - patched) // 2
        table = scaled_sincos_table(width, grid, patched).reshape(grid, grid, width)
        want = table[top:top + patched, top:top + patched].reshape(1, -1, width)
        torch.testing.assert_close(pe.cropped_pos_embed(latent, latent), want)
    assert not torch.allclose(pe.cropped_pos_embed(8, 8), native)
    tall = pe.cropped_pos_embed(40, 8)  # a bucket longer than any table: one is made for its long side
    assert tall.shape == (1, 20 * 4, width)


def test_noised_follows_sd3_flow_matching(family):
    torch.manual_seed(0)
    latents = torch.randn(3, 16, 4, 4)
    gen = torch.Generator().manual_seed(5)
    noised = family.noised(latents, gen)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=gen)
    u = torch.rand(3, generator=gen)  # weighting_scheme uniform: u ~ U[0, 1), training_shift 1
    t = (u * 1000).long().float()
    sigma = (t / 1000).reshape(3, 1, 1, 1)
    assert torch.equal(noised.timesteps, t)
    torch.testing.assert_close(noised.noisy, (1 - sigma) * latents + sigma * noise)
    assert torch.equal(noised.target, latents) and noised.weights is None


def test_training_shift_min_max_and_sigma_sqrt(family):
    family.density = dict(family.density, training_shift=3.0, min_timestep=100, max_timestep=500)
    family.weighting_scheme = "sigma_sqrt"
    try:
        gen = torch.Generator().manual_seed(2)
        noised = family.noised(torch.zeros(4, 16, 4, 4), gen)
        gen = torch.Generator().manual_seed(2)
        torch.randn(4, 16, 4, 4, generator=gen)
        u = torch.rand(4, generator=gen)
        u = u * 3 / (1 + 2 * u)
        t = (u * 400 + 100).long().float()
        assert torch.equal(noised.timesteps, t)
        torch.testing.assert_close(noised.weights, (t / 1000) ** -2.0)
    finally:
        family.density = dict(family.density, training_shift=1.0, min_timestep=None, max_timestep=None)
        family.weighting_scheme = "uniform"


def test_predict_is_preconditioned_and_context_is_padded(family):
    cond = family.encode_captions(["a dog", "a cat"], train_text_encoder=False)
    assert cond.lg_out.shape == (2, 77, 32 + 64) and cond.t5_out.shape == (2, 8, 128)
    assert cond.pooled.shape == (2, 96)
    context = family.context(cond)
    assert context.shape == (2, 85, 128) and torch.all(context[:, :77, 96:] == 0)
    assert torch.equal(context[:, 77:], cond.t5_out)
    from sd_scripts.families.base import NoisedLatents

    noisy = torch.randn(2, 16, 8, 8)
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        pred = family.predict(NoisedLatents(noisy, timesteps, noisy), cond, {})
        raw = family.bundle.denoiser(hidden_states=noisy, encoder_hidden_states=context, pooled_projections=cond.pooled,
                                     timestep=timesteps, return_dict=False)[0]
    torch.testing.assert_close(pred, raw * -torch.tensor([0.25, 0.75]).reshape(2, 1, 1, 1) + noisy)


def test_conditioning_matches_the_diffusers_pipeline(family):
    from diffusers import StableDiffusion3Pipeline

    b = family.bundle
    pipe = StableDiffusion3Pipeline(transformer=b.denoiser, scheduler=family.scheduler(None), vae=b.vae,
                                    text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0],
                                    text_encoder_2=b.text_encoders[1], tokenizer_2=b.tokenizers[1],
                                    text_encoder_3=b.text_encoders[2], tokenizer_3=b.tokenizers[2])
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a red dog", None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=8)
        ours = family.encode_tokens(family.tokenize(["a red dog"]))
    torch.testing.assert_close(family.context(ours), embeds)
    torch.testing.assert_close(ours.pooled, pooled)


def test_dropout_zeroes_each_encoders_part(family):
    cond = family.encode_captions(["a dog", "a cat", "a bird"], train_text_encoder=False)
    family.dropout_rates = (1.0, 0.0, 1.0)
    try:
        dropped = family.dropped(cond)
    finally:
        family.dropout_rates = (0.0, 0.0, 0.0)
    assert torch.all(dropped.lg_out[..., :32] == 0) and torch.equal(dropped.lg_out[..., 32:], cond.lg_out[..., 32:])
    assert torch.all(dropped.pooled[:, :32] == 0) and torch.equal(dropped.pooled[:, 32:], cond.pooled[:, 32:])
    assert torch.all(dropped.t5_out == 0)
    family.dropout_rates = (0.0, 0.5, 0.0)
    random.seed(3)
    try:
        dropped = family.dropped(cond)
    finally:
        family.dropout_rates = (0.0, 0.0, 0.0)
    random.seed(3)
    kept = [random.random() >= 0.5 for _ in range(3)]
    for i in range(3):
        assert torch.equal(dropped.lg_out[i, :, 32:], cond.lg_out[i, :, 32:] * float(kept[i]))


def test_cache_arrays_round_trip_with_sd_scripts_keys(family):
    cond = family.encode_captions(["a dog"], train_text_encoder=False)[0]
    arrays = family.cache_arrays(cond)
    assert {"lg_out", "t5_out", "lg_pooled", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask",
            "apply_lg_attn_mask", "apply_t5_attn_mask"} <= set(arrays)
    back = family.from_cache_arrays(arrays)
    assert torch.equal(back.lg_out, cond.lg_out) and torch.equal(back.t5_out, cond.t5_out)
    arrays["apply_t5_attn_mask"] = True
    assert family.from_cache_arrays(arrays) is None


def test_file_metadata_names_the_variant(family):
    assert family.adjust_metadata({"modelspec.architecture": "stable-diffusion-3-medium/lora"}) == {
        "ss_base_model_version": "medium", "modelspec.architecture": "stable-diffusion-3-medium/lora"}
    family.variant = "sd35_large"
    try:
        meta = family.adjust_metadata({"modelspec.architecture": "stable-diffusion-3-medium"})
    finally:
        family.variant = "sd3_medium"
    assert meta == {"ss_base_model_version": "5-large", "modelspec.architecture": "stable-diffusion-3-5-large"}


def test_missing_and_wrong_part_files_are_named_before_loading(tiny, tmp_path):
    from sd_scripts.models.loading import load_model

    with pytest.raises(ModelLoadError, match="does not include clip_l; pass --clip_l"):
        load_model(tiny.single_file)
    with pytest.raises(ModelLoadError, match="T5 encoder, not a CLIP text encoder; pass it as --t5xxl"):
        load_model(tiny.single_file, clip_l=tiny.t5xxl, clip_g=tiny.clip_g, t5xxl=tiny.t5xxl)
    with pytest.raises(ModelLoadError, match="a CLIP text encoder, but --t5xxl needs"):
        load_model(tiny.single_file, clip_l=tiny.clip_l, clip_g=tiny.clip_g, t5xxl=tiny.clip_l)
    with pytest.raises(ModelLoadError, match=r"nope.safetensors: no such file \(--clip_g\)"):
        load_model(tiny.single_file, clip_l=tiny.clip_l, clip_g=str(tmp_path / "nope.safetensors"))
    bundle = load_model(tiny.single_file, clip_l=tiny.clip_l, clip_g=tiny.clip_g, t5xxl=tiny.t5xxl)
    assert [type(t).__name__ for t in bundle.text_encoders] == ["CLIPTextModelWithProjection"] * 2 + \
        ["T5EncoderModel"]


def test_tiny_model_cli_writes_the_variant(tmp_path):
    from sd_scripts.families.sd3.layout import classify
    from sd_scripts.families import read_safetensors_header
    from sd_scripts.tools.tiny_model import main

    assert main(["--family", "sd35-medium", "--out", str(tmp_path), "--layout", "single"]) == 0
    shapes, _ = read_safetensors_header(str(tmp_path / "tiny-sd35_medium-incl-clips-t5.safetensors"))
    assert classify(shapes) == "sd35_medium"


def test_lora_file_applied_by_diffusers_equals_ours(tiny, tmp_path):
    """Every module of our SD3 LoRA file (fused q/k/v, the last context adaLN saved with its halves swapped) lands on
    the right diffusers layer: diffusers' transformer with the converted file gives our network's output."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from sd_scripts.families.sd3.lora_files import to_diffusers_lora
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    b = load_model(tiny.diffusers_dir)
    net = lora.create_network(unet=b.denoiser, text_encoders=b.text_encoders, family="sd3", network_dim=4,
                              network_alpha=2, train_text_encoder=False)
    assert any(m.lora_name.endswith("joint_blocks_2_context_block_adaLN_modulation_1") for m in net.all_loras())
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.all_loras():
            m.lora_up.weight.normal_(std=0.05)
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path))
    cfg = b.denoiser.config
    inputs = dict(hidden_states=torch.randn(1, cfg.in_channels, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim))
    net.apply_to()
    with torch.no_grad():
        ours = b.denoiser(**inputs).sample
    net.unapply()
    theirs_model = SD3Transformer2DModel.from_pretrained(tiny.diffusers_dir, subfolder="transformer",
                                                         local_files_only=True)
    converted = to_diffusers_lora(load_file(str(path)), transformer_config=cfg)
    theirs_model.load_lora_adapter(converted, prefix="transformer", adapter_name="ours")
    with torch.no_grad():
        theirs = theirs_model(**inputs).sample
        plain = b.denoiser(**inputs).sample
    assert (ours - plain).abs().max() > 1e-3, "precondition: the LoRA changes the output"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_lora_conversion_command_writes_a_file_diffusers_loads(tiny, tmp_path):
    """`python -m sd_scripts.families.sd3.lora_files` turns our file into diffusers' layout: StableDiffusion3Pipeline
    loads it with every tensor placed; a T5 LoRA module is refused with a one-line error."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file, save_file

    from sd_scripts.families.sd3.lora_files import main
    from sd_scripts.models.loading import load_model
    from sd_scripts.networks import lora

    b = load_model(tiny.diffusers_dir)
    net = lora.create_network(unet=b.denoiser, text_encoders=b.text_encoders, family="sd3", network_dim=4,
                              network_alpha=2)
    with torch.no_grad():
        for m in net.all_loras():
            m.lora_up.weight.fill_(0.01)
    ours = tmp_path / "ours.safetensors"
    net.save_weights(str(ours))
    out = tmp_path / "diffusers_lora.safetensors"
    assert main(["--lora", str(ours), "--model", tiny.diffusers_dir, "--out", str(out)]) == 0
    converted = load_file(str(out))
    assert any(k.startswith("text_encoder.") for k in converted) and any(k.startswith("text_encoder_2.")
                                                                         for k in converted)
    model = SD3Transformer2DModel.from_pretrained(tiny.diffusers_dir, subfolder="transformer", local_files_only=True)
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="x")
    from peft.utils import get_peft_model_state_dict

    assert len(get_peft_model_state_dict(model, adapter_name="x")) == sum(k.startswith("transformer.")
                                                                           for k in converted)
    t5_only = tmp_path / "t5.safetensors"
    save_file({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 8),
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(8, 4)}, str(t5_only))
    assert main(["--lora", str(t5_only), "--model", tiny.diffusers_dir, "--out", str(tmp_path / "x.safetensors")]) == 1


def test_input_perturbation_and_huber_loss(family):
    """ip_noise_gamma perturbs only the noisy input (as sd-scripts' FLUX.1 trainer defines it for flow matching);
    loss_type huber with a constant threshold huber_c * huber_scale; the DDPM 'snr' schedule is refused."""
    from argparse import Namespace

    from sd_scripts.families.sd3.model import SD3Family
    from sd_scripts.training.loss import training_loss

    args = Namespace(t5xxl_max_token_length=8, weighting_scheme="uniform", training_shift=1.0, ip_noise_gamma=0.4,
                     loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=1.5)
    perturbed = SD3Family(family.bundle, args)
    latents = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    noised = perturbed.noised(latents, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=gen)
    t = (torch.rand(3, generator=gen) * 1000).long().float()
    xi = torch.randn(latents.shape, generator=gen)
    sigma = (t / 1000).reshape(3, 1, 1, 1)
    assert torch.equal(noised.timesteps, t)
    torch.testing.assert_close(noised.noisy, (1 - sigma) * latents + sigma * (noise + 0.4 * xi))
    assert torch.equal(noised.target, latents)
    assert noised.loss_type == "huber" and torch.allclose(noised.huber_c, torch.full((3,), 0.3))
    pred = torch.randn(latents.shape, generator=gen)
    d = pred - latents
    expected = (2 * 0.3 * (torch.sqrt(d ** 2 + 0.09) - 0.3)).mean()
    loss = training_loss(pred, noised.target, None, noised.weights, loss_type=noised.loss_type,
                         huber_c=noised.huber_c)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(OptionError, match="'huber_schedule'.*constant or exponential"):
        SD3Family(family.bundle, Namespace(t5xxl_max_token_length=8, loss_type="smooth_l1"))
