"""Adapters beyond LoRA: `lycoris.kohya` (every LyCORIS algo, through lycoris-lora), `networks.loha`, `networks.lokr`.

- test_file_loads_in_lycoris_and_reproduces_our_forward: each adapter's saved file, read by lycoris-lora's own loader
  (`lycoris.kohya.create_network_from_weights`) and merged into a fresh copy of the base model, gives the text encoder
  and U-Net outputs our applied network gave (so the key format, names, shapes and scales are LyCORIS's);
- test_trainer_step_trains_each_adapter: the real Trainer, in-process, trains each adapter one step on the tiny SD1
  model and saves a file whose metadata names the module;
- test_<option>...: every network_arg changes the modules lycoris builds (fails when dropped on the way).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sd_scripts.errors import NetworkError
from sd_scripts.networks.registry import resolve_network_module

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core machine, two threads per op spend more time waiting than working."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_sd1):
    from sd_scripts.models.loading import load_model

    return load_model(tiny_sd1.diffusers_dir)


def fresh(bundle):
    """Copies of the tiny U-Net and text encoder (each test adapts its own)."""
    return copy.deepcopy(bundle.denoiser), copy.deepcopy(bundle.text_encoders[0])


def build(module: str, unet, te, args=(), *, dim=4, alpha=1.0, family="sd1", **kw):
    return resolve_network_module(module).create_network(unet=unet, text_encoders=[te], family=family,
                                                         network_dim=dim, network_alpha=alpha,
                                                         network_args=list(args), **kw)


def perturb(network, seed=0):
    """Adapters start as the identity (one factor zero): give every parameter a known non-zero value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


INPUT_IDS = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(1))
LATENT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def outputs(unet, te):
    enc = te(INPUT_IDS)[0]
    return enc, unet(LATENT, torch.tensor([10]), encoder_hidden_states=enc).sample


def lycoris_loader(path, unet, te):
    """lycoris-lora's own kohya loader, its modules merged into the model.

    The loader first builds a network with lycoris' class-level preset before it reads the file; with lycoris 4's
    default preset that fails on any diffusers U-Net (the duplicated time_embedding names), so it is given an empty
    preset: every module then comes from the file. A transformers-5 CLIPTextModel has no `text_model` level, which
    the file's names (and lycoris' loader) expect: it is handed over inside one."""
    import lycoris.kohya as lk

    cls = lk.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                         "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    cls.apply_preset({k: [] for k in ("unet_target_module", "unet_target_name", "text_encoder_target_module",
                                      "text_encoder_target_name")})
    try:
        holder = nn.Module()
        holder.text_model = te
        network, _ = lk.create_network_from_weights(1.0, str(path), None, holder, unet)
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)
    modules = network.unet_loras + network.text_encoder_loras
    for module in modules:
        module.merge_to(1.0)
    return modules


def file_keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), dict(f.metadata() or {})


# ---------------------------------------------------------------- files load in lycoris and reproduce our forward
# (module, network_args, alpha). LoHa and LoKr with alpha = rank: lycoris-lora 4.1.3's LoHa / LoKr merge
# (get_diff_weight) applies alpha/rank twice, their forward once (as ComfyUI and A1111 read the files);
# test_forward_is_the_file_formula checks alpha != rank against the formula, by hand.
CASES = [
    ("lycoris.kohya", [], 2.0),  # the defaults: algo lora (LoCon), preset full
    ("lycoris.kohya", ["algo=locon", "conv_dim=2", "conv_alpha=1"], 2.0),
    ("lycoris.kohya", ["algo=loha", "conv_dim=2", "conv_alpha=2", "use_tucker=True"], 4.0),
    # LoKr without Tucker: lycoris-lora 4.1.3's loader reads a Tucker LoKr's rank from the wrong side of w2_a
    ("lycoris.kohya", ["algo=lokr", "factor=4", "conv_dim=2", "conv_alpha=2"], 4.0),
    ("lycoris.kohya", ["algo=glora"], 2.0),
    ("lycoris.kohya", ["algo=diag-oft", "constraint=0.01", "rescaled=True"], 2.0),
    ("lycoris.kohya", ["algo=boft"], 2.0),
    # (DyLoRA: lycoris-lora 4.1.3 saves a DyLoRA conv's up weight [out, rank] where its loader wants
    # [out, rank, 1, 1]: SD1's 1x1 proj_in/proj_out files do not load back; trained in test_trainer_step_...)
    ("lycoris.kohya", ["algo=full"], 2.0),
    ("networks.loha", ["conv_dim=2", "conv_alpha=2", "use_tucker=True"], 4.0),
    ("networks.lokr", ["conv_dim=2", "conv_alpha=2", "factor=4"], 4.0),
]


