"""The part files of the tools that load a whole model (merge_lora, extract_lora_from_models, merge_lycoris,
extract_lycoris) come from the family registry (FamilySpec.part_files) with the help and path kind that
sd_scripts/options.py declares: a Lumina LoRA merged into the Lumina DiT file through --gemma2 / --ae changes the
merged weights by exactly the LoRA's updates, and extracting from the pair gives them back; an Anima merge goes
through --qwen3 / --vae."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from sd_scripts.networks import extract_lora_from_models, extract_lycoris, merge_lora, merge_lycoris
from sd_scripts.networks.lora_tools import model_layers, read_lora
from test_lora_tools import make_lora


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(tmp_path, variant):
    """(model file, {part option: file}) of the tiny model of `variant`, written with its part files."""
    from sd_scripts.families import tiny_files
    from sd_scripts.tools.tiny_model import build_tiny_model

    build_tiny_model(str(tmp_path / variant), family=variant, layout="single", seed=0)
    files = {k: os.path.join(tmp_path / variant, v) for k, v in tiny_files(variant).items()}
    return files.pop("pretrained_model_name_or_path"), files


def _argv(parts):
    return [x for k, v in parts.items() for x in (f"--{k}", v)]


def test_part_file_options_come_from_the_registry_and_the_schema():
    """Every family's part files are options of each tool, declared once: help and path kind from options.py;
    FLUX.1 / SD3's names are unchanged."""
    from sd_scripts.families import all_families, part_file_options
    from sd_scripts.options import BY_NAME

    wanted = {o for spec in all_families().values() for o in spec.part_files}
    for spec in all_families().values():  # each is a declared loading option the family takes, its tiny files too
        for name in spec.part_files:
            assert name in BY_NAME and (spec.accepts_option(name) or not BY_NAME[name].family_specific), \
                (spec.name, name)
        for files in spec.tiny_files.values():
            assert set(files) - {"pretrained_model_name_or_path"} <= set(spec.part_files), spec.name
    assert {"clip_l", "clip_g", "t5xxl", "ae", "gemma2", "qwen3", "byt5", "text_encoder", "vae"} <= wanted
    assert set(part_file_options()) == wanted
    for tool in (merge_lora, extract_lora_from_models, merge_lycoris, extract_lycoris):
        options = {o.name: o for o in tool.OPTIONS}
        assert len(options) == len(tool.OPTIONS), f"{tool.__name__} declares an option twice"
        for name in wanted:
            assert options[name].help == BY_NAME[name].help
            assert options[name].path == BY_NAME[name].path
            assert options[name].type is str and options[name].default is None


def test_lumina_merge_through_part_files_then_extract(tmp_path):
    """A Lumina LoRA merged into the DiT file loaded with --gemma2 / --ae: each adapted layer of the merged model is
    base + ratio x up @ down x alpha / rank; extract_lora_from_models on the pair (same part files) gives the updates
    back (rank 4 <= 4). A part file the family does not read is an error naming it."""
    from sd_scripts.models.loading import load_model

    model, parts = _tiny(tmp_path, "lumina")
    assert set(parts) == {"gemma2", "ae"}
    bundle = load_model(model, **parts)
    lora = make_lora(bundle, tmp_path / "lumina_lora.safetensors", dim=4, alpha=2, text_encoder=False)
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", model, "--models", lora, "--ratios", "0.5", "--save_to", str(merged),
                            *_argv(parts)]) == 0
    after = load_model(str(merged), **parts)
    base_layers, merged_layers = model_layers(bundle), model_layers(after)
    want = read_lora(lora)
    assert want.modules
    for name, module in want.modules.items():
        base, got = base_layers[name].weight(torch.float32), merged_layers[name].weight(torch.float32)
        assert float((got - base).abs().max()) > 1e-4, name
        torch.testing.assert_close(got, base + 0.5 * module.delta(), atol=1e-5, rtol=1e-4)
    # the part files themselves are left as they were; the saved file is the DiT alone
    assert set(load_file(str(merged))) == set(load_file(model))

    out = tmp_path / "extracted.safetensors"
    assert extract_lora_from_models.main(["--model_org", model, "--model_tuned", str(merged), "--save_to", str(out),
                                          "--dim", "4", "--clamp_quantile", "1", *_argv(parts)]) == 0
    got = read_lora(out)
    assert set(got.modules) == set(want.modules)
    for name, m in got.modules.items():
        torch.testing.assert_close(m.delta(), 0.5 * want.modules[name].delta(), atol=1e-4, rtol=1e-3)


def test_anima_merge_through_part_files_and_foreign_part_refused(tmp_path, capsys):
    """Anima's --qwen3 / --vae reach its loader through merge_lora; --gemma2 (Lumina's) is refused naming it."""
    from sd_scripts.models.loading import load_model

    model, parts = _tiny(tmp_path, "anima")
    assert set(parts) == {"qwen3", "vae"}
    bundle = load_model(model, **parts)
    lora = make_lora(bundle, tmp_path / "anima_lora.safetensors", dim=4, alpha=4, text_encoder=False)
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", model, "--models", lora, "--save_to", str(merged), *_argv(parts)]) == 0
    after = model_layers(load_model(str(merged), **parts))
    base = model_layers(bundle)
    for name, module in read_lora(lora).modules.items():
        torch.testing.assert_close(after[name].weight(torch.float32),
                                   base[name].weight(torch.float32) + module.delta(), atol=1e-5, rtol=1e-4)

    capsys.readouterr()
    assert merge_lora.main(["--sd_model", model, "--models", lora, "--save_to", str(tmp_path / "x.safetensors"),
                            *_argv(parts), "--gemma2", parts["qwen3"]]) == 1
    err = capsys.readouterr().err
    assert "--gemma2" in err and "--qwen3" in err and not (tmp_path / "x.safetensors").exists()
