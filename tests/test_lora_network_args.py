"""networks.lora's sd-scripts network_args and the LoRA training options around them.

- block_dims / block_alphas / conv_block_dims / conv_block_alphas: each module's rank and alpha in the saved file
  follow its U-Net block (sd-scripts' numbering: 25 blocks for SD 1.x/2.x, 23 for SDXL);
- down_lr_weight / mid_lr_weight / up_lr_weight (values and presets) and block_lr_zero_threshold: the learning rate
  of each parameter group, and blocks left out at weight 0;
- loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio: the up weights' group gets ratio x lr
  (networks.lora on SD and the FLUX.1 LoRA);
- scale_weight_norms: every module's update norm capped (also fused FLUX modules), the counts in the progress event;
- base_weights (+ base_weights_multiplier): the base the network trains on is base + multiplier x the LoRA.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from sd_scripts.errors import NetworkError
from sd_scripts.families.sd.blocks import sd_block_index, sdxl_block_index
from sd_scripts.networks.lora import create_network, create_network_from_weights, read_network_dims

sys.path.insert(0, os.path.dirname(__file__))
from test_lora import tiny_text_encoder, tiny_unet  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_text_encoder()


def _sd_network(models, *args, dim=4, alpha=1.0, **kwargs):
    unet, te = models
    return create_network(unet=unet, text_encoders=[te], family="sd1", network_dim=dim, network_alpha=alpha,
                          network_args=list(args), **kwargs)


# ---------------------------------------------------------------- block numbering (checked against sd-scripts'
# get_block_index on every module of the real SD1.5 and SDXL U-Nets; these are samples of it)
@pytest.mark.parametrize("name, block", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 1),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", 2),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),
    ("lora_unet_down_blocks_1_resnets_0_conv1", 4),
    ("lora_unet_down_blocks_3_resnets_1_conv2", 11),
    ("lora_unet_mid_block_attentions_0_proj_out", 12),
    ("lora_unet_up_blocks_0_resnets_2_conv1", 15),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),
    ("lora_unet_up_blocks_1_attentions_0_proj_in", 16),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", 24),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", -1),
])
def test_sd_block_index(name, block):
    assert sd_block_index(name) == block


@pytest.mark.parametrize("name, block", [
    ("lora_unet_input_blocks_1_0_in_layers_2", 2),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 5),
    ("lora_unet_input_blocks_8_1_proj_in", 9),
    ("lora_unet_middle_block_1_proj_out", 11),
    ("lora_unet_middle_block_2_emb_layers_1", 12),
    ("lora_unet_output_blocks_0_1_proj_in", 13),
    ("lora_unet_output_blocks_8_0_skip_connection", 21),
    ("lora_unet_out_2", 22),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", -1),
])
def test_sdxl_block_index(name, block):
    assert sdxl_block_index(name) == block


# ---------------------------------------------------------------- ranks and alphas per block
def test_block_dims_and_alphas_set_each_modules_rank_and_alpha_in_the_file(models, tmp_path):
    dims = [1 + i % 3 for i in range(25)]
    dims[16] = 0  # up_blocks_1.attentions_0 (and that block's Linear layers) left out
    alphas = [0.5 * (1 + i % 4) for i in range(25)]
    conv_dims = [2 + i % 2 for i in range(25)]
    conv_alphas = [float(i) + 1 for i in range(25)]
    net = _sd_network(models, "block_dims=" + ",".join(map(str, dims)),
                      "block_alphas=" + ",".join(map(str, alphas)),
                      "conv_block_dims=" + ",".join(map(str, conv_dims)),
                      "conv_block_alphas=" + ",".join(map(str, conv_alphas)), dim=8, alpha=4)
    path = str(tmp_path / "blocks.safetensors")
    net.save_weights(path)
    info = read_network_dims(path)
    ranks, file_alphas = info["module_dims"], info["module_alphas"]
    linear = {  # module -> block (Linear / 1x1)
        "lora_unet_down_blocks_0_attentions_0_proj_in": 1,
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj": 1,
        "lora_unet_up_blocks_0_resnets_1_conv_shortcut": 14,
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": 17,
    }
    conv = {  # 3x3 conv -> block
        "lora_unet_down_blocks_0_resnets_0_conv1": 1, "lora_unet_down_blocks_0_downsamplers_0_conv": 3,
        "lora_unet_down_blocks_1_resnets_0_conv2": 4, "lora_unet_mid_block_resnets_1_conv1": 12,
        "lora_unet_up_blocks_0_upsamplers_0_conv": 15, "lora_unet_up_blocks_1_resnets_0_conv1": 16,
    }
    for name, block in linear.items():
        assert (ranks[name], file_alphas[name]) == (dims[block], alphas[block]), name
    for name, block in conv.items():
        assert (ranks[name], file_alphas[name]) == (conv_dims[block], conv_alphas[block]), name
    assert not [n for n in ranks if "up_blocks_1_attentions_0" in n or n == "lora_unet_up_blocks_1_resnets_0_time_emb_proj"]
    assert {ranks[n] for n in ranks if n.startswith("lora_te_")} == {8}  # the text encoder keeps network_dim
    assert {file_alphas[n] for n in ranks if n.startswith("lora_te_")} == {4.0}
    # dim_from_weights reads the same shape back
    again = create_network_from_weights(path, unet=models[0], text_encoders=[models[1]], family="sd1")
    assert {m.lora_name: m.rank for m in again.all_loras()} == ranks


def test_block_alphas_alone_default_dims_and_conv_dims_follow_conv_dim(models):
    alphas = [float(i) for i in range(25)]
    net = _sd_network(models, "block_alphas=" + ",".join(map(str, alphas)), "conv_dim=3", "conv_alpha=2", dim=5)
    by_name = {m.lora_name: m for m in net.unet_loras}
    proj = by_name["lora_unet_up_blocks_1_attentions_1_proj_in"]
    assert (proj.rank, float(proj.alpha)) == (5, 17.0)
    conv = by_name["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert (conv.rank, float(conv.alpha)) == (3, 2.0)


# ---------------------------------------------------------------- learning-rate weights per block
def _group_of(groups, names):
    return {id(p): (name, g["lr"]) for g, name in zip(groups, names) for p in g["params"]}


def test_block_lr_weights_set_each_groups_learning_rate(models):
    up = [1.0] * 12
    up[3], up[4] = 0.1, 0.7  # blocks 16 (dropped: not above the threshold) and 17
    net = _sd_network(models, "conv_dim=2", "down_lr_weight=sine", "mid_lr_weight=0.5",
                      "up_lr_weight=" + ",".join(map(str, up)), "block_lr_zero_threshold=0.12")
    groups, names = net.prepare_optimizer_params(unet_lr=1e-3, text_encoder_lr=2e-4, default_lr=1e-5)
    sine = [math.sin(math.pi / 2 * i / 11) for i in range(12)]
    weight = sine + [0.5] + up  # sd-scripts' 25 blocks: down, mid, up
    where = _group_of(groups, names)
    seen = set()
    for lora in net.unet_loras:
        block = sd_block_index(lora.lora_name)
        seen.add(block)
        for p in lora.parameters():
            assert where[id(p)][0] == f"unet_block{block}"
            assert where[id(p)][1] == pytest.approx(1e-3 * weight[block])
    assert seen == {1, 3, 4, 12, 13, 14, 15, 17}  # block 16 (weight 0.1 <= 0.12) has no modules at all
    for lora in net.text_encoder_loras:
        assert {where[id(p)] for p in lora.parameters()} == {("textencoder", 2e-4)}


def test_lr_weight_presets_and_short_lists():
    from sd_scripts.networks.block_weights import UNetBlocks, block_lr_weights

    blocks = UNetBlocks(down=9, mid=3, lead=1, tail=1, index=sdxl_block_index)
    weights = block_lr_weights({"down_lr_weight": "cosine+0.25", "up_lr_weight": "reverse_linear",
                                "mid_lr_weight": "2,,"}, blocks)
    assert len(weights) == 23
    assert weights[0] == weights[22] == 1.0
    assert weights[1:10] == pytest.approx([math.cos(math.pi / 2 * i / 8) + 0.25 for i in range(9)])
    assert weights[10:13] == [2.0, 0.0, 0.0]  # empty entries are 0 (then cut by the default threshold 0)
    assert weights[13:22] == pytest.approx([(8 - i) / 8 for i in range(9)][:8] + [0.0])
    short = block_lr_weights({"down_lr_weight": "0.5,0.25"}, blocks)
    assert short[1:10] == [0.5, 0.25] + [1.0] * 7  # missing values are 1, as sd-scripts fills them
    assert block_lr_weights({"up_lr_weight": "zeros+0.3"}, blocks)[13:22] == pytest.approx([0.3] * 9)
    assert block_lr_weights({"up_lr_weight": "linear"}, blocks)[13:22] == pytest.approx([i / 8 for i in range(9)])


# ---------------------------------------------------------------- LoRA+
def test_loraplus_gives_the_up_weights_ratio_times_the_rate(models):
    net = _sd_network(models, "loraplus_lr_ratio=16", "loraplus_unet_lr_ratio=4")
    groups, names = net.prepare_optimizer_params(unet_lr=1e-3, text_encoder_lr=2e-4, default_lr=1e-5)
    assert names == ["unet", "unet plus", "textencoder", "textencoder plus"]
    where = _group_of(groups, names)
    for lora in net.unet_loras:
        assert where[id(lora.lora_down.weight)] == ("unet", 1e-3)
        assert where[id(lora.lora_up.weight)] == ("unet plus", pytest.approx(4e-3))
    for lora in net.text_encoder_loras:  # no text-encoder ratio: the shared one
        assert where[id(lora.lora_down.weight)] == ("textencoder", 2e-4)
        assert where[id(lora.lora_up.weight)] == ("textencoder plus", pytest.approx(16 * 2e-4))
    # with block lr weights: a plus group per block
    net = _sd_network(models, "loraplus_text_encoder_lr_ratio=3", "up_lr_weight=zeros+0.5")
    groups, names = net.prepare_optimizer_params(unet_lr=1e-3, text_encoder_lr=2e-4, default_lr=1e-5)
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert lrs["unet_block17"] == pytest.approx(5e-4) and "unet_block17 plus" not in lrs
    assert lrs["textencoder plus"] == pytest.approx(6e-4)


@pytest.fixture(scope="module")
def tiny_flux_transformer():
    from sd_scripts.families.flux.tiny import tiny_transformer_config
    from sd_scripts.families.flux.weights import build_transformer

    torch.manual_seed(0)
    return build_transformer(tiny_transformer_config("flux_dev", (1, 1)), meta=False)


def test_loraplus_and_max_norm_on_the_flux_lora(tiny_flux_transformer):
    net = create_network(unet=tiny_flux_transformer, text_encoders=[], family="flux", network_dim=4,
                         network_alpha=2, network_args=["loraplus_lr_ratio=8"], train_text_encoder=False)
    groups, names = net.prepare_optimizer_params(unet_lr=1e-4, text_encoder_lr=None, default_lr=1e-5)
    assert names == ["unet", "unet plus"]
    ups = {id(m.lora_up.weight) for m in net.unet_loras}
    assert {id(p) for p in groups[1]["params"]} == ups and groups[1]["lr"] == pytest.approx(8e-4)
    assert not ups & {id(p) for p in groups[0]["params"]}
    # fused modules (q/k/v as one qkv file module, one shared down): the file module's whole update is capped
    assert any(getattr(m, "part", None) for m in net.unet_loras)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, 1.0)
    scaled, mean, top = net.apply_max_norm_regularization(0.3)
    norms = _file_norms(net.lora_state_dict())
    assert scaled == len(norms) and max(norms.values()) == pytest.approx(0.3, rel=1e-4) == top
    assert mean == pytest.approx(0.3, rel=1e-4)


def test_block_args_are_refused_where_the_family_has_no_unet_blocks(tiny_flux_transformer):
    with pytest.raises(NetworkError, match="block_dims.*do not apply to this model family"):
        create_network(unet=tiny_flux_transformer, text_encoders=[], family="flux", network_dim=4, network_alpha=1,
                       network_args=["block_dims=" + ",".join(["4"] * 25)])


@pytest.mark.parametrize("family, args, words", [
    ("sd1", ["block_dims=" + ",".join(["4"] * 24)], "block_dims has 24 values.*25 blocks"),
    ("sdxl", ["block_alphas=1,2"], "block_alphas has 2 values.*23 blocks"),
    ("sd1", ["down_lr_weight=sawtooth"], "down_lr_weight='sawtooth'.*cosine, sine, linear, reverse_linear, zeros"),
    ("sd1", ["conv_block_dims=" + ",".join(["4"] * 24 + ["x"])], "conv_block_dims.*'x' is not an integer"),
    ("sd1", ["conv_block_alphas=" + ",".join(["1"] * 25)], "conv_block_alphas needs conv_block_dims"),
    ("sd1", ["loraplus_lr_ratio=0"], "loraplus_lr_ratio=0.0 must be greater than 0"),
])
def test_bad_values_name_the_network_arg(family, args, words):
    with pytest.raises(NetworkError, match=words):
        create_network(unet=None, text_encoders=[], family=family, network_dim=4, network_alpha=1,
                       network_args=args)


def test_a_threshold_without_weights_is_a_warning(models, caplog):
    net = _sd_network(models, "block_lr_zero_threshold=0.1")
    assert net.block_lr_weight is None and "block_lr_zero_threshold does nothing" in caplog.text


def test_dim_from_weights_takes_lr_args_and_refuses_shape_args(models, tmp_path):
    path = str(tmp_path / "w.safetensors")
    _sd_network(models).save_weights(path)
    net = create_network_from_weights(path, unet=models[0], text_encoders=[models[1]], family="sd1",
                                      network_args=["loraplus_lr_ratio=2", "mid_lr_weight=0"])
    _, names = net.prepare_optimizer_params(unet_lr=1e-3, text_encoder_lr=1e-3, default_lr=1e-3)
    assert "unet_block17 plus" in names and not any(n.startswith("unet_block12") for n in names)
    with pytest.raises(NetworkError, match="block_dims cannot be used with dim_from_weights"):
        create_network_from_weights(path, unet=models[0], text_encoders=[models[1]], family="sd1",
                                    network_args=["block_dims=" + ",".join(["4"] * 25)])


# ---------------------------------------------------------------- scale_weight_norms
def _file_norms(state: dict) -> dict[str, float]:
    """Frobenius norm of up @ down x alpha / rank of every file module, from the saved tensors."""
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[:-len(".lora_down.weight")]
        up = state[f"{name}.lora_up.weight"].float().flatten(1)
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
        out[name] = float(torch.linalg.norm(up @ down.float().flatten(1)) * scale)
    return out


def test_max_norm_regularization_caps_each_modules_norm(models):
    net = _sd_network(models, "conv_dim=2", dim=4, alpha=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for i, m in enumerate(net.all_loras()):
            m.lora_up.weight.normal_(0, 0.02 if i % 3 == 0 else 1.0)  # a third of them small
    before = _file_norms(net.lora_state_dict())
    state_before = {k: v.clone() for k, v in net.lora_state_dict().items()}
    max_norm = 0.5
    scaled, mean, top = net.apply_max_norm_regularization(max_norm)
    after = _file_norms(net.lora_state_dict())
    big = {n for n, v in before.items() if v > max_norm}
    assert 0 < len(big) < len(before) and scaled == len(big)
    for name in before:
        if name in big:
            assert after[name] == pytest.approx(max_norm, rel=1e-4)
            # up and down scaled alike: sqrt(max_norm / norm) each
            factor = (max_norm / before[name]) ** 0.5
            for suffix in ("lora_up.weight", "lora_down.weight"):
                torch.testing.assert_close(net.lora_state_dict()[f"{name}.{suffix}"],
                                           state_before[f"{name}.{suffix}"] * factor)
        else:
            for suffix in ("lora_up.weight", "lora_down.weight"):
                assert torch.equal(net.lora_state_dict()[f"{name}.{suffix}"], state_before[f"{name}.{suffix}"])
    assert top == pytest.approx(max(after.values()), rel=1e-5)
    assert mean == pytest.approx(sum(after.values()) / len(after), rel=1e-5)


# ---------------------------------------------------------------- the trainer: base_weights, LoRA+, max norm
def test_trainer_merges_base_weights_then_trains_with_loraplus_and_capped_norms(tiny_sd1, demo_data, tmp_path):
    from sd_scripts.models.loading import load_model
    from sd_scripts.options import parse_args
    from sd_scripts.training.events import read_events
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    model = tiny_sd1.single_file
    fresh = load_model(model, dtype=torch.float32)
    base_lora = create_network(unet=fresh.denoiser, text_encoders=fresh.text_encoders, family=fresh.family,
                               network_dim=2, network_alpha=1)
    torch.manual_seed(5)
    with torch.no_grad():
        for m in base_lora.all_loras():
            m.lora_up.weight.normal_(0, 0.5)
    lora_path = str(tmp_path / "base.safetensors")
    base_lora.save_weights(lora_path)
    expected = {}  # module path -> base weight + 0.5 x up @ down x alpha / rank, from the file's tensors
    from safetensors.torch import load_file

    tensors = load_file(lora_path)
    for path, module in fresh.denoiser.named_modules():
        name = "lora_unet_" + path.replace(".", "_")
        if f"{name}.lora_down.weight" in tensors:
            up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape) * float(tensors[f"{name}.alpha"]) / 2
            expected[path] = module.weight.detach() + 0.5 * delta
    assert len(expected) == len(base_lora.unet_loras)

    config = tmp_path / "run.toml"
    config.write_text('[network]\nbase_weights_multiplier = [0.5]\n', encoding="utf-8")
    events = tmp_path / "events.jsonl"
    argv = ["--config_file", str(config), "--pretrained_model_name_or_path", model, "--output_dir",
            str(tmp_path / "out"), "--train_data_dir", demo_data, "--resolution", "64", "--seed", "1",
            "--max_train_steps", "1", "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0", "--base_weights", lora_path,
            "--scale_weight_norms", "1e-6", "--network_args", "loraplus_lr_ratio=8", "--events_file", str(events)]
    args = parse_args("network", argv)
    assert args.base_weights_multiplier == [0.5]
    trainer = Trainer(args, NetworkMethod(args))
    for step in ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents",
                 "cache_text_encoder_outputs", "build_method", "release_unused_models", "create_optimizer",
                 "prepare", "resume_state"):
        getattr(trainer, step)()
    modules = dict(trainer.bundle.denoiser.named_modules())
    for path, weight in expected.items():  # the network trains on base + 0.5 x the merged LoRA
        torch.testing.assert_close(modules[path].weight.detach().float(), weight, rtol=1e-5, atol=1e-6)
    network = trainer.method.network
    lr_of = _group_of(trainer.optimizer.param_groups, trainer.lr_names)
    assert {lr_of[id(m.lora_up.weight)] for m in network.unet_loras} == {("unet plus", 8e-3)}
    assert {lr_of[id(m.lora_down.weight)] for m in network.unet_loras} == {("unet", 1e-3)}

    trainer.emit_start()
    assert trainer.train_epochs() == "completed"
    norms = _file_norms(network.lora_state_dict())
    assert max(norms.values()) <= 1e-6 * (1 + 1e-4)
    progress = [e for e in read_events(str(events)) if e["type"] == "progress"]
    capped = sum(1 for v in norms.values() if v == pytest.approx(1e-6, rel=1e-3))  # those that were scaled
    assert progress[-1]["keys_scaled"] == capped > len(norms) // 2
    assert progress[-1]["max_key_norm"] == pytest.approx(max(norms.values()), rel=1e-4)
    assert 0 < progress[-1]["avg_key_norm"] <= 1e-6 * (1 + 1e-4)
    trainer.events.close()


# ---------------------------------------------------------------- sdxl_train's block_lr (full fine-tuning)
def test_block_lr_gives_each_sdxl_unet_block_its_rate(tmp_path):
    from types import SimpleNamespace

    from sdxl_parts import tiny_sdxl_parts

    from sd_scripts.options import OptionError, parse_args
    from sd_scripts.training.full_methods import FolderFineTuneMethod

    parts = tiny_sdxl_parts()
    bundle = SimpleNamespace(family="sdxl", denoiser=parts.unet, vae=parts.vae,
                             text_encoders=[parts.text_encoder, parts.text_encoder_2])
    rates = [(i + 1) * 1e-6 for i in range(23)]
    rates[11] = 0  # the middle block's attention: frozen
    base = ["--pretrained_model_name_or_path", "model.safetensors", "--output_dir", str(tmp_path),
            "--train_data_dir", str(tmp_path), "--learning_rate", "1"]
    args = parse_args("finetune", base + ["--block_lr", ",".join(map(str, rates))])
    groups, names = FolderFineTuneMethod(args).build(bundle, family="sdxl")
    where = _group_of(groups, names)
    expected = {  # diffusers parameter -> sd-scripts block (tiny U-Net: 1 ResNet per down block)
        "time_embedding.linear_1.weight": 0, "add_embedding.linear_2.bias": 0, "conv_in.weight": 1,
        "down_blocks.0.resnets.0.conv1.weight": 2, "down_blocks.0.downsamplers.0.conv.weight": 3,
        "down_blocks.1.attentions.0.proj_in.weight": 4, "mid_block.resnets.0.conv2.weight": 10,
        "mid_block.resnets.1.time_emb_proj.weight": 12, "up_blocks.0.attentions.1.proj_out.weight": 14,
        "up_blocks.1.resnets.0.conv1.weight": 15, "conv_norm_out.weight": 22, "conv_out.bias": 22,
    }
    params = dict(parts.unet.named_parameters())
    for name, block in expected.items():
        assert where[id(params[name])] == (f"block{block}", rates[block]), name
    frozen = [n for n, p in params.items() if n.startswith("mid_block.attentions.")]
    assert frozen and all(id(params[n]) not in where and not params[n].requires_grad for n in frozen)
    assert all(id(p) in where for n, p in params.items() if not n.startswith("mid_block.attentions."))
    with pytest.raises(OptionError, match="block_lr' has 2 values but the U-Net has 23 blocks"):
        FolderFineTuneMethod(parse_args("finetune", base + ["--block_lr", "1e-6,0"])).build(bundle, family="sdxl")


def test_kohya_ss_configs_bring_their_loraplus_and_block_fields_as_network_args(tmp_path):
    from kohya_gui import presets

    path = tmp_path / "kohya.json"
    path.write_text(json.dumps({"LoRA_type": "Standard", "pretrained_model_name_or_path": "model.safetensors",
                                "loraplus_lr_ratio": 16, "loraplus_unet_lr_ratio": 0, "down_lr_weight": "sine+0.1",
                                "up_lr_weight": "", "block_dims": ",".join(["4"] * 25)}), encoding="utf-8")
    values, unknown = presets.import_kohya_json(str(path), "lora")
    assert values["network_args"] == ["loraplus_lr_ratio=16", "block_dims=" + ",".join(["4"] * 25),
                                      "down_lr_weight=sine+0.1"]
    assert not unknown