@pytest.mark.parametrize("module,args,alpha", CASES, ids=[f"{m}:{','.join(a) or 'defaults'}" for m, a, _ in CASES])
def test_file_loads_in_lycoris_and_reproduces_our_forward(base, tmp_path, module, args, alpha):
    unet, te = fresh(base)
    clean_unet, clean_te = fresh(base)
    before = outputs(unet, te)
    network = build(module, unet, te, args, alpha=alpha)
    perturb(network)
    network.eval()
    network.apply_to()
    ours = outputs(unet, te)
    assert (ours[1] - before[1]).abs().max() > 1e-3, "the adapter does not change the U-Net output"
    assert (ours[0] - before[0]).abs().max() > 1e-3, "the adapter does not change the text encoder output"
    path = tmp_path / "adapter.safetensors"
    network.save_weights(path, None, {"ss_network_module": module})
    keys, _ = file_keys(path)
    assert keys == set(network.state_dict())

    loaded = lycoris_loader(path, clean_unet, clean_te)
    assert len(loaded) == len(network.all_loras())
    theirs = outputs(clean_unet, clean_te)
    torch.testing.assert_close(theirs[0], ours[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(theirs[1], ours[1], atol=2e-4, rtol=1e-4)

    # our own loader (dim_from_weights) rebuilds the same network from the file
    unet2, te2 = fresh(base)
    again = resolve_network_module(module).create_network_from_weights(path, unet=unet2, text_encoders=[te2],
                                                                       family="sd1")
    again.eval()
    again.apply_to()
    torch.testing.assert_close(outputs(unet2, te2)[1], ours[1], atol=2e-4, rtol=1e-4)


def test_ia3_file_reproduces_our_forward(base, tmp_path):
    """IA3 (train_on_input as kohya_ss passes it): lycoris-lora 4.1.3's loader cannot rebuild IA3 modules (its
    IA3Module.make_module_from_state_dict takes one tensor but is given two), so the file goes through our loader,
    which builds lycoris' IA3Module on the side the file's `on_input` says."""
    unet, te = fresh(base)
    network = build("lycoris.kohya", unet, te, ["algo=ia3", "train_on_input=True"])
    assert all(int(m.on_input) == 1 for m in network.all_loras())
    perturb(network)
    network.eval()
    network.apply_to()
    ours = outputs(unet, te)
    path = tmp_path / "ia3.safetensors"
    network.save_weights(path)
    unet2, te2 = fresh(base)
    again = resolve_network_module("lycoris.kohya").create_network_from_weights(path, unet=unet2, text_encoders=[te2],
                                                                                family="sd1")
    assert all(int(m.on_input) == 1 for m in again.all_loras())
    again.eval()
    again.apply_to()
    torch.testing.assert_close(outputs(unet2, te2)[1], ours[1], atol=2e-4, rtol=1e-4)


def _loha_delta(t, rank):
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (float(t["alpha"]) / rank)


def _lokr_delta(t, rank):
    return torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (float(t["alpha"]) / rank)


@pytest.mark.parametrize("module,args,delta", [
    ("networks.loha", [], _loha_delta), ("lycoris.kohya", ["algo=loha"], _loha_delta),
    ("networks.lokr", ["factor=4"], _lokr_delta), ("lycoris.kohya", ["algo=lokr", "factor=4"], _lokr_delta)])
def test_forward_is_the_file_formula(base, tmp_path, module, args, delta):
    """alpha != rank: a layer's output change is the LyCORIS formula of the saved tensors (LoHa ((w1a@w1b) *
    (w2a@w2b)) * alpha/rank, LoKr kron(w1, w2a@w2b) * alpha/rank), computed here by hand."""
    unet, te = fresh(base)
    network = build(module, unet, te, args, alpha=2.0, dim=2)
    perturb(network)
    network.eval()
    path = tmp_path / "adapter.safetensors"
    network.save_weights(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        plain = layer(x)
        network.apply_to()
        adapted = layer(x)
    with safe_open(str(path), "pt") as f:
        t = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
    torch.testing.assert_close(adapted - plain, x @ delta(t, 2).T, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the real Trainer, in-process
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 64x64 train images in one batch."""
    from PIL import Image

    root = tmp_path_factory.mktemp("adapter_data")
    os.makedirs(root / "train" / "1_sks dog")
    for i, colour in enumerate([(200, 40, 40), (40, 200, 90)]):
        image = Image.new("RGB", (64, 64), colour)
        image.paste((255 - colour[0], 128, colour[2] // 2), (8 + 16 * i, 8, 40 + 16 * i, 48))
        image.save(root / "train" / "1_sks dog" / f"{i}.png")
    return str(root / "train")


# (LoKr, GLoRA, Diag-OFT, BOFT and full train through the same code; their files are checked in the loader test)
TRAINED = [
    ("lycoris.kohya", []),  # kohya_ss' default: preset full
    ("lycoris.kohya", ["algo=loha", "conv_dim=2"]),
    ("lycoris.kohya", ["algo=ia3", "train_on_input=True"]),
    ("lycoris.kohya", ["algo=dylora", "block_size=2"]),
    ("networks.loha", ["conv_dim=2", "use_tucker=True"]),
    ("networks.lokr", ["factor=4", "conv_dim=2", "use_tucker=True"]),
]


@pytest.mark.parametrize("module,args", TRAINED, ids=[f"{m}:{','.join(a) or 'defaults'}" for m, a in TRAINED])
def test_trainer_step_trains_each_adapter(tiny_sd1, data, tmp_path, module, args):
    from sd_scripts.options import parse_args
    from sd_scripts.training.loop import Trainer
    from sd_scripts.training.methods import NetworkMethod

    argv = ["--pretrained_model_name_or_path", tiny_sd1.diffusers_dir, "--output_dir", str(tmp_path),
            "--output_name", "adapter", "--train_data_dir", data, "--resolution", "64", "--train_batch_size", "2",
            "--cache_latents", "--seed", "3", "--max_train_steps", "1", "--learning_rate", "1e-2",
            "--optimizer_type", "AdamW", "--network_module", module, "--network_dim", "4", "--network_alpha", "2",
            *(["--network_args", *args] if args else [])]
    cli = parse_args("network", argv)
    trainer = Trainer(cli, NetworkMethod(cli))
    for step in ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents",
                 "cache_text_encoder_outputs", "build_method", "release_unused_models", "create_optimizer",
                 "prepare"):
        getattr(trainer, step)()
    network = trainer.method.network
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    loss = trainer.training_step(next(iter(trainer.loader)))
    assert torch.isfinite(loss)
    after = network.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "one optimizer step changed no adapter weight"
    assert any(k.startswith("lora_unet_") for k in changed) and any(k.startswith("lora_te_") for k in changed)

    trainer.save_model(final=True)
    keys, metadata = file_keys(tmp_path / "adapter.safetensors")
    assert keys == set(after)
    assert metadata["ss_network_module"] == module
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    if args:
        assert json.loads(metadata["ss_network_args"]) == dict(a.split("=", 1) for a in args)


# ---------------------------------------------------------------- each network_arg reaches the modules
def _unet_modules(net):
    return net.unet_loras


def _kxk(net):
    return [m for m in net.unet_loras if len(getattr(m, "shape", ())) == 4 and m.shape[2:] != (1, 1)]


ARG_EFFECTS = [
    # (module, network_args, check on the built network)
    ("lycoris.kohya", ["algo=loha"], lambda n: all(type(m).__name__ == "LohaModule" for m in n.all_loras())),
    ("lycoris.kohya", ["preset=attn-mlp"], lambda n: not _kxk(n) and len(n.unet_loras) < 83),
    ("lycoris.kohya", ["conv_dim=2", "conv_alpha=0.5"],
     lambda n: _kxk(n) and all(m.lora_dim == 2 and float(m.alpha) == 0.5 for m in _kxk(n))),
    ("lycoris.kohya", ["algo=lokr", "factor=2"], lambda n: tuple(n.unet_loras[5].lokr_w1.shape) == (2, 2)),
    ("lycoris.kohya", ["algo=lokr", "decompose_both=True", "factor=16"],
     lambda n: any(hasattr(m, "lokr_w1_a") for m in n.all_loras())),
    ("lycoris.kohya", ["algo=lokr", "decompose_both=False", "factor=16"],
     lambda n: not any(hasattr(m, "lokr_w1_a") for m in n.all_loras())),  # the text 'False' is false
    ("lycoris.kohya", ["algo=loha", "use_tucker=True", "conv_dim=2"], lambda n: all(m.tucker for m in _kxk(n))),
    ("lycoris.kohya", ["algo=loha", "use_scalar=True"], lambda n: all(m.scalar.requires_grad for m in n.all_loras())),
    ("lycoris.kohya", ["dora_wd=True"], lambda n: all(hasattr(m, "dora_scale") for m in n.all_loras())),
    ("lycoris.kohya", ["bypass_mode=True"], lambda n: all(m.bypass_mode for m in n.all_loras())),
    ("lycoris.kohya", ["train_norm=True"], lambda n: any(type(m).__name__ == "NormModule" for m in n.all_loras())),
    ("lycoris.kohya", ["rank_dropout_scale=True"], lambda n: all(m.rank_dropout_scale for m in n.all_loras())),
    ("lycoris.kohya", ["algo=ia3", "train_on_input=True"], lambda n: all(int(m.on_input) for m in n.all_loras())),
    ("lycoris.kohya", ["dropout=0.25", "rank_dropout=0.5", "module_dropout=0.125"],
     lambda n: all((m.drop.p, m.rank_dropout, m.module_dropout) == (0.25, 0.5, 0.125) for m in n.all_loras())),
    ("lycoris.kohya", ["algo=diag-oft", "constraint=0.01", "rescaled=True"],  # lycoris keeps constraint x dim
     lambda n: all(m.constraint == pytest.approx(0.01 * m.dim) and m.rescaled for m in n.all_loras())),
    ("lycoris.kohya", ["algo=dylora", "block_size=2"], lambda n: all(m.block_size == 2 for m in n.all_loras())),
    ("networks.loha", ["conv_dim=2", "conv_alpha=0.5", "use_tucker=True"],
     lambda n: _kxk(n) and all(m.tucker and m.lora_dim == 2 and float(m.alpha) == 0.5 for m in _kxk(n))),
    ("networks.lokr", ["factor=2"], lambda n: tuple(n.unet_loras[5].lokr_w1.shape) == (2, 2)),
    ("networks.lokr", ["rank_dropout=0.5", "module_dropout=0.125"],
     lambda n: all((m.rank_dropout, m.module_dropout) == (0.5, 0.125) for m in n.all_loras())),
    ("networks.loha", [r"exclude_patterns=['.*attn1.*']"],
     lambda n: n.unet_loras and not any("attn1" in m.lora_name for m in n.unet_loras)),
    ("networks.loha", [r"exclude_patterns=['.*attn.*']", r"include_patterns=['.*attn2_to_q|.*attn2\.to_q']"],
     lambda n: {m.lora_name.rsplit("_", 3)[-3:][-1] for m in n.unet_loras if "attn" in m.lora_name} == {"q"}),
]


@pytest.mark.parametrize("module,args,check", ARG_EFFECTS, ids=[f"{m}:{','.join(a)}" for m, a, _ in ARG_EFFECTS])
def test_network_arg_reaches_the_modules(base, module, args, check):
    unet, te = fresh(base)
    assert check(build(module, unet, te, args, network_dropout=None))


def test_network_dropout_is_lycoris_neuron_dropout(base):
    unet, te = fresh(base)
    net = build("lycoris.kohya", unet, te, network_dropout=0.3)
    assert all(m.drop.p == 0.3 for m in net.all_loras())


@pytest.mark.parametrize("module,args,message", [
    ("lycoris.kohya", ["algo=lokra"], "algo='lokra' is not a LyCORIS algo"),
    ("lycoris.kohya", ["use_tucker=maybe"], "use_tucker='maybe' for lycoris.kohya is not True or False"),
    ("lycoris.kohya", ["preset=/nowhere/p.toml"], "preset='/nowhere/p.toml' is neither"),
    ("lycoris.kohya", ["loraplus_typo=2"], "'loraplus_typo' is not a setting of lycoris.kohya"),
    ("networks.lokr", ["factor=x"], "factor='x' for networks.lokr is not int"),
    ("networks.loha", ["algo=loha"], "'algo' is not a setting of networks.loha"),
])
def test_bad_network_args_are_errors_naming_them(base, module, args, message):
    unet, te = fresh(base)
    with pytest.raises(NetworkError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build(module, unet, te, args)


def test_default_preset_leaves_lycoris_class_state_as_it_was(base):
    """lycoris keeps presets in class attributes: building a network with our preset puts them back."""
    import lycoris.kohya as lk

    before = list(lk.LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE)
    unet, te = fresh(base)
    net = build("lycoris.kohya", unet, te, ["preset=attn-only"])
    assert net.all_loras()
    assert lk.LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE == before


# ---------------------------------------------------------------- SDXL: SAI (LDM) names
def sai_view(unet):
    """The U-Net's layers under their single-file (SAI/LDM) paths, from the checkpoint key map (models/keymaps.py,
    checked against real checkpoints elsewhere): what lycoris' loader sees in sd-scripts' SDXL U-Net."""
    from sd_scripts.models.keymaps import unet_keymap
    from sd_scripts.models.ldm_layout import UNET_PREFIX

    keymap = unet_keymap(list(unet.state_dict()), unet.config.layers_per_block)
    modules = dict(unet.named_modules())
    root = nn.Module()
    for rule in keymap.rules:
        layer = modules.get(rule.diffusers[0][:-len(".weight")]) if rule.diffusers[0].endswith(".weight") else None
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        *parents, leaf = rule.ldm[len(UNET_PREFIX):-len(".weight")].split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(leaf, layer)
    return root


@pytest.mark.parametrize("module,args", [("lycoris.kohya", ["algo=lokr", "factor=4"]),
                                         ("networks.loha", ["conv_dim=2", "conv_alpha=2"])])
def test_sdxl_files_use_sai_names_and_load_in_lycoris(tmp_path, module, args):
    import lycoris.kohya as lk

    from tests.sdxl_parts import PROJ, TE1, TE2, TIME_DIM, tiny_sdxl_parts

    parts = tiny_sdxl_parts()
    clean = tiny_sdxl_parts()
    network = resolve_network_module(module).create_network(
        unet=parts.unet, text_encoders=[parts.text_encoder, parts.text_encoder_2], family="sdxl", network_dim=4,
        network_alpha=4, network_args=args)
    perturb(network)
    network.eval()
    network.apply_to()
    context = torch.randn(1, 77, TE1 + TE2, generator=torch.Generator().manual_seed(3))
    added = {"text_embeds": torch.randn(1, PROJ), "time_ids": torch.randn(1, 6) * TIME_DIM}
    ids = INPUT_IDS

    @torch.no_grad()
    def run(p):
        return (p.text_encoder(ids)[0], p.text_encoder_2(ids)[0],
                p.unet(LATENT, torch.tensor([10]), encoder_hidden_states=context, added_cond_kwargs=added).sample)

    ours = run(parts)
    path = tmp_path / "sdxl.safetensors"
    network.save_weights(path)
    keys, _ = file_keys(path)
    unet_names = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    assert unet_names and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                            "lora_unet_output_blocks_", "lora_unet_time_embed_", "lora_unet_out_"))
                              for n in unet_names)
    assert {k.split("_")[1] for k in keys} == {"te1", "te2", "unet"}

    cls = lk.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                         "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    cls.apply_preset({k: [] for k in ("unet_target_module", "unet_target_name", "text_encoder_target_module",
                                      "text_encoder_target_name")})
    try:
        holder = nn.Module()
        holder.text_model = clean.text_encoder
        loaded, _ = lk.create_network_from_weights(1.0, str(path), None, [holder, clean.text_encoder_2],
                                                   sai_view(clean.unet))
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)
    assert len(loaded.unet_loras) + len(loaded.text_encoder_loras) == len(network.all_loras())
    for m in loaded.unet_loras + loaded.text_encoder_loras:
        m.merge_to(1.0)
    for a, b in zip(run(clean), ours):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- DiT families: lycoris' own names
def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 6, 6))

    def run(m):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return m(hidden_states=torch.randn(1, 16, 64, generator=g),
                     encoder_hidden_states=torch.randn(1, 5, 48, generator=g),
                     pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
                     img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.0]),
                     return_dict=False)[0]
    return model.requires_grad_(False), run


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    from sd_scripts.families.sd3.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY_TRANSFORMER)

    def run(m):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return m(hidden_states=torch.randn(1, 16, 8, 8, generator=g),
                     encoder_hidden_states=torch.randn(1, 5, 128, generator=g),
                     pooled_projections=torch.randn(1, 96, generator=g), timestep=torch.tensor([500]),
                     return_dict=False)[0]
    return model.requires_grad_(False), run


@pytest.mark.parametrize("family,make,blocks", [
    ("flux", _tiny_flux, ("lycoris_transformer_blocks_", "lycoris_single_transformer_blocks_")),
    ("sd3", _tiny_sd3, ("lycoris_transformer_blocks_", "lycoris_norm_out_"))])
def test_dit_lycoris_files_use_lycoris_names_and_load_in_its_generic_loader(tmp_path, family, make, blocks):
    """FLUX.1 / SD3 LoRA layouts fuse q/k/v, which one-module-per-layer LyCORIS files cannot hold: lycoris.kohya names
    the denoiser's layers as lycoris itself (and SimpleTuner, read by ComfyUI) does, `lycoris_<diffusers path>`, on
    the family's LoRA target blocks; lycoris' generic loader rebuilds our forward. networks.loha / lokr refuse."""
    from lycoris.wrapper import create_lycoris_from_weights

    model, run = make()
    clean = copy.deepcopy(model)
    base_out = run(model)
    network = resolve_network_module("lycoris.kohya").create_network(
        unet=model, text_encoders=[], family=family, network_dim=4, network_alpha=4,
        network_args=["algo=lokr", "factor=4"], train_text_encoder=False)
    assert network.unet_loras and all(m.lora_name.startswith(blocks) for m in network.unet_loras)
    perturb(network)
    network.eval()
    network.apply_to()
    ours = run(model)
    assert (ours - base_out).abs().max() > 1e-3
    path = tmp_path / "dit.safetensors"
    network.save_weights(path)
    loaded, _ = create_lycoris_from_weights(1.0, str(path), clean)
    assert len(loaded.loras) == len(network.unet_loras)
    for m in loaded.loras:
        m.merge_to(1.0)
    torch.testing.assert_close(run(clean), ours, atol=2e-4, rtol=1e-4)
    with pytest.raises(NetworkError, match="networks.lokr: this model family's LoRA file layout fuses"):
        resolve_network_module("networks.lokr").create_network(unet=model, text_encoders=[], family=family,
                                                               network_dim=4, network_alpha=1)


# ---------------------------------------------------------------- resuming and preset files
def test_network_weights_resume_loads_the_file_and_checks_shapes(base, tmp_path):
    unet, te = fresh(base)
    first = build("lycoris.kohya", unet, te, ["algo=loha"])
    perturb(first)
    path = tmp_path / "loha.safetensors"
    first.save_weights(path)
    unet2, te2 = fresh(base)
    second = build("lycoris.kohya", unet2, te2, ["algo=loha"])
    second.load_weights(path)
    for key, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value)
    unet3, te3 = fresh(base)
    with pytest.raises(NetworkError, match="hada_w1_a has shape .* use the same network_dim"):
        build("lycoris.kohya", unet3, te3, ["algo=loha"], dim=8).load_weights(path)
    with pytest.raises(NetworkError, match="none of its .* tensors belongs to this lycoris.kohya network"):
        build("lycoris.kohya", unet3, te3, ["algo=lokr"]).load_weights(path)


def test_preset_toml_file_chooses_the_layers(base, tmp_path):
    """kohya_ss: 'Use path_to_config_file.toml to choose config file (for LyCORIS module settings)'."""
    preset = tmp_path / "preset.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'
                      'text_encoder_target_module = []\ntext_encoder_target_name = []\nenable_conv = false\n'
                      '[module_algo_map.Transformer2DModel]\nalgo = "loha"\n')
    unet, te = fresh(base)
    network = build("lycoris.kohya", unet, te, [f"preset={preset}"])
    assert not network.text_encoder_loras
    assert network.unet_loras and all("attentions" in m.lora_name for m in network.unet_loras)
    assert {type(m).__name__ for m in network.unet_loras} == {"LohaModule"}


# ---------------------------------------------------------------- diffusers reads LyCORIS LoCon files
def test_diffusers_loads_a_lycoris_locon_file_and_matches_our_forward(tmp_path):
    """diffusers' load_lora_weights reads LyCORIS LoRA/LoCon files (the kohya lora_down / lora_up keys), also the
    full preset's conv_in / time embedding / conv_out / ResNet layers (LoHa / LoKr keys it does not read)."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the peft package")
    from tests.test_lora_diffusers import run, tiny_pipeline, tiny_text_encoder, tiny_unet

    unet, te = tiny_unet(), tiny_text_encoder()
    pipe = tiny_pipeline(copy.deepcopy(unet), copy.deepcopy(te))
    before = run(unet, te)
    network = build("lycoris.kohya", unet, te, ["algo=locon", "conv_dim=2", "conv_alpha=2"], alpha=2.0)
    assert any("conv_in" in m.lora_name for m in network.unet_loras)
    perturb(network)
    network.eval()
    network.apply_to()
    ours = run(unet, te)
    path = tmp_path / "locon.safetensors"
    network.save_weights(path, None, {"ss_network_module": "lycoris.kohya"})
    pipe.load_lora_weights(str(path))
    theirs = run(pipe.unet, pipe.text_encoder)
    assert (ours[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(theirs[1], ours[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs[0], ours[0], atol=1e-4, rtol=1e-4)


def test_lycoris_lokr_through_accelerate_launch_loads_in_lycoris_and_changes_the_output(base, tiny_sd1, demo_data,
                                                                                         tmp_path):
    """End to end: `accelerate launch -m sd_scripts.train_network --network_module lycoris.kohya` (LoKr, kohya_ss's
    default preset), the saved file applied by lycoris-lora's own loader changes the base's outputs."""
    from conftest import accelerate_cmd
    from test_train_network_e2e import run_trainer

    out = tmp_path / "out"
    run_trainer(accelerate_cmd("--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir",
                               str(demo_data), "--caption_extension", ".txt", "--output_dir", str(out),
                               "--output_name", "lokr", "--resolution", "64", "--max_train_steps", "2",
                               "--learning_rate", "1e-2", "--network_module", "lycoris.kohya", "--network_dim", "4",
                               "--network_alpha", "4", "--network_args", "algo=lokr", "factor=4", "preset=full",
                               "--seed", "4"))
    path = out / "lokr.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya" and any(".lokr_w1" in k for k in f.keys())
    unet, te = fresh(base)
    before = outputs(unet, te)
    assert lycoris_loader(path, unet, te)
    after = outputs(unet, te)
    assert not torch.allclose(after[1], before[1])
