"""The LyCORIS tools (sd_scripts.networks.merge_lycoris, extract_lycoris) on the tiny SD1 model: a merged checkpoint
computes what the runtime-applied LyCORIS files compute, and an extracted file applied to the base reproduces the
fine-tune within the error the tool states."""
from __future__ import annotations

import copy
import subprocess

import pytest
import torch
from safetensors import safe_open

from conftest import PYTHON, REPO, subprocess_env
from sd_scripts.networks import extract_lycoris, merge_lycoris
from sd_scripts.networks.registry import resolve_network_module

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    from sd_scripts.models.loading import load_model

    return load_model(tiny_sd1.single_file)


def load(path):
    from sd_scripts.models.loading import load_model

    return load_model(str(path))


def make_lycoris(bundle, path, module, args, *, dim=4, alpha=1.0, seed=0, scale=0.05):
    """A LyCORIS file as our trainer writes it (network_module `module`), its parameters given known values."""
    unet, te = copy.deepcopy(bundle.denoiser), copy.deepcopy(bundle.text_encoders[0])
    net = resolve_network_module(module).create_network(unet=unet, text_encoders=[te], family=bundle.family,
                                                        network_dim=dim, network_alpha=alpha,
                                                        network_args=list(args))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    net.save_weights(str(path), None, {"ss_network_module": module})
    return str(path)


IDS = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(1))
LATENT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def outputs(unet, te):
    enc = te(IDS)[0]
    return enc, unet(LATENT, torch.tensor([10]), encoder_hidden_states=enc).sample


def runtime_outputs(bundle, files_and_ratios):
    """The base with each file applied at runtime by our lycoris.kohya loader (lycoris-lora's modules)."""
    unet, te = copy.deepcopy(bundle.denoiser), copy.deepcopy(bundle.text_encoders[0])
    for path, ratio in files_and_ratios:
        net = resolve_network_module("lycoris.kohya").create_network_from_weights(
            path, unet=unet, text_encoders=[te], family=bundle.family, multiplier=ratio)
        net.eval()
        net.apply_to()
    return outputs(unet, te)


