"""Every option sd-scripts' (and kohya_ss') versions of the tools take is declared in the tool's option list and
reaches its parser; the lists import without torch, so a torch-free GUI can build forms from them."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

# option names of sd-scripts 48d368f (tools/, finetune/) and kohya_ss' helpers, as their parsers declare them
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = {
    "sd_scripts.tools.convert_diffusers20_original_sd":
        "v1 v2 unet_use_linear_projection fp16 bf16 float save_precision_as epoch global_step metadata variant "
        "reference_model use_safetensors model_to_load model_to_save",
    "sd_scripts.tools.show_metadata": "model",
    "sd_scripts.tools.merge_models": "models output ratios unet_only device precision saving_precision show_skipped",
    "sd_scripts.tools.resize_images_to_resolution":
        "src_img_folder dst_img_folder max_resolution divisible_by interpolation save_as_png copy_associated_files",
    "sd_scripts.tools.canny": "input output thres1 thres2",
    "sd_scripts.tools.basic_caption": "image_folder file_pattern caption_file_ext overwrite caption_text caption_file",
    "sd_scripts.tools.group_images":
        "input_folder output_folder group_size include_subfolders do_not_copy_other_files no_copy pad caption "
        "caption_ext",
    "sd_scripts.finetune.tag_images_by_wd14_tagger":
        "train_data_dir repo_id model_dir force_download batch_size max_data_loader_n_workers output_path "
        "caption_extention caption_extension thresh general_threshold character_threshold meta_threshold "
        "model_threshold copyright_threshold artist_threshold recursive remove_underscore debug undesired_tags "
        "frequency_tags onnx append_tags use_rating_tags use_rating_tags_as_last_tag use_quality_tags "
        "use_quality_tags_as_last_tag character_tags_first always_first_tags caption_separator tag_replacement "
        "character_tag_expand",
    "sd_scripts.finetune.make_captions":
        "train_data_dir caption_weights caption_extention caption_extension beam_search batch_size "
        "max_data_loader_n_workers num_beams top_p max_length min_length seed debug recursive",
    "sd_scripts.finetune.make_captions_by_git":
        "train_data_dir caption_extension model_id batch_size max_data_loader_n_workers max_length remove_words debug "
        "recursive",
}


@pytest.mark.parametrize("module", sorted(REFERENCE))
def test_every_reference_option_is_declared(module):
    from sd_scripts.tools.tool_cli import build_parser

    options = importlib.import_module(module).OPTIONS
    declared = {o.name for o in options} | {a for o in options for a in o.aliases}
    missing = set(REFERENCE[module].split()) - declared
    assert not missing, f"{module} lacks {sorted(missing)}"
    parser = build_parser(module, "", options)
    dests = {a.dest for a in parser._actions}
    assert {o.name for o in options} <= dests


def test_cache_tools_take_the_trainer_options_and_their_own():
    from sd_scripts.options import options_for
    from sd_scripts.tools import cache_latents, cache_text_encoder_outputs

    trainer = {o.name for o in options_for("network")}
    assert {"pretrained_model_name_or_path", "train_data_dir", "dataset_config", "vae_batch_size", "no_half_vae",
            "skip_cache_check", "weighted_captions", "max_token_length"} <= trainer
    for tool in (cache_latents, cache_text_encoder_outputs):
        names = {o.name for o in tool.options()}
        assert {"sdxl", "flux", "skip_existing"} <= names
    assert any("t5xxl_dtype" in o.aliases for o in cache_text_encoder_outputs.options())


def test_option_lists_are_torch_free():
    code = ("import sys\n"
            + "".join(f"import {m}\n" for m in (*REFERENCE, "sd_scripts.tools.dataset_balancing",
                                                 "sd_scripts.finetune.make_captions_by_florence2"))
            + "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_runs_as_a_module(tmp_path):
    """`python -m sd_scripts.tools.<tool>` works as sd-scripts' command lines call it (exit status, output)."""
    import json

    import torch
    from safetensors.torch import save_file

    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.zeros(1)}, path, metadata={"ss_network_dim": "4"})
    done = subprocess.run([sys.executable, "-m", "sd_scripts.tools.show_metadata", "--model", path],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and json.loads(done.stdout) == {"ss_network_dim": "4"}
    done = subprocess.run([sys.executable, "-m", "sd_scripts.tools.show_metadata", "--model", path + "x"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no such file" in done.stderr
