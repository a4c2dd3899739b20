"""The Anima family: detection of real-size key sets, the DiT against an independent MiniTrainDIT formulation (the
file's own tensor names), loading and the wrong-file errors, the step's maths, sd-scripts' lora_anima names and
network_args, LoRA / LoHa files read back through our loader, per-part learning rates, metadata."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sd_scripts.errors import ModelLoadError
from sd_scripts.families import check_run, detect_single_file, family_class
from sd_scripts.families.anima import layout
from sd_scripts.options import parse_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sd_scripts.families.anima.tiny import build_tiny_anima

    return build_tiny_anima(str(tmp_path_factory.mktemp("anima")))


def _load(tiny, **options):
    from sd_scripts.models.loading import load_model

    return load_model(tiny["pretrained_model_name_or_path"], qwen3=tiny["qwen3"], vae=tiny["vae"], **options)


@pytest.fixture(scope="module")
def bundle(tiny):
    return _load(tiny)


# ---------------------------------------------------------------- detection and files


def _real_shapes():
    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3Model

    from sd_scripts.families.anima.weights import build_transformer, transformer_state

    dit = build_transformer(layout.REAL_CONFIG, layout.REAL_ADAPTER)
    shapes = {k: tuple(v.shape) for k, v in transformer_state(dit).items()}
    with init_empty_weights():
        qwen = Qwen3Model(Qwen3Config(**layout.QWEN3_CONFIG))
    return shapes, {f"model.{k}": tuple(v.shape) for k, v in qwen.state_dict().items()}, dit


def test_real_size_key_sets():
    shapes, qwen_shapes, dit = _real_shapes()
    assert shapes["net.x_embedder.proj.1.weight"] == (2048, 68)  # 16 latent + 1 padding-mask channel, 2x2 patches
    assert shapes["net.llm_adapter.embed.weight"] == (32128, 1024)
    assert sum(v.numel() for v in dit.parameters()) / 1e9 == pytest.approx(2.1, abs=0.1)
    assert detect_single_file(shapes).family == "anima"
    bare = {k[len("net."):]: v for k, v in shapes.items()}
    assert detect_single_file(bare).family == "anima"
    config = layout.infer_dit_config(shapes)
    assert {k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "text_embed_dim",
                                   "adaln_lora_dim", "in_channels")} == \
        dict(num_layers=28, num_attention_heads=16, attention_head_dim=128, text_embed_dim=1024, adaln_lora_dim=256,
             in_channels=16)
    assert layout.infer_adapter_config(shapes) == layout.REAL_ADAPTER
    from sd_scripts.families.anima.weights import qwen3_config

    got = qwen3_config(qwen_shapes, "model.")
    assert {k: got[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "intermediate_size", "vocab_size")} == \
        {k: layout.QWEN3_CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}
    # a Cosmos-Predict2 DiT without the adapter is not Anima; the part files are nobody's model
    no_adapter = {k: v for k, v in shapes.items() if "llm_adapter" not in k}
    for other in (no_adapter, qwen_shapes):
        found = None
        try:
            found = detect_single_file(other)
        except ModelLoadError:
            pass
        assert found is None or found.family != "anima"


def test_vae_key_table_matches_diffusers():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage

    with init_empty_weights():
        vae = AutoencoderKLQwenImage(**layout.VAE_CONFIG)
    table = dict((d, f) for f, d in layout.vae_module_table(layout.VAE_CONFIG))
    modules = {k.rpartition(".")[0] for k in vae.state_dict()}
    assert modules <= set(table)
    assert table["decoder.up_blocks.1.resnets.0.conv_shortcut"] == "decoder.upsamples.4.shortcut"
    assert table["encoder.down_blocks.8.time_conv"] == "encoder.downsamples.8.time_conv"


def test_tiny_files_load_and_wrong_files_are_named(tiny, bundle, tmp_path):
    assert bundle.family == "anima" and type(bundle.denoiser).__name__ == "AnimaTransformer"
    assert type(bundle.text_encoders[0]).__name__ == "Qwen3Model"
    assert type(bundle.vae).__name__ == "AutoencoderKLQwenImage"
    with pytest.raises(ModelLoadError, match="--qwen3.*Qwen3|Qwen-Image / Wan VAE.*--qwen3"):
        _load(dict(tiny, qwen3=tiny["vae"]))
    with pytest.raises(ModelLoadError, match="--vae"):
        _load(dict(tiny, vae=tiny["qwen3"]))
    with pytest.raises(ModelLoadError, match="--qwen3"):
        _load(dict(tiny, qwen3=None))
    # the DiT round trip is exact; a separate adapter file replaces the DiT's
    from safetensors.torch import load_file, save_file

    from sd_scripts.families.anima.weights import load_transformer, save_transformer

    path = str(tmp_path / "again.safetensors")
    save_transformer(bundle.denoiser, path)
    a, b = load_file(tiny["pretrained_model_name_or_path"]), load_file(path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapter = {k[len("net."):]: v * 0 for k, v in a.items() if k.startswith("net.llm_adapter.")}
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    model, _, _ = load_transformer(path, llm_adapter_path=str(tmp_path / "adapter.safetensors"))
    assert float(model.llm_adapter.out_proj.weight.detach().abs().sum()) == 0


# ---------------------------------------------------------------- the DiT against MiniTrainDIT


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _minitraindit(sd, x, sigma, ctx, heads):
    """MiniTrainDIT's forward for one frame, written from the file's tensors (Cosmos-Predict2 / sd-scripts'
    anima_models, independently of diffusers): padding-mask channel, 2x2 patches, [cos, sin] timestep features ->
    RMS norm + adaLN-LoRA, 3D RoPE (NTK 1/4/4), q/k RMS norms (eps 1e-6), adaLN-modulated blocks, final layer."""
    g = lambda k: sd["net." + k].float()  # noqa: E731
    b, c, h, w = x.shape
    x = torch.cat([x, torch.zeros(b, 1, h, w)], 1)
    tok = x.view(b, c + 1, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), -1)
    hs = tok @ g("x_embedder.proj.1.weight").T
    d = hs.shape[-1]
    half = d // 2
    ang = sigma[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    emb = torch.cat([ang.cos(), ang.sin()], -1)
    lora = F.silu(emb @ g("t_embedder.1.linear_1.weight").T) @ g("t_embedder.1.linear_2.weight").T
    temb = _rms(emb, g("t_embedding_norm.weight"))
    hd = d // heads
    dh = hd // 6 * 2
    dt = hd - 2 * dh

    def freqs(dim, ratio, n):
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        return torch.outer(torch.arange(n).float(), 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim))

    fh, fw, ft = freqs(dh, 4.0, h // 2), freqs(dh, 4.0, w // 2), freqs(dt, 1.0, 1)
    grid = torch.cat([ft[0].expand(h // 2, w // 2, -1), fh[:, None].expand(-1, w // 2, -1),
                      fw[None].expand(h // 2, -1, -1)], -1).reshape(-1, hd // 2)
    angles = torch.cat([grid, grid], -1)

    def rope(t):
        a, bb = t.chunk(2, -1)
        return t * angles.cos() + torch.cat([-bb, a], -1) * angles.sin()

    def attention(p, q_in, kv_in, use_rope):
        q = (q_in @ g(p + "q_proj.weight").T).unflatten(-1, (heads, hd))
        k = (kv_in @ g(p + "k_proj.weight").T).unflatten(-1, (heads, hd))
        v = (kv_in @ g(p + "v_proj.weight").T).unflatten(-1, (heads, hd))
        q, k = _rms(q, g(p + "q_norm.weight")), _rms(k, g(p + "k_norm.weight"))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if use_rope:
            q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        return att.transpose(1, 2).flatten(2) @ g(p + "output_proj.weight").T

    def modulation(p, n):
        out = F.silu(temb) @ g(p + ".1.weight").T @ g(p + ".2.weight").T + lora[:, : n * d]
        return [t[:, None] for t in out.chunk(n, -1)]

    ln = lambda t: F.layer_norm(t, (d,), eps=1e-6)  # noqa: E731
    i = 0
    while f"net.blocks.{i}.self_attn.q_proj.weight" in sd:
        p = f"blocks.{i}."
        shift, scale, gate = modulation(p + "adaln_modulation_self_attn", 3)
        n = ln(hs) * (1 + scale) + shift
        hs = hs + gate * attention(p + "self_attn.", n, n, True)
        shift, scale, gate = modulation(p + "adaln_modulation_cross_attn", 3)
        hs = hs + gate * attention(p + "cross_attn.", ln(hs) * (1 + scale) + shift, ctx, False)
        shift, scale, gate = modulation(p + "adaln_modulation_mlp", 3)
        n = ln(hs) * (1 + scale) + shift
        hs = hs + gate * (F.gelu(n @ g(p + "mlp.layer1.weight").T) @ g(p + "mlp.layer2.weight").T)
        i += 1
    shift, scale = modulation("final_layer.adaln_modulation", 2)
    out = (ln(hs) * (1 + scale) + shift) @ g("final_layer.linear.weight").T
    return out.view(b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def test_dit_matches_minitraindit(tiny, bundle):
    from safetensors.torch import load_file

    sd = load_file(tiny["pretrained_model_name_or_path"])
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 5, 40, generator=g)
    sigma = torch.tensor([0.25, 0.8])
    with torch.no_grad():
        ours = bundle.denoiser(x, sigma, None, context=ctx)
    want = _minitraindit(sd, x, sigma, ctx, heads=2)
    assert torch.allclose(ours, want, atol=1e-5), (ours - want).abs().max()


# ---------------------------------------------------------------- options, conditioning, the step


def test_options_defaults_and_refusals():
    args = parse_args("network", ["--qwen3", "q.safetensors"])
    assert (args.qwen3_max_token_length, args.t5_max_token_length, args.timestep_sampling,
            args.discrete_flow_shift) == (512, 512, None, None)
    assert check_run("anima", trainer="network", script="anima_train_network", values={"fp8_base": True}) \
        and "fp8" in check_run("anima", trainer="network", script="anima_train_network", values={"fp8_base": True})
    assert "clip_l" in (check_run("anima", trainer="network", script="anima_train_network",
                                  values={"clip_l": "x"}) or "")
    assert "cache_latents" in (check_run("anima", trainer="network", script="anima_train_network",
                                         values={"vae_chunk_size": 16}) or "")
    assert "anima_train_network" in (check_run("anima", trainer="network", script="train_network", values={}) or "")
    assert "anima" not in (check_run("flux", trainer="network", script="flux_train_network",
                                     values={"qwen3": "x"}) or "anima")  # refused for FLUX.1, naming the option
    assert "qwen3" in (check_run("flux", trainer="network", script="flux_train_network", values={"qwen3": "x"}) or "")


def test_conditioning_and_step_maths(bundle):
    fam = family_class("anima")(bundle, None, qwen3_max_token_length=8, t5_max_token_length=6)
    cond = fam.encode_captions(["a photo of sks dog", ""], train_text_encoder=False)
    assert cond.qwen.shape == (2, 8, 16) and cond.t5_ids.shape == (2, 6)
    assert cond.qwen_mask[0].sum() == len(fam.qwen_tokenizer("a photo of sks dog").input_ids)
    # "" has no Qwen tokens (every row padding, zeroed) and T5's </s> alone: sd-scripts' dropped-caption conditioning
    assert float(cond.qwen[1].abs().sum()) == 0 and int(cond.qwen_mask[1].sum()) == 0
    assert cond.t5_ids[1].tolist() == [1, 0, 0, 0, 0, 0]
    assert cond.t5_ids[0].tolist()[:4] == [3, 9, 1202, 13] and cond.t5_mask[1].tolist() == [1, 0, 0, 0, 0, 0]
    assert fam.timestep_sampling == "sigmoid" and fam.discrete_flow_shift == 1.0
    latents = torch.randn(2, 16, 4, 4)
    g = torch.Generator().manual_seed(3)
    noised = fam.noised(latents, g)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    sigmas = torch.sigmoid(torch.randn(2, generator=g))
    assert torch.allclose(noised.timesteps, sigmas * 1000)
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(noised.noisy, (1 - s) * latents + s * noise, atol=1e-6)
    assert torch.allclose(noised.target, noise - latents)
    cos = family_class("anima")(bundle, None, weighting_scheme="cosmap").noised(latents, None)
    sig = cos.timesteps / 1000
    assert torch.allclose(cos.weights, 2 / (math.pi * (1 - 2 * sig + 2 * sig ** 2)))
    with torch.no_grad():
        pred = fam.predict(noised, cond, {})
    assert pred.shape == latents.shape
    # latents: the VAE's mode normalised per channel, and back
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    z = fam.encode_images(images)
    raw = bundle.vae.encode(images.unsqueeze(2)).latent_dist.mode().squeeze(2)
    mean = torch.tensor(bundle.vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.vae.config.latents_std).view(1, -1, 1, 1)
    assert torch.allclose(z, (raw - mean) / std, atol=1e-5) and torch.equal(fam.scale_latents(z), z)


# ---------------------------------------------------------------- LoRA


def _network(bundle, **kwargs):
    from sd_scripts.networks import lora

    kwargs.setdefault("network_dim", 4)
    kwargs.setdefault("network_alpha", 2)
    return lora.create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders, family="anima", **kwargs)


def _names(net, prefix="lora_unet_"):
    return {k.split(".")[0] for k in net.lora_state_dict() if k.startswith(prefix)}


def test_lora_names_and_network_args(bundle):
    per_block = [f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj",
                                                                          "output_proj")] + ["mlp_layer1", "mlp_layer2"]
    want = {f"lora_unet_blocks_{i}_{n}" for i in range(2) for n in per_block}
    assert _names(_network(bundle)) == want
    assert "lora_te_layers_1_mlp_gate_proj" in _names(_network(bundle), "lora_te_")
    adapter = _names(_network(bundle, network_args=["train_llm_adapter=True"])) - want
    assert "lora_unet_llm_adapter_blocks_0_self_attn_q_proj" in adapter
    assert "lora_unet_llm_adapter_blocks_1_mlp_2" in adapter and len(adapter) == 2 * 10
    custom = _network(bundle, network_args=["exclude_patterns=['.*mlp.*']",
                                            "include_patterns=['.*final_layer.linear', '.*adaln_modulation_mlp.*']",
                                            "network_reg_dims=.*self_attn.*=8,.*cross_attn.q_proj=0"])
    names = _names(custom)
    assert "lora_unet_final_layer_linear" in names and "lora_unet_blocks_0_adaln_modulation_mlp_1" in names
    assert "lora_unet_blocks_0_mlp_layer1" not in names and "lora_unet_blocks_0_cross_attn_q_proj" not in names
    sd = custom.lora_state_dict()
    assert sd["lora_unet_blocks_0_self_attn_q_proj.lora_down.weight"].shape[0] == 8
    assert sd["lora_unet_blocks_0_cross_attn_k_proj.lora_down.weight"].shape[0] == 4
    # network_reg_lrs: a group per rate, the rest at the network's
    rated = _network(bundle, network_args=["network_reg_lrs=.*self_attn.*=5e-5,.*cross_attn.*=0"])
    groups, names = rated.prepare_optimizer_params(1e-4, None, 1e-4)
    by_name = dict(zip(names, groups))
    assert by_name["unet_reg_lr0"]["lr"] == 5e-5 and len(by_name["unet_reg_lr0"]["params"]) == 2 * 4 * 2
    assert by_name["unet"]["lr"] == 1e-4 and len(by_name["unet"]["params"]) == 2 * 2 * 2  # the MLPs
    assert not any(p.requires_grad for lora in rated.unet_loras if "cross_attn" in lora.lora_name
                   for p in lora.parameters())  # rate 0: frozen


def _forward(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return bundle.denoiser(torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.5]),
                               torch.randn(1, 5, 16, generator=g), qwen_mask=torch.ones(1, 5),
                               t5_ids=torch.tensor([[3, 9, 1202, 1]]), t5_mask=torch.ones(1, 4))


@pytest.mark.parametrize("module", ["networks.lora_anima", "networks.loha", "networks.lokr"])
def test_adapter_files_load_back_through_our_loader(bundle, tmp_path, module):
    """LoRA (with the adapter trained) and sd-scripts' LoHa / LoKr on Anima: saved, read back through the
    registry's loader into a fresh network, the same output as the trained one."""
    from sd_scripts.networks.registry import resolve_network_module

    entry = resolve_network_module(module)
    base = _forward(bundle)
    net = entry.create_network(unet=bundle.denoiser, text_encoders=bundle.text_encoders, family="anima", network_dim=4,
                       network_alpha=2, network_args=["train_llm_adapter=True"] if "anima" in module else [])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    net.apply_to()
    want = _forward(bundle)
    assert not torch.allclose(want, base)
    path = str(tmp_path / "a.safetensors")
    net.save_weights(path)
    net.unapply()
    assert torch.allclose(_forward(bundle), base)
    again = entry.create_network_from_weights(path, unet=bundle.denoiser, text_encoders=bundle.text_encoders,
                                              family="anima")
    again.apply_to()
    assert torch.allclose(_forward(bundle), want, atol=1e-5)
    again.unapply()