# ------------------------------------------------------------------ merge_lycoris
@pytest.fixture(scope="module")
def lyco_files(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lyco")
    return {
        "locon": make_lycoris(sd1, folder / "locon.safetensors", "lycoris.kohya",
                              ["algo=locon", "conv_dim=2", "conv_alpha=1"], alpha=2.0, seed=1),
        # alpha != rank: lycoris-lora 4.1.3's own LoHa / LoKr merge would apply alpha/rank twice
        "loha": make_lycoris(sd1, folder / "loha.safetensors", "networks.loha", ["conv_dim=2", "conv_alpha=1"],
                             alpha=2.0, seed=2),
        "lokr": make_lycoris(sd1, folder / "lokr.safetensors", "lycoris.kohya", ["algo=lokr", "factor=4"],
                             alpha=2.0, seed=3),
    }


def test_merged_checkpoint_equals_runtime_lycoris(sd1, tiny_sd1, lyco_files, tmp_path):
    """LoCon + LoHa + LoKr merged at ratios into the SD1 single file: the saved checkpoint, loaded again, gives the
    text-encoder and U-Net outputs of the base with the three files applied at runtime at those ratios."""
    ratios = {"locon": 0.8, "loha": -0.5, "lokr": 1.2}
    out = tmp_path / "merged.safetensors"
    assert merge_lycoris.main(["--sd_model", tiny_sd1.single_file, "--models", *lyco_files.values(),
                               "--ratios", *map(str, ratios.values()), "--save_to", str(out)]) == 0
    merged = load(out)
    got = outputs(merged.denoiser, merged.text_encoders[0])
    want = runtime_outputs(sd1, [(lyco_files[k], r) for k, r in ratios.items()])
    base = outputs(sd1.denoiser, sd1.text_encoders[0])
    for g, w, b in zip(got, want, base):
        assert (w - b).abs().max() > 1e-2, "the files change the outputs"
        torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.merged_from"] == "tiny-sd1, locon, loha, lokr"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_merge_save_precision_and_one_line_errors(sd1, tiny_sd1, lyco_files, tmp_path, capsys):
    out = tmp_path / "half.safetensors"
    assert merge_lycoris.main(["--sd_model", tiny_sd1.single_file, "--models", lyco_files["locon"],
                               "--save_to", str(out), "--save_precision", "fp16", "--no_metadata"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
        assert "modelspec.title" not in (f.metadata() or {})
    # a LyCORIS of a wider model (same names, other shapes), ratios that do not match the files: one line each
    from safetensors.torch import load_file, save_file

    tensors = load_file(lyco_files["locon"])
    key = next(k for k in sorted(tensors) if k.endswith(".lora_down.weight") and tensors[k].dim() == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
    foreign = str(tmp_path / "foreign.safetensors")
    save_file(tensors, foreign)
    for args, named in ((["--models", foreign], "foreign.safetensors"),
                        (["--models", lyco_files["locon"], "--ratios", "1", "2"], "--ratios"),
                        (["--models", str(tmp_path / "nowhere.safetensors")], "'--models'")):
        bad = tmp_path / "bad.safetensors"
        assert merge_lycoris.main(["--sd_model", tiny_sd1.single_file, "--save_to", str(bad), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1, err
        assert not bad.exists()


# ------------------------------------------------------------------ extract_lycoris
@pytest.fixture(scope="module")
def tuned(sd1, tiny_sd1, tmp_path_factory):
    """A 'fine-tune': the base plus a known rank-2 LoCon (U-Net 3x3 convs and text encoder included)."""
    folder = tmp_path_factory.mktemp("tuned")
    known = make_lycoris(sd1, folder / "known.safetensors", "lycoris.kohya",
                         ["algo=locon", "conv_dim=2", "conv_alpha=2"], dim=2, alpha=2.0, seed=7, scale=0.3)
    path = folder / "tuned.safetensors"
    assert merge_lycoris.main(["--sd_model", tiny_sd1.single_file, "--models", known, "--save_to", str(path)]) == 0
    return str(path)


def test_extract_fixed_reproduces_the_difference(sd1, tiny_sd1, tuned, tmp_path, capsys):
    """Rank 4 >= the difference's rank 2, plain LoCon (--disable_cp): the file, applied to the base by our loader
    and by lycoris' own, gives the fine-tune's outputs; each module's reported error is fp16 rounding only."""
    out = tmp_path / "locon.safetensors"
    errors = extract_lycoris.extract(extract_lycoris.parse_args(
        ["--model_org", tiny_sd1.single_file, "--model_tuned", tuned, "--save_to", str(out), "--linear_dim", "4",
         "--conv_dim", "4", "--disable_cp", "--verbose"]))
    printed = capsys.readouterr().out
    assert "relative error of the updates" in printed and len(errors) > 50
    assert max(errors.values()) < 2e-3, {k: v for k, v in errors.items() if v > 2e-3}  # fp16 factors
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    names = {k.split(".")[0] for k in keys}
    assert len(names) == len(errors)
    assert any(n.startswith("lora_te_") for n in names) and any(n.endswith("resnets_0_conv1") for n in names)
    assert any(n.endswith("downsamplers_0_conv") for n in names)  # the family's name, not diffusers' Conv2d_0
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sd_v1"
    fine = load(tuned)
    want = outputs(fine.denoiser, fine.text_encoders[0])
    base = outputs(sd1.denoiser, sd1.text_encoders[0])

    def close(got):  # the fp16 rounding of every layer, carried through the network: <1% of the fine-tune's change
        for g, w, b in zip(got, want, base):
            assert float((g - w).norm() / (w - b).norm()) < 1e-2, float((g - w).norm() / (w - b).norm())

    close(runtime_outputs(sd1, [(str(out), 1.0)]))

    from tests.test_adapters import lycoris_loader  # lycoris-lora's own kohya loader, merged into a copy

    unet, te = copy.deepcopy(sd1.denoiser), copy.deepcopy(sd1.text_encoders[0])
    assert len(lycoris_loader(out, unet, te)) == len(errors)
    close(outputs(unet, te))


def test_extract_tucker_convs_report_their_error(sd1, tiny_sd1, tuned, tmp_path):
    """With a Tucker core (the default) lycoris approximates each 3x3 conv's factors once more: the error it costs
    is the one reported, checked here against the LoCon Tucker formula of the written tensors."""
    out = tmp_path / "cp.safetensors"
    errors = extract_lycoris.extract(extract_lycoris.parse_args(
        ["--model_org", tiny_sd1.single_file, "--model_tuned", tuned, "--save_to", str(out), "--linear_dim", "4",
         "--conv_dim", "4", "--save_precision", "float"]))
    with safe_open(str(out), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert f"{name}.lora_mid.weight" in t and t[f"{name}.lora_down.weight"].dtype == torch.float32
    assert max(e for n, e in errors.items() if f"{n}.lora_mid.weight" not in t) < 2e-3
    fine = load(tuned)
    with torch.no_grad():
        layer = (lambda bundle: bundle.denoiser.down_blocks[0].resnets[0].conv1.weight)
        want = layer(fine) - layer(sd1)
        mid, down, up = (t[f"{name}.lora_{p}.weight"] for p in ("mid", "down", "up"))
        got = torch.einsum("ijkl,jr,pi->prkl", mid, down.flatten(1), up.flatten(1)) * float(t[f"{name}.alpha"]) \
            / down.shape[0]
    assert abs(float((got - want).norm() / want.norm()) - errors[name]) < 1e-3


def _svals(diff):
    return torch.linalg.svdvals(diff.detach().float().reshape(diff.shape[0], -1))


@pytest.mark.parametrize("mode,args", [("threshold", ["--linear_threshold", "1e9", "--conv_threshold", "1e9"]),
                                       ("ratio", ["--linear_ratio", "0.999", "--conv_ratio", "0.999"]),
                                       ("quantile", ["--linear_quantile", "0.3", "--conv_quantile", "0.3"])])
def test_extract_modes_choose_ranks_and_state_the_error(sd1, tiny_sd1, tuned, tmp_path, mode, args):
    """Each mode's parameter reaches lycoris: here all of them keep one singular value (rank 1); the reported error
    is then what dropping the others costs (plus fp16 rounding), measured on the differences here."""
    out = tmp_path / f"{mode}.safetensors"
    errors = extract_lycoris.extract(extract_lycoris.parse_args(
        ["--model_org", tiny_sd1.single_file, "--model_tuned", tuned, "--save_to", str(out), "--mode", mode,
         "--disable_cp", *args]))
    with safe_open(str(out), "pt") as f:
        downs = {k.split(".")[0]: f.get_tensor(k) for k in f.keys() if k.endswith(".lora_down.weight")}
        assert not any(k.endswith(".lora_mid.weight") for k in f.keys())
        assert f.metadata()["ss_network_args"].count(mode) == 1
    assert downs and {int(d.shape[0]) for d in downs.values()} == {1}
    fine = load(tuned)
    layers = extract_lycoris.name_map(sd1)
    by_name = {}
    for prefix, root, tuned_root in extract_lycoris._parts(sd1, fine):
        tuned_modules = dict(tuned_root.named_modules())
        for path, module in root.named_modules():
            name = layers.get(f"{prefix}.{path}".replace(".", "_"))
            if name in downs:
                by_name[name] = tuned_modules[path].weight - module.weight
    for name, diff in by_name.items():
        s = _svals(diff)
        dropped = float(s[1:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert abs(errors[name] - dropped) < 3e-3, name


def test_extract_refuses_bad_parameters_in_one_line(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    for args, named in ((["--mode", "ratio", "--linear_ratio", "2"], "--linear_ratio"),
                        (["--linear_dim", "0"], "--linear_dim"),
                        (["--mode", "fixed"], "no layer differs")):
        assert extract_lycoris.main(["--model_org", tiny_sd1.single_file, "--model_tuned", tiny_sd1.single_file,
                                     "--save_to", str(out), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_option_lists_are_torch_free():
    code = ("import sys\n"
            "from sd_scripts.networks import merge_lycoris, extract_lycoris\n"
            "assert merge_lycoris.OPTIONS and extract_lycoris.OPTIONS\n"
            "extract_lycoris.parse_args(['--base_model', 'a', '--db_model', 'b', '--output_name', 'c.safetensors'])\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([PYTHON, "-c", code], check=True, cwd=REPO, env=subprocess_env(), timeout=60)
