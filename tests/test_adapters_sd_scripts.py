"""sd-scripts' other adapter modules: `networks.dylora` (+ `extract_lora_from_dylora`), `networks.lora_fa`,
`networks.oft` / `networks.oft_flux`.

- the real Trainer, in-process, trains each one step on the tiny SD1 model (the output changes) and saves a file that
  our loader reads back to the same forward; DyLoRA trains `unit` rows per module, LoRA-FA only the up weights;
- DyLoRA and LoRA-FA files are kohya LoRA files: diffusers' load_lora_weights reproduces our forward, and each
  extracted fixed-rank DyLoRA equals the DyLoRA truncated to that rank;
- OFT's rotation equals lycoris-lora's Diag-OFT maths (the same Cayley transform, constraint and multiplier) on the
  same blocks; FLUX.1 files hold one rotation per fused part (`oft_blocks.<i>`), named by the family;
- every network_arg changes what is built or trained; bad values are errors naming them.
"""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors import safe_open

from sd_scripts.errors import NetworkError
from sd_scripts.networks.registry import resolve_network_module
from tests.test_adapters import _tiny_flux, data, one_thread, perturb  # noqa: F401 (fixtures)
from tests.test_lora_diffusers import run, tiny_pipeline, tiny_text_encoder, tiny_unet

pytestmark = pytest.mark.timeout(300)


def build(module, unet, te, args=(), *, dim=4, alpha=2.0, dropout=None, family="sd1"):
    return resolve_network_module(module).create_network(
        unet=unet, text_encoders=[te] if te is not None else [], family=family, network_dim=dim,
        network_alpha=alpha, network_dropout=dropout, network_args=list(args), train_text_encoder=te is not None)


def keys_and_metadata(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ---------------------------------------------------------------- the real Trainer, in-process
TRAINED = [("networks.dylora", ["unit=2"]), ("networks.lora_fa", []), ("networks.oft", ["enable_all_linear=True"])]


@pytest.mark.parametrize("module,args", TRAINED, ids=[m for m, _ in TRAINED])
def test_trainer_step_trains_and_the_file_loads_back(tiny_sd1, data, tmp_path, module, args):  # noqa: F811
    from sd_scripts.options import parse_args
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    alpha = "1e-3" if module == "networks.oft" else "2"
    argv = ["--pretrained_model_name_or_path", tiny_sd1.diffusers_dir, "--output_dir", str(tmp_path),
            "--output_name", "adapter", "--train_data_dir", data, "--resolution", "64", "--train_batch_size", "2",
            "--cache_latents", "--seed", "3", "--max_train_steps", "1", "--learning_rate", "1e-2",
            "--optimizer_type", "AdamW", "--network_module", module, "--network_dim", "4", "--network_alpha", alpha,
            *(["--network_args", *args] if args else [])]
    cli = parse_args("network", argv)
    trainer = Trainer(cli, NetworkMethod(cli))
    for step in ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents",
                 "cache_text_encoder_outputs", "build_method", "release_unused_models", "create_optimizer",
                 "prepare"):
        getattr(trainer, step)()
    network = trainer.method.network
    batch = next(iter(trainer.loader))
    unet = trainer.bundle.denoiser
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def unet_out():
        network.eval()
        with torch.no_grad():
            out = unet(latent, torch.tensor([10]), encoder_hidden_states=hidden).sample
        network.train()
        return out

    before_out = unet_out()
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    random.seed(5)
    assert torch.isfinite(trainer.training_step(batch))
    after = network.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "one optimizer step changed no adapter weight"
    assert (unet_out() - before_out).abs().max() > 1e-6
    if module == "networks.dylora":  # unit rows of down (lora_A.<i>) and of up (lora_B.<i>) per module, no others
        for lora in network.all_loras():
            rows = {int(k.rsplit(".", 1)[1]) for k in changed if k.startswith(lora.lora_name + ".lora_A.")}
            assert len(rows) <= 2 and (not rows or (min(rows) % 2 == 0 and rows == {min(rows), min(rows) + 1}))
        assert any(k.startswith("lora_te_") for k in changed) and any(k.startswith("lora_unet_") for k in changed)
    if module == "networks.lora_fa":  # the frozen down projections do not move
        assert changed and all(k.endswith("lora_up.weight") for k in changed)
    if module == "networks.oft":
        assert all(k.startswith("oft_unet_") and k.endswith(".oft_blocks") for k in changed)

    trainer.save_model(final=True)
    path = tmp_path / "adapter.safetensors"
    tensors, metadata = keys_and_metadata(path)
    assert metadata["ss_network_module"] == module
    if module == "networks.oft":
        assert set(tensors) == set(after)
    else:
        names = {lora.lora_name for lora in network.all_loras()}
        assert set(tensors) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    ours = unet_out()
    # our loader, on a fresh copy of the base model
    network.unapply()
    clean = copy.deepcopy(unet)
    loaded = resolve_network_module(module).create_network_from_weights(
        path, unet=clean, text_encoders=[copy.deepcopy(trainer.bundle.text_encoders[0])], family="sd1")
    loaded.apply_to()
    loaded.eval()
    with torch.no_grad():
        theirs = clean(latent, torch.tensor([10]), encoder_hidden_states=hidden).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- DyLoRA