def test_per_part_learning_rates(bundle):
    from types import SimpleNamespace

    cls = family_class("anima")
    none = SimpleNamespace(learning_rate=1e-4, self_attn_lr=None, cross_attn_lr=None, mlp_lr=None, mod_lr=None,
                           llm_adapter_lr=None)
    assert cls.denoiser_param_groups(bundle.denoiser, none) is None
    args = SimpleNamespace(**{**vars(none), "mod_lr": 0.0, "llm_adapter_lr": 5e-5})
    groups = {name: (len(params), lr) for name, params, lr in cls.denoiser_param_groups(bundle.denoiser, args)}
    assert groups["mod"] == (2 * 3 * 2 + 2, 0.0) and groups["llm_adapter"][1] == 5e-5
    assert groups["self_attn"] == (2 * 6, 1e-4) and groups["mlp"] == (2 * 2, 1e-4)
    total = sum(n for n, _ in groups.values())
    assert total == sum(1 for _ in bundle.denoiser.parameters())


def test_metadata_names(bundle):
    fam = family_class("anima")(bundle, None)
    meta = fam.adjust_metadata({"modelspec.architecture": "x/lora", "ss_network_module": "networks.lora",
                                "ss_timestep_sampling": "None"})
    assert meta["modelspec.architecture"] == "anima-preview/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/circlestone-labs/Anima"
    assert meta["ss_network_module"] == "networks.lora_anima" and meta["ss_timestep_sampling"] == "sigmoid"
    assert fam.spec.base_model_version == "anima"
    from types import SimpleNamespace

    from sd_scripts.options import OptionError

    with pytest.raises(OptionError, match="save_model_as"):  # refused at load, before any step
        family_class("anima")(bundle, SimpleNamespace(save_model_as="diffusers", trainer_kind="finetune"))


