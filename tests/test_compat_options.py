"""sd-scripts options kept for its command lines: accepted, and either meaning what they say here or refused with
the reason when set; plain-read (non-mmap) loading of .safetensors files."""
from __future__ import annotations

import pytest
import torch

from sd_scripts.options import BY_NAME, OptionError, parse_args


@pytest.mark.parametrize("trainer, argv, words", [
    ("network", ["--split_mode"], ["split_mode", "blocks_to_swap"]),
    ("finetune", ["--save_t5xxl"], ["save_t5xxl", "_t5xxl.safetensors"]),
    ("db", ["--no_token_padding"], ["no_token_padding", "padded"]),
    ("network", ["--dataset_class", "my.Data"], ["dataset_class", "dataset_config"]),
    ("network", ["--t5xxl_dtype", "bf16"], ["t5xxl_dtype", "mixed precision"]),
])
def test_refused_options_are_accepted_by_the_parser_and_refused_with_the_reason(trainer, argv, words):
    assert BY_NAME[argv[0][2:]].refused
    with pytest.raises(OptionError) as e:
        parse_args(trainer, argv)
    assert all(w in str(e.value) for w in words) and "remove it" in str(e.value)
    parse_args(trainer, [])  # unset: nothing to refuse


def test_old_names_and_met_intents_parse():
    args = parse_args("finetune", ["--skip_latents_validity_check", "--highvram", "--diffusers_xformers",
                                   "--use_safetensors", "--fused_optimizer_groups", "4"])
    assert args.skip_cache_check and args.fused_optimizer_groups == 4


def test_refused_options_have_no_gui_widget():
    import gradio as gr

    from kohya_gui.components.sections import AdvancedTraining

    with gr.Blocks():
        section = AdvancedTraining("network", {}, "sd1", "t")
    names = {o.name for o in section.options}
    assert "fp8_base" in names and "split_mode" not in names and "dataset_class" not in names


def _mapped(path: str) -> bool:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return any(line.rstrip().endswith(path) for line in f)


def test_disable_mmap_load_safetensors_reads_without_mapping_the_file(tiny_sd1, tmp_path):
    """The same weights either way; with the option the file is never memory-mapped (sd-scripts' WSL speed-up).
    A private copy: the shared tiny model may still be mapped by an earlier test in this worker."""
    import shutil

    from sd_scripts.models.loading import load_model

    path = str(tmp_path / "own-copy.safetensors")
    shutil.copyfile(tiny_sd1.single_file, path)
    plain = load_model(path, disable_mmap_load_safetensors=True)
    assert not _mapped(path)
    mapped = load_model(path)
    assert _mapped(path)
    for (name, a), b in zip(plain.denoiser.state_dict().items(), mapped.denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.text_encoders[0].state_dict().values(), mapped.text_encoders[0].state_dict().values()):
        assert torch.equal(a, b)
