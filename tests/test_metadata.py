"""training.metadata: ss_*/modelspec.* keys and values, --no_metadata, and the sshs_* hashes of written files."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from sd_scripts import options
from sd_scripts.training.metadata import (add_model_hashes, build_training_metadata, minimal_metadata,
                                          safetensors_model_hash)


def make_args(**overrides):
    values = options.defaults("network")
    values.update(output_name="my_lora", output_dir="/home/someone/out", network_dim=8, network_alpha=4.0,
                  train_data_dir="/home/someone/data/train", pretrained_model_name_or_path="/models/v1-5.safetensors")
    values.update(overrides)
    import argparse

    return argparse.Namespace(**values)


SUMMARY = {"num_train_images": 20, "num_reg_images": 0, "tag_frequency": {"10_sks dog": {"SKS": 3, "dog": 2}},
           "dataset_dirs": {"10_sks dog": {"n_repeats": 10, "img_count": 2}}, "dataset_config": None}


def build(args=None, **kw):
    params = dict(family="sd1", v_prediction=False, resolution=(512, 768), dataset_summary=SUMMARY, total_steps=200,
                  epoch=2, step=100, started_at=1700000000.0, finished_at=1700000600.5, sd_model_name="v1-5.safetensors",
                  network_args=None, extra=None)
    params.update(kw)
    return build_training_metadata(args or make_args(), **params)


def test_ss_keys_and_values():
    meta = build()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == "v1-5.safetensors" and meta["ss_output_name"] == "my_lora"
    assert meta["ss_steps"] == "100" and meta["ss_epoch"] == "2" and meta["ss_max_train_steps"] == "200"
    assert meta["ss_num_train_images"] == "20" and meta["ss_num_reg_images"] == "0"
    assert meta["ss_training_started_at"] == "1700000000.0" and meta["ss_training_finished_at"] == "1700000600.5"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_sks dog": {"sks": 3, "dog": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}
    assert meta["ss_resolution"] == "(512, 768)"
    assert "ss_network_args" not in meta and "ss_datasets" not in meta
    # one ss_ key per option, None and booleans as Python str(); paths reduced to their last part
    assert meta["ss_seed"] == "None" and meta["ss_shuffle_caption"] == "False"
    assert meta["ss_learning_rate"] == str(options.BY_NAME["learning_rate"].default)
    assert meta["ss_train_data_dir"] == "train" and meta["ss_output_dir"] == "out"
    assert not any("/home/someone" in v for v in meta.values())
    for absent in ("ss_events_file", "ss_metadata_title", "ss_pretrained_model_name_or_path", "ss_no_metadata"):
        assert absent not in meta
    # sd-scripts' names and values of the loss options
    assert meta["ss_loss_type"] == "l2" and meta["ss_huber_schedule"] == "snr" and meta["ss_huber_c"] == "0.1"
    assert meta["ss_debiased_estimation"] == "False" and "ss_debiased_estimation_loss" not in meta


def test_optional_keys():
    meta = build(make_args(metadata_author="me", metadata_tags="a,b", clip_skip=2, optimizer_args=["weight_decay=0.1"]),
                 network_args={"conv_dim": 4, "conv_alpha": 1.0},
                 dataset_summary=dict(SUMMARY, dataset_config={"datasets": [{"resolution": 512}]}),
                 extra={"ss_session_id": 42})
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}
    assert json.loads(meta["ss_datasets"]) == {"datasets": [{"resolution": 512}]}
    assert meta["ss_session_id"] == "42"
    assert meta["ss_optimizer"] == "AdamW(weight_decay=0.1)"
    assert meta["modelspec.author"] == "me" and meta["modelspec.tags"] == "a,b"
    assert meta["modelspec.encoder_layer"] == "2"


@pytest.mark.parametrize("family,v,arch,impl,version", [
    ("sd1", False, "stable-diffusion-v1/lora", "diffusers", "sd_v1"),
    ("sd2", False, "stable-diffusion-v2-512/lora", "diffusers", "sd_v2"),
    ("sd2", True, "stable-diffusion-v2-768-v/lora", "diffusers", "sd_v2_v"),
    ("sdxl", False, "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
     "sdxl_base_v1-0"),
])
def test_modelspec(family, v, arch, impl, version):
    meta = build(family=family, v_prediction=v)
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == arch and meta["modelspec.implementation"] == impl
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == str(family == "sd2")
    assert meta["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert meta["modelspec.resolution"] == "512x768" and meta["modelspec.title"] == "my_lora"
    assert meta["modelspec.date"] == "2023-11-14T22:23:20+00:00"
    assert "modelspec.author" not in meta


def test_minimal_metadata():
    meta = add_model_hashes({"x": torch.zeros(2)}, build(network_args={"conv_dim": 4}))
    small = minimal_metadata(meta)
    assert {k for k in small if k.startswith("ss_")} == {"ss_v2", "ss_base_model_version", "ss_network_module",
                                                         "ss_network_dim", "ss_network_alpha", "ss_network_args"}
    assert "sshs_model_hash" in small and "modelspec.architecture" in small and "ss_tag_frequency" not in small


def test_written_file_hash_matches_reader(tmp_path):
    from sd_scripts.networks.lora import LoRANetwork
    from sd_scripts.networks.lora_module import LoRAModule

    torch.manual_seed(0)
    net = LoRANetwork(None, [])
    lora = LoRAModule("lora_unet_x", torch.nn.Linear(600, 600), rank=500)  # > 1 MiB of data: legacy hash covers it
    net.add_module(lora.lora_name, lora)
    net.unet_loras.append(lora)
    path = tmp_path / "lora.safetensors"
    net.save_weights(path, metadata=build())
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])["__metadata__"]
    assert header["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert header["sshs_model_hash"] == safetensors_model_hash(path)
    # legacy: 8 hex of sha256 of 64 KiB at 1 MiB of the file saved with only the ss_* metadata
    from safetensors.torch import load_file, save

    ss_only = save(load_file(str(path)), metadata={k: v for k, v in header.items() if k.startswith("ss_")})
    assert header["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert add_model_hashes(path, header)["sshs_model_hash"] == header["sshs_model_hash"]
    # dtype conversion happens before hashing: a half-precision file hashes its own bytes
    net.save_weights(path, dtype=torch.float16, metadata=build())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as sf:
        assert sf.metadata()["sshs_model_hash"] == safetensors_model_hash(path)