def test_dylora_file_loads_in_diffusers_and_each_extracted_rank_is_the_truncated_dylora(tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the peft package")
    from sd_scripts.networks.extract_lora_from_dylora import main

    unet, te = tiny_unet(), tiny_text_encoder()
    clean_unet, clean_te = copy.deepcopy(unet), copy.deepcopy(te)
    network = build("networks.dylora", unet, te, ["unit=2", "conv_dim=6", "conv_alpha=3"], dim=6, alpha=3.0)
    perturb(network)
    network.eval()
    network.apply_to()
    full = run(unet, te)
    path = tmp_path / "dylora.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.dylora", "ss_network_dim": "6",
                                      "ss_network_args": json.dumps({"unit": "2", "conv_dim": "6"})})
    pipe = tiny_pipeline(copy.deepcopy(clean_unet), copy.deepcopy(clean_te))
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(run(pipe.unet, pipe.text_encoder)[0], full[0], atol=1e-5, rtol=1e-4)

    assert main(["--model", str(path), "--save_to", str(tmp_path / "split.safetensors")]) == 0  # unit from metadata
    assert sorted(p.name for p in tmp_path.glob("split-*")) == ["split-0002.safetensors", "split-0004.safetensors"]
    for rank in (2, 4):
        tensors, metadata = keys_and_metadata(tmp_path / f"split-{rank:04d}.safetensors")
        assert metadata["ss_network_dim"] == str(rank) and metadata["ss_training_comment"].startswith(
            f"split from DyLoRA, rank 6 to {rank}")
        assert all(v.shape[0] == rank for k, v in tensors.items() if k.endswith("lora_down.weight"))
        assert all(float(v) == 3.0 for k, v in tensors.items() if k.endswith(".alpha"))
        network.set_rank(rank)
        truncated = run(unet, te)
        pipe = tiny_pipeline(copy.deepcopy(clean_unet), copy.deepcopy(clean_te))
        pipe.load_lora_weights(str(tmp_path / f"split-{rank:04d}.safetensors"))
        theirs = run(pipe.unet, pipe.text_encoder)
        assert (truncated[0] - full[0]).abs().max() > 1e-4
        torch.testing.assert_close(theirs[0], truncated[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(theirs[1], truncated[1], atol=1e-5, rtol=1e-4)
    assert main(["--model", str(path), "--save_to", str(tmp_path / "x.safetensors"), "--unit", "6"]) == 1


def _linear_dylora(args, *, dropout=None, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(8, 6)
    from sd_scripts.networks.dylora import DyLoRAModule

    return layer, DyLoRAModule("m", layer, rank=4, alpha=2.0, dropout=dropout, **args)


def test_dylora_training_forward_is_sd_scripts_rule():
    """In training each forward draws b (a multiple of unit), trains rows b..b+unit-1 only and scales the whole
    update by sqrt(rank / (b + unit)); outside training it is the plain LoRA (alpha / rank)."""
    layer, module = _linear_dylora({"unit": 2})
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    module.apply_to()
    x = torch.randn(3, 8)
    base = module._org_forward(x)
    lora = (x @ module.down_weight().T @ module.up_weight().T).detach()
    module.eval()
    torch.testing.assert_close(layer(x), base + lora * 0.5)
    module.train()
    random.seed(11)
    b = random.randint(0, 3)
    b -= b % 2
    random.seed(11)
    out = layer(x)
    torch.testing.assert_close(out, base + lora * 0.5 * (4 / (b + 2)) ** 0.5)
    out.sum().backward()
    trained = [i for i, p in enumerate(module.lora_A) if p.grad is not None]
    assert trained == [b, b + 1] and [i for i, p in enumerate(module.lora_B) if p.grad is not None] == trained


@pytest.mark.parametrize("reentrant", [False, True])
def test_dylora_draw_survives_gradient_checkpointing(reentrant):
    """A checkpointed forward recomputed in backward keeps the step's draw: the same output, one trained block."""
    from torch.utils.checkpoint import checkpoint

    layer, module = _linear_dylora({"unit": 1})
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    module.apply_to()
    module.train()
    x = torch.randn(3, 8, requires_grad=True)
    random.seed(6)  # draws 0 then 3: a recomputation that drew again would differ
    checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    grads = [i for i, p in enumerate(module.lora_A) if p.grad is not None]
    random.seed(6)
    direct = layer(x)
    assert len(grads) == 1 and grads[0] == module._drawn
    row = module.lora_A[grads[0]]
    torch.testing.assert_close(row.grad, torch.autograd.grad(direct.sum(), row)[0])


@pytest.mark.parametrize("args,dropout", [({"module_dropout": 1.0}, None), ({"rank_dropout": 0.5}, None),
                                          ({}, 0.5)], ids=["module_dropout", "rank_dropout", "network_dropout"])
def test_dylora_dropouts_act_in_training(args, dropout):
    layer, module = _linear_dylora({"unit": 1, **args}, dropout=dropout)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    module.apply_to()
    x = torch.randn(4, 8)
    base = module._org_forward(x)
    _, reference = _linear_dylora({"unit": 1})
    reference.load_state_dict(module.state_dict())
    module.train()
    torch.manual_seed(0)
    random.seed(1)
    got = layer(x)
    module.restore()
    reference.apply_to()
    reference.train()
    torch.manual_seed(0)
    random.seed(1)
    without = layer(x)
    if args.get("module_dropout"):
        torch.testing.assert_close(got, base)
    else:
        assert (got - without).abs().max() > 1e-4


def test_dylora_network_args_reach_the_network():
    unet, te = tiny_unet(), tiny_text_encoder()
    plain = build("networks.dylora", copy.deepcopy(unet), None)
    conv = build("networks.dylora", copy.deepcopy(unet), None, ["conv_dim=4", "conv_alpha=3", "unit=4"])
    kxk = [m for m in conv.unet_loras if m._kxk]
    assert kxk and not any(m._kxk for m in plain.unet_loras)
    assert {float(m.alpha) for m in kxk} == {3.0} and {m.unit for m in conv.unet_loras} == {4}
    for args, message in [(["unit=3"], "unit=3 for networks.dylora must be 1 or more and divide network_dim"),
                          (["conv_dim=8"], "conv_dim=8 for networks.dylora must equal network_dim"),
                          (["block_dims=1"], "block_dims has 1 values but this model's U-Net has 25 blocks")]:
        with pytest.raises(NetworkError, match=message):
            build("networks.dylora", copy.deepcopy(unet), te, args)
    with pytest.raises(NetworkError, match="networks.dylora: this model family's LoRA file layout fuses"):
        build("networks.dylora", _tiny_flux()[0], None, family="flux")  # (sd-scripts' DyLoRA is U-Net only)


# ---------------------------------------------------------------- LoRA-FA
def test_lora_fa_trains_only_up_and_its_file_loads_in_diffusers(tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the peft package")
    unet, te = tiny_unet(), tiny_text_encoder()
    clean_unet, clean_te = copy.deepcopy(unet), copy.deepcopy(te)
    network = build("networks.lora_fa", unet, te, ["conv_dim=2", "conv_alpha=3", "rank_dropout=0.2",
                                                   "module_dropout=0.1"], dropout=0.3)
    kxk = [m for m in network.unet_loras if m.is_conv and m.lora_down.weight.shape[2:] == (3, 3)]
    assert kxk and {float(m.alpha) for m in kxk} == {3.0} and {m.rank for m in kxk} == {2}
    assert {(m.dropout, m.rank_dropout, m.module_dropout) for m in network.all_loras()} == {(0.3, 0.2, 0.1)}
    groups, names = network.prepare_optimizer_params(1e-4, 1e-5, 1e-4)
    ups = {id(m.lora_up.weight) for m in network.all_loras()}
    assert names == ["unet", "textencoder"] and all(id(p) in ups for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(network.all_loras())
    network.requires_grad_(True)
    assert not any(m.lora_down.weight.requires_grad for m in network.all_loras())
    m = network.unet_loras[0]
    fan = m.lora_down.weight.shape[1] + m.rank
    assert abs(m.lora_down.weight.std().item() - (2.0 / fan) ** 0.5) < 0.5 * (2.0 / fan) ** 0.5
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.normal_(0, 0.1)
    network.eval()
    network.apply_to()
    ours = run(unet, te)
    path = tmp_path / "lora_fa.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora_fa"})
    pipe = tiny_pipeline(clean_unet, clean_te)
    pipe.load_lora_weights(str(path))
    theirs = run(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(theirs[0], ours[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs[1], ours[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- OFT
def _lycoris_merged(layer, blocks, alpha, multiplier):
    """lycoris-lora's Diag-OFT weight for `layer` with these blocks and constraint (an independent implementation)."""
    from lycoris.modules.diag_oft import DiagOFTModule

    ref = DiagOFTModule("ref", layer, 1.0, lora_dim=blocks.shape[1], constraint=alpha)
    assert (ref.block_num, ref.block_size) == tuple(blocks.shape[:2])
    with torch.no_grad():
        ref.oft_blocks.copy_(blocks)
    return ref.get_merged_weight(multiplier=multiplier)[0]


@pytest.mark.parametrize("alpha,multiplier", [(1e-3, 1.0), (1.0, 0.6)], ids=["constrained", "free-half"])
def test_oft_rotation_is_lycoris_diag_oft(tmp_path, alpha, multiplier):
    unet = tiny_unet()
    clean = copy.deepcopy(unet)
    network = build("networks.oft", unet, None, alpha=alpha)
    perturb(network)
    network.set_multiplier(multiplier)
    for module in network.unet_loras:
        if module.outs[0] == 16:  # 4 blocks of 4: lycoris' factorization gives the same blocks
            merged = _lycoris_merged(module.layers[0], module.oft_blocks.detach(), alpha, multiplier)
            torch.testing.assert_close(module.rotated_weight(0), merged.float(), atol=1e-6, rtol=1e-5)
            checked = True
    assert checked
    network.apply_to()
    gen = torch.Generator().manual_seed(0)
    latent, hidden = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 6, 16, generator=gen)
    with torch.no_grad():
        ours = unet(latent, torch.tensor([7]), hidden).sample
        base = clean(latent, torch.tensor([7]), hidden).sample
    assert (ours - base).abs().max() > 1e-4
    path = tmp_path / "oft.safetensors"
    network.save_weights(path)
    tensors, _ = keys_and_metadata(path)
    assert all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in tensors)
    assert all(float(v) == pytest.approx(alpha) for k, v in tensors.items() if k.endswith(".alpha"))
    loaded = resolve_network_module("networks.oft").create_network_from_weights(path, unet=clean, text_encoders=[],
                                                                                family="sd1", multiplier=multiplier)
    loaded.apply_to()
    with torch.no_grad():
        torch.testing.assert_close(clean(latent, torch.tensor([7]), hidden).sample, ours, atol=1e-5, rtol=1e-4)


def test_oft_network_args_choose_the_layers_and_bad_values_are_errors():
    unet = tiny_unet()
    attn = build("networks.oft", unet, None)
    names = {m.lora_name for m in attn.unet_loras}
    assert names and all("_attn1_" in n or "_attn2_" in n for n in names)
    linear = {m.lora_name for m in build("networks.oft", unet, None, ["enable_all_linear=True"]).unet_loras}
    assert names < linear and any(n.endswith("_proj_in") or n.endswith("_ff_net_2") for n in linear - names)
    conv = {m.lora_name for m in build("networks.oft", unet, None, ["enable_conv=True"]).unet_loras}
    assert names < conv and any("_resnets_" in n and n.endswith("_conv1") for n in conv)
    assert not any(n.endswith("_ff_net_2") for n in conv)
    assert not build("networks.oft", unet, None, ["enable_all_linear=False"]).unet_loras[0].lora_name.endswith(
        "_proj_in")
    with pytest.raises(NetworkError, match="'network_dim': 5 .* must divide the output size"):
        build("networks.oft", unet, None, dim=5)
    with pytest.raises(NetworkError, match="'conv_dim' is not a setting of networks.oft"):
        build("networks.oft", unet, None, ["conv_dim=4"])
    with pytest.raises(NetworkError, match="enable_all_linear='maybe' for networks.oft is not True or False"):
        build("networks.oft", unet, None, ["enable_all_linear=maybe"])


def test_oft_flux_names_fused_parts_as_sd_scripts_and_loads_back(tmp_path):
    """oft_flux: BFL names from the family; img_attn.qkv holds oft_blocks.0-2 (q, k, v), single blocks' linear1
    oft_blocks.0-3 (q, k, v, mlp), every other module oft_blocks.0; attention-only = the double blocks' img_attn /
    txt_attn qkv and proj."""
    model, run_flux = _tiny_flux()
    clean = copy.deepcopy(model)
    base = run_flux(model)
    attn = build("networks.oft_flux", copy.deepcopy(model), None, family="flux")
    assert sorted(m.lora_name for m in attn.unet_loras) == sorted(
        f"oft_unet_double_blocks_{i}_{s}_attn_{p}" for i in range(2) for s in ("img", "txt") for p in ("qkv", "proj"))
    network = build("networks.oft_flux", model, None, ["enable_all_linear=True"], dim=8, alpha=1e-2, family="flux")
    state = network.state_dict()
    assert {k for k in state if k.startswith("oft_unet_double_blocks_0_img_attn_qkv.")} == {
        "oft_unet_double_blocks_0_img_attn_qkv.alpha", *(f"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.{i}"
                                                        for i in range(3))}
    assert sum(k.startswith("oft_unet_single_blocks_1_linear1.oft_blocks.") for k in state) == 4
    assert "oft_unet_single_blocks_1_linear2.oft_blocks.0" in state
    with pytest.raises(NetworkError, match="enable_conv .* no convolution blocks"):
        build("networks.oft_flux", copy.deepcopy(clean), None, ["enable_conv=True"], family="flux")
    perturb(network)
    qkv = next(m for m in network.unet_loras if m.lora_name == "oft_unet_double_blocks_0_img_attn_qkv")
    for part in range(3):  # each part rotated on its own, as sd-scripts splits the fused weight
        merged = _lycoris_merged(qkv.layers[part], qkv.oft_blocks[part].detach(), 1e-2, 1.0)
        torch.testing.assert_close(qkv.rotated_weight(part), merged.float(), atol=1e-6, rtol=1e-5)
    network.apply_to()
    ours = run_flux(model)
    assert (ours - base).abs().max() > 1e-4
    path = tmp_path / "oft_flux.safetensors"
    network.save_weights(path)
    loaded = resolve_network_module("networks.oft_flux").create_network_from_weights(
        path, unet=clean, text_encoders=[], family="flux")
    loaded.apply_to()
    torch.testing.assert_close(run_flux(clean), ours, atol=1e-5, rtol=1e-4)