def test_comfy_conversion_round_trip(bundle, tmp_path):
    """sd-scripts' convert_anima_lora_to_comfy names, and back (--reverse), tensors unchanged."""
    from safetensors.torch import load_file

    from sd_scripts.errors import NetworkError
    from sd_scripts.families.anima import comfy_lora

    net = _network(bundle, network_args=["train_llm_adapter=True"])
    src = str(tmp_path / "l.safetensors")
    net.save_weights(src)
    assert comfy_lora.main([src, str(tmp_path / "c.safetensors")]) == 0
    comfy = load_file(str(tmp_path / "c.safetensors"))
    assert "diffusion_model.blocks.1.mlp.layer2.lora_B.weight" in comfy
    assert "diffusion_model.llm_adapter.blocks.0.self_attn.o_proj.lora_A.weight" in comfy
    assert "text_encoders.qwen3_06b.transformer.model.layers.0.mlp.gate_proj.alpha" in comfy
    assert comfy_lora.main([str(tmp_path / "c.safetensors"), str(tmp_path / "b.safetensors"), "--reverse"]) == 0
    a, b = load_file(src), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(NetworkError, match="--reverse"):
        comfy_lora.to_comfy(comfy)


def test_sampling_schedule_and_prompt_flow_shift(bundle):
    """sd-scripts' do_sample: sigmas linspace(1, 0, steps + 1) shifted (3.0, or the prompt's --fs), Euler steps;
    the sampler makes an image from a prompt (CFG with the negative prompt)."""
    import numpy as np

    from sd_scripts.training.sampling import parse_prompt_line

    fam = family_class("anima")(bundle, None, qwen3_max_token_length=8, t5_max_token_length=8)
    scheduler = fam.scheduler(None)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 5)[:-1])
    lin = torch.linspace(1, 0, 5)
    assert torch.allclose(scheduler.sigmas.float(), 3 * lin / (1 + 2 * lin), atol=1e-6)
    sample = parse_prompt_line("a dog --fs 5 --s 2 --l 2 --n cat")
    assert sample.flow_shift == 5.0 and "flow_shift" in sample.given
    pipe = fam.sample_pipeline(None)
    args = dict(width=64, height=64, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(1), **pipe.inputs(sample, "cpu"))
    with torch.no_grad():
        image = pipe.pipeline(**args).images[0]
    assert image.size == (64, 64) and pipe.pipeline.scheduler.config.shift == 5.0


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_prefixed_dit_files_load(tiny, bundle, tmp_path, prefix):
    """The DiT without `net.` (as sd-scripts also reads it) and under ComfyUI's checkpoint prefix."""
    from safetensors.torch import load_file, save_file

    from sd_scripts.families.anima.weights import load_transformer

    tensors = load_file(tiny["pretrained_model_name_or_path"])
    path = str(tmp_path / "dit.safetensors")
    save_file({prefix + k[len("net."):]: v for k, v in tensors.items()}, path)
    model, _, _ = load_transformer(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bundle.denoiser.state_dict().values()))
