"""The FLUX.1 / Chroma family on the shared loop: detection through the registry, options accepted and refused, the
step's maths on known inputs, packing, LoRA names and the fused-module file forms, diffusers' reading of our files."""
from __future__ import annotations

import copy

import pytest
import torch

from sd_scripts.families import all_families, check_run, detect_folder, detect_single_file, family_class, probe_model
from sd_scripts.families.flux import layout
from sd_scripts.options import BY_NAME, OptionError, parse_args

DEFAULTS = {name: o.default for name, o in BY_NAME.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd_scripts.tools.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("flux")
    flux = build_tiny_model(str(root / "flux"), "flux", layout="both", model_type="flux_dev")
    chroma = build_tiny_model(str(root / "chroma"), "chroma", layout="single")
    return root, flux, chroma


def _load(root, kind="flux", **options):
    from sd_scripts.models.loading import load_model

    folder = root / kind
    name = "flux1-tiny.safetensors" if kind == "flux" else "chroma-tiny.safetensors"
    parts = dict(t5xxl=str(folder / "t5xxl.safetensors"), ae=str(folder / "ae.safetensors"))
    if kind == "flux":
        parts["clip_l"] = str(folder / "clip_l.safetensors")
    return load_model(str(folder / name), **parts, **options)


# ---------------------------------------------------------------- registry


def test_specs_and_detection_of_real_key_sets():
    specs = all_families()
    flux, chroma = specs["flux"], specs["chroma"]
    assert (flux.bucket_step, flux.default_resolution, flux.vae_scaling_factor, flux.vae_shift_factor) == \
        (16, 1024, 0.3611, 0.1159)
    assert flux.lora_te_prefixes == ("lora_te1", "lora_te3") and chroma.lora_te_prefixes == ("lora_te3",)
    assert (flux.base_model_version, flux.modelspec_architecture, chroma.modelspec_architecture) == \
        ("flux1", "flux-1-dev", "chroma")
    for config, want in ((dict(layout.FLUX_DEV_CONFIG, _class_name="FluxTransformer2DModel"), "flux"),
                         (dict(layout.FLUX_SCHNELL_CONFIG, _class_name="FluxTransformer2DModel"), "flux"),
                         (dict(layout.CHROMA_CONFIG, _class_name="ChromaTransformer2DModel"), "chroma")):
        keys = {r.bfl: (1,) for r in layout.transformer_key_table(config)}
        assert detect_single_file(keys).family == want
        comfy = {layout.COMFY_PREFIX + k: v for k, v in keys.items()}
        assert detect_single_file(comfy).family == want


def test_probe_tiny_files_and_folder(tiny):
    root, flux, chroma = tiny
    assert probe_model(flux.single_file).family == "flux"
    assert probe_model(flux.diffusers_dir).family == "flux" and detect_folder(flux.diffusers_dir).family == "flux"
    assert probe_model(chroma.single_file).family == "chroma"
    assert (root / "flux" / "clip_l.safetensors").is_file() and not (root / "chroma" / "clip_l.safetensors").exists()


# ---------------------------------------------------------------- options


def test_flux_options_parse_with_sd_scripts_defaults():
    args = parse_args("network", ["--clip_l", "c", "--t5xxl", "t", "--ae", "a", "--model_type", "chroma",
                                  "--timestep_sampling", "flux_shift", "--apply_t5_attn_mask",
                                  "--network_module", "networks.lora_flux"])
    assert (args.guidance_scale, args.model_prediction_type, args.discrete_flow_shift, args.weighting_scheme,
            args.sigmoid_scale, args.logit_mean, args.logit_std, args.mode_scale) == \
        (3.5, "sigma_scaled", None, "uniform", 1.0, 0.0, 1.0, 1.29)  # discrete_flow_shift None: FLUX.1's 3.0
    assert args.apply_t5_attn_mask and args.model_type == "chroma" and args.t5xxl_max_token_length is None
    with pytest.raises(OptionError, match="timestep_sampling"):
        parse_args("network", ["--timestep_sampling", "cosine"])
    assert BY_NAME["clip_l"].group == "model" and BY_NAME["timestep_sampling"].group == "noise"
    assert "flux" in BY_NAME["clip_l"].families and "chroma" not in BY_NAME["clip_l"].families \
        and "chroma" in BY_NAME["t5xxl"].families


@pytest.mark.parametrize("family, trainer, script, values, words", [
    ("flux", "network", "train_network", {}, ["flux_train_network"]),
    ("flux", "finetune", "fine_tune", {}, ["flux_train"]),
    ("sd1", "network", "flux_train_network", {}, ["flux_train_network", "FLUX.1", "Stable Diffusion 1.x"]),
    ("flux", "db", "train_db", {}, ["db trainer"]),
    ("flux", "network", "flux_train_network", {"v_parameterization": True}, ["'v_parameterization'", "remove"]),
    ("flux", "network", "flux_train_network", {"clip_skip": 2}, ["'clip_skip'", "pooled"]),
    ("flux", "network", "flux_train_network", {"noise_offset": 0.1}, ["'noise_offset'"]),
    ("chroma", "network", "flux_train_network", {"clip_l": "x"}, ["'clip_l'", "Chroma"]),
])
def test_runs_refused_with_the_reason(family, trainer, script, values, words):
    message = check_run(family, trainer=trainer, script=script, values=dict(DEFAULTS, **values), defaults=DEFAULTS)
    assert message is not None and all(w in message for w in words), message


def test_runs_accepted():
    assert check_run("flux", trainer="network", script="flux_train_network", values=dict(DEFAULTS),
                     defaults=DEFAULTS) is None
    assert check_run("chroma", trainer="finetune", script="flux_train", values=dict(DEFAULTS),
                     defaults=DEFAULTS) is None
    memory = dict(blocks_to_swap=8, fp8_base=True, fp8_base_unet=True, cpu_offload_checkpointing=True)
    assert check_run("flux", trainer="network", script="flux_train_network", values=dict(DEFAULTS, **memory),
                     defaults=DEFAULTS) is None  # implemented (training/memory.py), no longer refused
    for family in ("sd1", "sdxl"):  # the generic scripts keep training the SD families; FLUX options are refused
        assert check_run(family, trainer="network", script="train_network",
                         values=dict(DEFAULTS, no_half_vae=True), defaults=DEFAULTS) is None
        assert "option 'guidance_scale' is for FLUX.1" in check_run(
            family, trainer="network", script="train_network", values=dict(DEFAULTS, guidance_scale=5.0),
            defaults=DEFAULTS)


def test_schnell_refuses_a_guidance_value_before_loading(tiny, tmp_path):
    """FLUX.1-schnell (no guidance embedding) given dev's guidance setting: refused naming the option, torch-free
    from the file's header (single file and diffusers folder), by the trainer before it loads anything."""
    from sd_scripts.tools.tiny_model import build_tiny_model
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    schnell = build_tiny_model(str(tmp_path / "schnell"), "flux", layout="both", model_type="flux_schnell")
    assert probe_model(schnell.single_file).variant == "flux_schnell"
    assert probe_model(schnell.diffusers_dir).variant == "flux_schnell"
    assert probe_model(tiny[1].single_file).variant == "flux_dev"
    values = dict(DEFAULTS, guidance_scale=1.0)
    why = check_run("flux", trainer="network", script="flux_train_network", values=values, defaults=DEFAULTS,
                    variant="flux_schnell", source="s.safetensors")
    assert "option 'guidance_scale'" in why and "schnell has no guidance embedding" in why and "remove it" in why
    assert check_run("flux", trainer="network", script="flux_train_network", values=values, defaults=DEFAULTS,
                     variant="flux_dev") is None
    assert check_run("flux", trainer="network", script="flux_train_network", values=dict(DEFAULTS),
                     defaults=DEFAULTS, variant="flux_schnell") is None
    args = parse_args("network", ["--pretrained_model_name_or_path", schnell.single_file, "--output_dir",
                                  str(tmp_path / "out"), "--train_data_dir", str(tmp_path), "--guidance_scale", "1.0"])
    args.trainer_kind, args.trainer_script = "network", "flux_train_network"
    with pytest.raises(OptionError, match="guidance_scale"):
        Trainer(args, NetworkMethod(args))._check_family()


# ---------------------------------------------------------------- the step


def test_packing_round_trip_matches_diffusers():
    from diffusers import FluxPipeline

    from sd_scripts.families.flux.model import image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


@pytest.mark.parametrize("sampling", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_noised_on_known_inputs(tiny, sampling):
    from sd_scripts.training import flow_matching as fm

    bundle = _load(tiny[0])
    family = family_class("flux")(bundle, None, timestep_sampling=sampling, weighting_scheme="sigma_sqrt",
                                  discrete_flow_shift=2.0, sigmoid_scale=1.5)
    latents = torch.randn(3, 16, 8, 12)
    out = family.noised(latents, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    sigmas, _ = fm.sample_flux_sigmas(sampling, 3, latent_height=8, latent_width=12, sigmoid_scale=1.5,
                                      discrete_flow_shift=2.0, weighting_scheme="sigma_sqrt", generator=g)
    s = sigmas.view(3, 1, 1, 1)
    assert torch.allclose(out.noisy, (1 - s) * latents + s * noise, atol=1e-6)
    assert torch.allclose(out.target, noise - latents) and torch.allclose(out.timesteps, sigmas * 1000)
    assert torch.allclose(out.weights, sigmas ** -2.0)
    raw = family_class("flux")(bundle, None, model_prediction_type="raw").noised(latents, None)
    assert raw.weights is None



def test_input_perturbation_and_loss_types(tiny):
    """ip_noise_gamma (with random strength) perturbs only the noisy input, as sd-scripts' FLUX.1 trainer; the loss
    type and the exponential Huber threshold on t = sigma * 1000; the DDPM 'snr' schedule is refused."""
    from sd_scripts.training.loss import training_loss

    bundle = _load(tiny[0])
    family = family_class("flux")(bundle, None, timestep_sampling="uniform", model_prediction_type="raw",
                                  ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True, loss_type="smooth_l1",
                                  huber_schedule="exponential", huber_c=0.2, huber_scale=2.0)
    latents = torch.randn(3, 16, 8, 8)
    out = family.noised(latents, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=g)
    sigmas = torch.rand(3, generator=g)
    strength = torch.rand((), generator=g) * 0.5
    xi = torch.randn(latents.shape, generator=g)
    s = sigmas.view(3, 1, 1, 1)
    assert 0 < float(strength) < 0.5
    torch.testing.assert_close(out.noisy, (1 - s) * latents + s * (noise + strength * xi))
    assert torch.allclose(out.target, noise - latents)
    c = 2.0 * 0.2 ** sigmas  # huber_scale at t = 0 down to huber_c * huber_scale at t = 1000
    assert out.loss_type == "smooth_l1"
    torch.testing.assert_close(out.huber_c, c)
    pred = torch.randn(latents.shape, generator=g)
    d, c4 = pred - out.target, c.view(3, 1, 1, 1)
    expected = (2 * (torch.sqrt(d ** 2 + c4 ** 2) - c4)).mean()
    loss = training_loss(pred, out.target, None, out.weights, loss_type=out.loss_type, huber_c=out.huber_c)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(OptionError, match="'huber_schedule'.*constant or exponential"):
        family_class("flux")(bundle, None, loss_type="huber")

def test_prediction_types(tiny):
    bundle = _load(tiny[0])
    fams = {t: family_class("flux")(bundle, None, model_prediction_type=t, t5xxl_max_token_length=16)
            for t in ("raw", "additive", "sigma_scaled")}
    cond = fams["raw"].encode_captions(["a cat", "a dog"], train_text_encoder=False)
    assert cond.t5.shape == (2, 16, 48) and cond.pooled.shape == (2, 64)
    noised = fams["raw"].noised(torch.randn(2, 16, 8, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw, add, scaled = (fams[t].predict(noised, cond, {}) for t in ("raw", "additive", "sigma_scaled"))
    s = (noised.timesteps / 1000).view(2, 1, 1, 1)
    assert torch.allclose(add, raw + noised.noisy, atol=1e-6)
    assert torch.allclose(scaled, raw * -s + noised.noisy, atol=1e-6)
    guided = family_class("flux")(bundle, None, model_prediction_type="raw", t5xxl_max_token_length=16,
                                  guidance_scale=1.0)
    with torch.no_grad():  # the guidance embedding reaches the dev model
        assert not torch.allclose(guided.predict(noised, cond, {}), raw)
    masked = family_class("flux")(bundle, None, model_prediction_type="raw", t5xxl_max_token_length=16,
                                  apply_t5_attn_mask=True)
    with torch.no_grad():
        assert not torch.allclose(masked.predict(noised, masked.encode_captions(["a cat", "a dog"],
                                                                                train_text_encoder=False), {}), raw)


# ---------------------------------------------------------------- LoRA


def _network(bundle, **kwargs):
    from sd_scripts.networks import lora

    kwargs.setdefault("network_dim", 4)
    kwargs.setdefault("network_alpha", 2)
    return lora.create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders, family=bundle.family,
                               **kwargs)


def test_lora_names_follow_sd_scripts(tiny):
    bundle = _load(tiny[0])
    names = {k.split(".")[0] for k in _network(bundle).lora_state_dict()}
    unet = {n for n in names if n.startswith("lora_unet_")}
    per_double = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mod_lin",
                  "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
    want = {f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in per_double} | \
        {f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in ("linear1", "linear2", "modulation_lin")}
    assert unet == want
    assert {n for n in names if n.startswith("lora_te")} == {
        f"lora_te1_text_model_encoder_layers_{i}_{m}" for i in range(2)
        for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                  "mlp_fc2")}
    double = {k.split(".")[0] for k in _network(bundle, network_args=["train_blocks=double"]).lora_state_dict()}
    assert {n for n in double if n.startswith("lora_unet")} == {n for n in want if "double" in n}
    t5 = {k.split(".")[0] for k in _network(bundle, network_args=["train_t5xxl=True"]).lora_state_dict()}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    from sd_scripts.errors import NetworkError

    with pytest.raises(NetworkError, match="unknown key 'nope'"):
        _network(bundle, network_args=["nope=1"])
    with pytest.raises(NetworkError, match="train_blocks"):
        _network(bundle, network_args=["train_blocks=middle"])


def _randomise(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.1)


def _forward(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 16, 64, generator=g)
    text = torch.randn(1, 5, 48, generator=g)
    with torch.no_grad():
        return bundle.denoiser(hidden_states=hidden, encoder_hidden_states=text,
                               pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
                               img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.0]),
                               return_dict=False)[0]


@pytest.mark.parametrize("split", [False, True])
def test_fused_save_load_round_trip(tiny, tmp_path, split):
    from safetensors.torch import load_file

    from sd_scripts.networks import lora

    bundle = _load(tiny[0])
    base = _forward(bundle)
    args = ["split_qkv=True"] if split else []
    net = _network(bundle, network_args=args)
    _randomise(net)
    net.apply_to()
    want = _forward(bundle)
    assert not torch.allclose(want, base)
    path = str(tmp_path / "l.safetensors")
    net.save_weights(path)
    net.unapply()
    tensors = load_file(path)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    rank = 12 if split else 4  # block-diagonal: three downs of rank 4; shared: one
    assert tensors[key + ".lora_down.weight"].shape == (rank, 32)
    assert tensors[key + ".lora_up.weight"].shape == (96, rank)
    assert float(tensors[key + ".alpha"]) == (6.0 if split else 2.0)  # alpha/rank stays 0.5
    for again_split in (False, True):  # into a fresh network of either kind
        other = _network(bundle, network_args=["split_qkv=True"] if again_split else [])
        if split and not again_split:
            other = lora.create_network_from_weights(path, unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                                     family="flux")
        else:
            other.load_weights(path)
        other.apply_to()
        assert torch.allclose(_forward(bundle), want, atol=1e-5)
        other.unapply()
    assert torch.allclose(_forward(bundle), base)


def test_per_layer_ranks_input_layers_and_block_selection(tiny, tmp_path, caplog):
    """lora_flux's network_args: ranks per layer kind (0 leaves the kind out), in_dims adapts the input layers,
    train_*_block_indices keep only those blocks, network_reg_dims wins over the rest; the file's modules (the
    input layers too) load back into a network shaped from the file, and `verbose` logs each module."""
    import logging

    from safetensors.torch import load_file

    from sd_scripts.errors import NetworkError
    from sd_scripts.networks import lora

    bundle = _load(tiny[0])
    base = _forward(bundle)
    args = ["img_attn_dim=2", "txt_mlp_dim=0", "single_mod_dim=6", "train_single_block_indices=1",
            "in_dims=[3,0,0,5,2]", "network_reg_dims=double_blocks_1_img_mod=7", "verbose=True"]
    with caplog.at_level(logging.INFO, logger="sd_scripts.train"):
        net = _network(bundle, network_args=args)
    ranks = {m.lora_name: m.rank for m in net.all_loras()}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == ranks["lora_unet_double_blocks_1_img_attn_proj"] == 2
    assert ranks["lora_unet_double_blocks_0_txt_attn_qkv"] == ranks["lora_unet_double_blocks_0_img_mod_lin"] == 4
    assert ranks["lora_unet_double_blocks_1_img_mod_lin"] == 7  # the regular expression wins
    assert ranks["lora_unet_single_blocks_1_modulation_lin"] == 6
    assert not any("txt_mlp" in n or "single_blocks_0_" in n for n in ranks)
    # in_dims = [img, time, vector, guidance, txt]: time / vector (0) left out
    assert (ranks["lora_unet_img_in"], ranks["lora_unet_guidance_in_in_layer"], ranks["lora_unet_txt_in"]) == (3, 5, 2)
    assert not any("time_in" in n or "vector_in" in n for n in ranks)
    assert "lora_unet_double_blocks_0_txt_mlp_0" in net.skipped
    assert "lora_unet_img_in" in caplog.text and "left out (rank 0)" in caplog.text
    _randomise(net, 7)
    net.apply_to()
    want = _forward(bundle)
    net.unapply()
    assert not torch.allclose(want, base)
    path = str(tmp_path / "ranks.safetensors")
    net.save_weights(path)
    assert load_file(path)["lora_unet_img_in.lora_down.weight"].shape[0] == 3
    again = lora.create_network_from_weights(path, unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                             family="flux")
    assert {m.lora_name: m.rank for m in again.all_loras()} == ranks
    again.apply_to()
    assert torch.allclose(_forward(bundle), want, atol=1e-5)
    again.unapply()
    with pytest.raises(NetworkError, match="train_double_block_indices='0-5'.*2 blocks"):
        _network(bundle, network_args=["train_double_block_indices=0-5"])
    with pytest.raises(NetworkError, match="in_dims.*5 ranks"):
        _network(bundle, network_args=["in_dims=[1,2]"])


def test_sd_scripts_shared_form_loads_into_split_network(tiny, tmp_path):
    bundle = _load(tiny[0])
    shared = _network(bundle)
    _randomise(shared, 3)
    shared.apply_to()
    want = _forward(bundle)
    shared.unapply()
    path = str(tmp_path / "shared.safetensors")
    shared.save_weights(path)
    split = _network(bundle, network_args=["split_qkv=True"])
    split.load_weights(path)
    split.apply_to()
    assert torch.allclose(_forward(bundle), want, atol=1e-5)
    split.unapply()


def test_diffusers_reads_every_key(tiny, tmp_path):
    """FluxPipeline.load_lora_weights gives the same transformer as our network (so every key was used). diffusers'
    kohya converter knows single blocks only at FLUX.1's real widths, so the tiny model's file has double blocks."""
    from diffusers import FluxPipeline

    root, flux, _ = tiny
    bundle = _load(root)
    base = _forward(bundle)
    net = _network(bundle, network_args=["train_blocks=double"], train_text_encoder=False)
    _randomise(net, 5)
    net.apply_to()
    want = _forward(bundle)
    net.unapply()
    path = str(tmp_path / "d.safetensors")
    net.save_weights(path)
    pipe = FluxPipeline.from_pretrained(flux.diffusers_dir, local_files_only=True)
    pipe.load_lora_weights(path)
    theirs = copy.copy(bundle)
    theirs.denoiser = pipe.transformer
    got = _forward(theirs)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-4)


def test_metadata_names(tiny):
    bundle = _load(tiny[0])
    family = family_class("flux")(bundle)
    meta = family.adjust_metadata({"modelspec.architecture": "flux-1-dev/lora", "modelspec.prediction_type": "epsilon",
                                   "ss_model_type": "None", "ss_network_module": "networks.lora"})
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and "modelspec.prediction_type" not in meta
    assert meta["ss_model_type"] == "flux" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"


def test_given_timesteps_replace_the_drawn_ones(tiny):
    """The validation loss's fixed timesteps: sigma = t / 1000 whatever the sampling, the noise from the generator."""
    family = family_class("flux")(_load(tiny[0]), None, timestep_sampling="shift", weighting_scheme="sigma_sqrt")
    latents = torch.randn(2, 16, 8, 8)
    out = family.noised(latents, torch.Generator().manual_seed(4), torch.tensor([200, 600]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    s = torch.tensor([0.2, 0.6])
    assert torch.allclose(out.noisy, (1 - s.view(2, 1, 1, 1)) * latents + s.view(2, 1, 1, 1) * noise, atol=1e-6)
    assert torch.allclose(out.timesteps, s * 1000) and torch.allclose(out.weights, s ** -2.0)
    assert family.timestep_range() == (0, 1000)
