"""networks.lora: names, the forward formula, dropout, apply/unapply/merge, files, factories and the registry."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sd_scripts.errors import NetworkError, UserError
from sd_scripts.networks.lora import (LoRANetwork, create_network, create_network_from_weights,
                                      parse_network_args, read_network_dims)
from sd_scripts.networks.lora_module import LoRAModule
from sd_scripts.networks.registry import resolve_network_module


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=2, vocab_size=100, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_text_encoder()


def randomize_up(network: LoRANetwork, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.3)


# ---- the module
def test_linear_output_is_base_plus_scaled_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRAModule("lora_x", base, rank=3, alpha=1.5, multiplier=0.7)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    x = torch.randn(2, 4, 6)
    expected = base(x) + (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T) * 0.7 * 1.5 / 3
    lora.apply_to()
    assert torch.allclose(base(x), expected, atol=1e-6)
    lora.restore()
    assert "forward" not in base.__dict__
    assert torch.allclose(base(x), nn.functional.linear(x, base.weight, base.bias))


def test_conv3x3_keeps_stride_padding_and_matches_merge():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    lora = LoRAModule("lora_c", base, rank=2, alpha=None)
    assert lora.alpha.item() == 2.0 and lora.alpha.dim() == 0
    assert tuple(lora.lora_down.weight.shape) == (2, 4, 3, 3) and tuple(lora.lora_up.weight.shape) == (6, 2, 1, 1)
    assert lora.lora_down.stride == (2, 2) and lora.lora_down.padding == (1, 1)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    x = torch.randn(1, 4, 8, 8)
    lora.apply_to()
    runtime = base(x)
    lora.merge()
    assert "forward" not in base.__dict__
    assert torch.allclose(base(x), runtime, atol=1e-5)


def test_init_up_zero_down_nonzero_and_base_untouched():
    base = nn.Linear(8, 8)
    weight = base.weight.detach().clone()
    lora = LoRAModule("lora_x", base, rank=4)
    assert torch.count_nonzero(lora.lora_up.weight) == 0 and torch.count_nonzero(lora.lora_down.weight) > 0
    lora.apply_to()
    x = torch.randn(3, 8)
    assert torch.equal(base(x), nn.functional.linear(x, weight, base.bias))
    assert base.weight is not None and not any(p is base.weight for p in lora.parameters())


def test_dropouts_only_while_training():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    lora = LoRAModule("lora_x", base, rank=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    x = torch.randn(4, 8)
    lora.eval()
    assert torch.equal(base(x), base(x))
    lora.train()
    outs = [base(x) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# ---- the network
def test_key_names_and_state_dict_layout(models):
    unet, te = models
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1)
    names = {lora.lora_name for lora in net.all_loras()}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names
    assert not any("resnets" in n for n in names)
    keys = set(net.state_dict())
    assert keys == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    # 1 down + 1 mid + 2 up transformer blocks x 12 layers; 2 CLIP layers x 6
    assert len(net.unet_loras) == 4 * 12 and len(net.text_encoder_loras) == 2 * 6


def test_conv_dim_adds_resnet_and_sampler_modules(models):
    unet, te = models
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=8, network_alpha=4,
                         network_args=["conv_dim=2", "conv_alpha=0.5"])
    by_name = {lora.lora_name: lora for lora in net.unet_loras}
    conv1 = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv1.rank == 2 and conv1.alpha.item() == 0.5
    temb = by_name["lora_unet_down_blocks_0_resnets_0_time_emb_proj"]
    assert temb.rank == 8 and temb.alpha.item() == 4
    assert by_name["lora_unet_down_blocks_1_resnets_0_conv_shortcut"].rank == 8
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in by_name
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in by_name


def test_apply_merge_unapply_on_real_unet(models):
    unet, te = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=2,
                         network_args=["conv_dim=2"], multiplier=0.8)
    randomize_up(net)
    x, t, ids = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randint(2, 100, (1, 6))
    with torch.no_grad():
        base = unet(x, t, te(ids).last_hidden_state).sample
        net.apply_to()
        net.apply_to()  # idempotent
        runtime = unet(x, t, te(ids).last_hidden_state).sample
        net.unapply()
        assert torch.equal(unet(x, t, te(ids).last_hidden_state).sample, base)
        net.apply_to()
        net.merge_into_base()
        merged = unet(x, t, te(ids).last_hidden_state).sample
    assert not torch.allclose(runtime, base, atol=1e-3)
    assert torch.allclose(merged, runtime, atol=1e-5)


def test_set_multiplier_scales_update():
    torch.manual_seed(0)
    base = nn.Linear(4, 4)
    net = LoRANetwork(None, [], dim=2)
    lora = LoRAModule("lora_x", base, rank=2)
    net.add_module(lora.lora_name, lora)
    net.unet_loras.append(lora)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    net.apply_to()
    x = torch.randn(2, 4)
    plain = nn.functional.linear(x, base.weight, base.bias)
    net.set_multiplier(1.0)
    full = base(x) - plain
    net.set_multiplier(0.5)
    assert torch.allclose(base(x) - plain, full * 0.5, atol=1e-6)


def test_optimizer_groups(models):
    unet, te = models
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1)
    groups, names = net.prepare_optimizer_params(unet_lr=1e-4, text_encoder_lr=None, default_lr=3e-4)
    assert names == ["unet", "textencoder"] and [g["lr"] for g in groups] == [1e-4, 3e-4]
    assert sum(len(g["params"]) for g in groups) == 2 * len(net.all_loras())
    unet_only = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1,
                               train_text_encoder=False)
    assert unet_only.prepare_optimizer_params(1e-4, 1e-5, 1e-3)[1] == ["unet"]
    assert not unet_only.text_encoder_loras
    te_only = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1,
                             train_unet=False)
    assert te_only.prepare_optimizer_params(1e-4, 1e-5, 1e-3)[1] == ["textencoder"]


def test_save_load_round_trip_exact(models, tmp_path):
    unet, te = models
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=2,
                         network_args=["conv_dim=2"])
    randomize_up(net)
    for ext in ("safetensors", "pt", "ckpt"):
        path = tmp_path / f"lora.{ext}"
        net.save_weights(path, metadata={"ss_network_dim": "4"} if ext == "safetensors" else None)
        other = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=2,
                               network_args=["conv_dim=2"])
        info = other.load_weights(path)
        assert info.loaded_modules == len(net.all_loras()) and not info.missing_keys and not info.unexpected_keys
        a, b = net.state_dict(), other.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fp16 = tmp_path / "half.safetensors"
    net.save_weights(fp16, dtype=torch.float16)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(fp16).values()} == {torch.float16}


def test_load_shape_mismatch_names_file_key_and_shapes(models, tmp_path):
    unet, te = models
    path = tmp_path / "rank8.safetensors"
    create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=8, network_alpha=1).save_weights(path)
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1)
    with pytest.raises(NetworkError) as err:
        net.load_weights(path)
    message = str(err.value)
    assert "rank8.safetensors" in message and "lora_down.weight" in message and "[8," in message and "[4," in message
    with pytest.raises(NetworkError, match="does not exist"):
        net.load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(NetworkError, match="cannot be read"):
        net.load_weights(tmp_path / "junk.safetensors")


def test_create_network_from_weights_takes_dims_per_module(models, tmp_path):
    unet, te = models
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=6, network_alpha=3,
                         network_args=["conv_dim=2", "conv_alpha=2"], train_text_encoder=False)
    randomize_up(net)
    path = tmp_path / "dims.safetensors"
    net.save_weights(path)
    loaded = create_network_from_weights(path, unet=unet, text_encoders=[te], family="sd1", multiplier=0.5)
    assert {lora.lora_name for lora in loaded.all_loras()} == {lora.lora_name for lora in net.all_loras()}
    assert not loaded.text_encoder_loras and loaded.multiplier == 0.5
    a, b = net.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = read_network_dims(path)
    assert summary["modules"] == len(net.all_loras()) and summary["text_encoder_modules"] == 0
    assert summary["dims"] == [6] and summary["alphas"] == [3.0]
    assert summary["conv_dims"] == [2] and summary["conv_alphas"] == [2.0]


def test_weights_for_another_model_are_refused(models, tmp_path):
    unet, te = models
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(NetworkError, match="another model family"):
        create_network_from_weights(path, unet=unet, text_encoders=[te], family="sd1")
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=2, network_alpha=1)
    with pytest.raises(NetworkError, match="none of its 2 tensors"):
        net.load_weights(path)


def test_network_args_parsing():
    assert parse_network_args(["conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", "module_dropout=0.2"]) == {
        "conv_dim": 4, "conv_alpha": 1.0, "rank_dropout": 0.1, "module_dropout": 0.2}
    assert parse_network_args(None) == {}
    with pytest.raises(NetworkError, match="'loraplus_ratio'"):  # a misspelt key (loraplus_lr_ratio is one)
        parse_network_args(["loraplus_ratio=4"])
    with pytest.raises(NetworkError, match="key=value"):
        parse_network_args(["conv_dim"])
    with pytest.raises(NetworkError, match="conv_dim"):
        parse_network_args(["conv_dim=big"])


def test_registry():
    import sd_scripts.networks.lora as lora

    assert resolve_network_module("networks.lora") is lora
    assert resolve_network_module("sd_scripts.networks.lora") is lora
    with pytest.raises(NetworkError, match="networks.lora") as err:
        resolve_network_module("networks.vera")  # not an sd-scripts network module we implement
    assert isinstance(err.value, UserError) and "networks.vera" in str(err.value)


def test_unknown_family_is_a_user_error(models):
    with pytest.raises(NetworkError, match="nope"):
        create_network(unet=models[0], text_encoders=[models[1]], family="nope", network_dim=4, network_alpha=1)


def test_per_sample_multiplier():
    torch.manual_seed(0)
    base = nn.Linear(4, 4)
    net = LoRANetwork(None, [], dim=2)
    lora = LoRAModule("lora_x", base, rank=2)
    net.add_module(lora.lora_name, lora)
    net.unet_loras.append(lora)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    net.apply_to()
    x = torch.randn(3, 5, 4)
    plain = nn.functional.linear(x, base.weight, base.bias)
    net.set_multiplier(1.0)
    full = base(x) - plain
    net.set_multiplier([0.0, 1.0, 0.5])
    delta = base(x) - plain
    assert torch.allclose(delta, full * torch.tensor([0.0, 1.0, 0.5])[:, None, None], atol=1e-6)
    with pytest.raises(ValueError, match="per-sample"):
        net.merge_into_base()


def test_gradients_reach_lora_only(models):
    unet, te = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    unet.requires_grad_(False)
    te.requires_grad_(False)
    net = create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1,
                         network_args=["conv_dim=2"])
    net.apply_to()
    net.train()
    hidden = te(torch.randint(2, 100, (2, 6))).last_hidden_state
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 9]), hidden).sample
    out.pow(2).mean().backward()
    assert all(lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0
               for lora in net.all_loras())
    assert all(p.grad is None for p in unet.parameters()) and all(p.grad is None for p in te.parameters())


def test_create_from_weights_can_leave_a_part_out(models, tmp_path):
    unet, te = models
    path = tmp_path / "both.safetensors"
    create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=4, network_alpha=1).save_weights(path)
    te_only = create_network_from_weights(path, unet=unet, text_encoders=[te], family="sd1", train_unet=False)
    assert not te_only.unet_loras and len(te_only.text_encoder_loras) == 12
    unet_only = create_network_from_weights(path, unet=unet, text_encoders=[te], family="sd1",
                                            train_text_encoder=False)
    assert len(unet_only.unet_loras) == 48 and not unet_only.text_encoder_loras
