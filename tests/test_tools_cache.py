"""cache_latents / cache_text_encoder_outputs: the files a training run reads, which it then reuses without
encoding (one tiny SDXL model, in-process runs)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from sd_scripts.tools import cache_latents, cache_text_encoder_outputs


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """The tools and the trainer build accelerators in this process: start and leave the shared state clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def sdxl_and_data(tmp_path_factory):
    from sd_scripts.tools.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("cache")
    model = build_tiny_model(str(root / "model"), family="sdxl", layout="single", seed=0).single_file
    concept = root / "data" / "2_sks"
    concept.mkdir(parents=True)
    for i, size in enumerate(((64, 64), (128, 64))):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            concept / f"im{i}.png")
        (concept / f"im{i}.txt").write_text(f"a photo of sks, view {i}")
    return model, str(root / "data"), concept


def _common(model, data):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--caption_extension", ".txt",
            "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--bucket_reso_steps", "32"]


def test_caches_written_then_reused_by_training(sdxl_and_data, tmp_path, caplog):
    model, data, concept = sdxl_and_data
    with caplog.at_level(logging.INFO):
        assert cache_latents.main([*_common(model, data), "--sdxl", "--skip_existing", "--flip_aug"]) == 0
    assert "--skip_existing is deprecated" in caplog.text
    latents = sorted(n for n in os.listdir(concept) if n.endswith("_sdxl.npz"))
    assert latents == ["im0_0064x0064_sdxl.npz", "im1_0128x0064_sdxl.npz"]
    with np.load(concept / latents[1]) as z:
        assert z["latents"].shape == (4, 8, 8) and list(z["original_size"]) == [128, 64]
        assert "latents_flipped" in z  # --flip_aug reached the dataset
    te_args = [*_common(model, data), "--max_token_length", "150"]
    assert cache_text_encoder_outputs.main([*te_args, "--t5xxl_dtype", "bf16"]) == 0  # sd-scripts' name
    with np.load(concept / "im0_te_outputs.npz") as z:
        in_bf16 = z["hidden_state1"].copy()
    assert cache_text_encoder_outputs.main([*te_args, "--text_encoder_dtype", "float"]) == 0
    te = sorted(n for n in os.listdir(concept) if n.endswith("_te_outputs.npz"))
    assert te == ["im0_te_outputs.npz", "im1_te_outputs.npz"]
    with np.load(concept / te[0]) as z:
        assert z["hidden_state1"].shape[0] == 152 and str(z["caption"]) == "a photo of sks, view 0"  # 150 + 2
        assert not np.array_equal(z["hidden_state1"], in_bf16)  # re-encoded in float32 (the id sees the dtype)
    # a training run with the same settings reads both caches and encodes nothing
    from sd_scripts import sdxl_train_network

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert sdxl_train_network.main([*_common(model, data), "--output_dir", str(tmp_path / "out"),
                                        "--network_module", "networks.lora", "--max_train_steps", "1",
                                        "--cache_latents", "--cache_latents_to_disk", "--flip_aug",
                                        "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only",
                                        "--max_token_length", "150", "--learning_rate", "1e-4"]) == 0
    assert "latents: 0 encoded, 2 reused" in caplog.text
    assert "text-encoder outputs: 2 captions, 0 encoded, 2 files reused, 0 written" in caplog.text
    assert os.path.isfile(tmp_path / "out" / "last.safetensors")


def test_cache_errors(sdxl_and_data, capsys):
    model, data, _ = sdxl_and_data
    assert cache_latents.main([*_common(model, data), "--flux"]) == 1
    assert cache_text_encoder_outputs.main([*_common(model, data), "--shuffle_caption"]) == 1
    assert cache_latents.main(["--train_data_dir", data]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 3 and "--flux" in err[0] and "shuffle_caption" in err[1] and "pretrained_model" in err[2]
