"""training.saving: atomic writes, sd-scripts file names, pruning of old saves, output folder checks."""
from __future__ import annotations

import os

import pytest
import torch

from sd_scripts.errors import UserError
from sd_scripts.training.saving import (atomic_save_safetensors, atomic_torch_save, atomic_write,
                                        check_output_dir_writable, model_file_name, parse_save_name,
                                        prune_old_saves, state_dir_name)


def test_names():
    assert model_file_name("lora", "safetensors") == "lora.safetensors"
    assert model_file_name("lora", ".safetensors", epoch=3) == "lora-000003.safetensors"
    assert model_file_name("lora", "ckpt", step=100) == "lora-step00000100.ckpt"
    assert state_dir_name("lora") == "lora-state"
    assert state_dir_name("lora", epoch=3) == "lora-000003-state"
    assert state_dir_name("lora", step=100) == "lora-step00000100-state"
    with pytest.raises(ValueError):
        model_file_name("lora", "pt", epoch=1, step=1)
    assert parse_save_name("lora-000003.safetensors", "lora", "safetensors").epoch == 3
    assert parse_save_name("lora-step00000100-state", "lora", "safetensors").is_state
    for other in ("lora.safetensors", "lora-3.safetensors", "lora-000003.ckpt", "lora2-000003.safetensors",
                  "lora-000003.safetensors.bak", "my-lora-000003.safetensors"):
        assert parse_save_name(other, "lora", "safetensors") is None, other


def test_atomic_save_round_trip_and_permissions(tmp_path):
    path = tmp_path / "sub" / "m.safetensors"
    atomic_save_safetensors({"a": torch.arange(4.0)}, path, {"k": "v"})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("a"), torch.arange(4.0))
    assert os.stat(path).st_mode & 0o044  # readable by others as a plain open() would make it (umask 022)
    atomic_torch_save({"b": torch.ones(2)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt")["b"], torch.ones(2))
    with pytest.raises(TypeError):
        atomic_save_safetensors({"a": torch.zeros(1)}, tmp_path / "bad.safetensors", {"k": 1})
    assert not (tmp_path / "bad.safetensors").exists()


def test_failed_write_leaves_no_partial_file_and_keeps_old(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def half_then_fail(temp: str) -> None:
        with open(temp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.safetensors"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.safetensors", lambda temp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == ["model.safetensors"]


def _touch(folder, names):
    for name in names:
        if name.endswith("-state"):
            os.makedirs(folder / name)
            (folder / name / "train_state.json").write_text("{}")
        else:
            (folder / name).write_bytes(b"x")


def test_prune_keeps_last_n_epochs_and_only_our_files(tmp_path):
    ours = [model_file_name("lora", "safetensors", epoch=e) for e in range(1, 6)]
    states = [state_dir_name("lora", epoch=e) for e in range(1, 6)]
    others = ["lora.safetensors", "lora-000001.ckpt", "lora_v2-000001.safetensors", "notes.txt", "lora-state",
              model_file_name("lora", "safetensors", epoch=9)]
    _touch(tmp_path, ours + states + others)
    deleted = prune_old_saves(tmp_path, "lora", "safetensors", keep_last_n_epochs=2, current_epoch=5)
    assert sorted(os.path.basename(p) for p in deleted) == sorted(ours[:3] + states[:3])
    assert sorted(os.listdir(tmp_path)) == sorted(ours[3:] + states[3:] + others)


def test_prune_steps(tmp_path):
    names = [model_file_name("lora", "safetensors", step=s) for s in (100, 200, 300, 400)]
    _touch(tmp_path, names + [state_dir_name("lora", step=100)])
    # sd-scripts keeps the save made exactly N steps ago (at step 400 with N=200: 200, 300, 400)
    prune_old_saves(tmp_path, "lora", "safetensors", keep_last_n_steps=200, current_step=400, include_states=False)
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:] + [state_dir_name("lora", step=100)])
    prune_old_saves(tmp_path, "lora", "safetensors", keep_last_n_steps=100, current_step=400, include_models=False)
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])  # only the state went
    assert prune_old_saves(tmp_path / "missing", "lora", "safetensors", keep_last_n_steps=1, current_step=1) == []


def test_output_dir_checks(tmp_path):
    check_output_dir_writable(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir() and os.listdir(tmp_path / "new" / "dir") == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile"):
        check_output_dir_writable(tmp_path / "afile")
    with pytest.raises(UserError, match="under_a_file"):
        check_output_dir_writable(tmp_path / "afile" / "under_a_file")


def test_lora_save_failing_midway_keeps_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    from sd_scripts.networks.lora import LoRANetwork
    from sd_scripts.networks.lora_module import LoRAModule

    net = LoRANetwork(None, [])
    lora = LoRAModule("lora_unet_x", torch.nn.Linear(4, 4), rank=2)
    net.add_module(lora.lora_name, lora)
    net.unet_loras.append(lora)
    path = tmp_path / "lora.safetensors"
    net.save_weights(path, metadata={"ss_network_dim": "2"})
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="No space"):
        net.save_weights(path, metadata={"ss_network_dim": "2"})
    with pytest.raises(OSError):
        net.save_weights(tmp_path / "new.safetensors")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["lora.safetensors"]


_STREAM_SCRIPT = r"""
import resource, sys, torch
from sd_scripts.models.module_io import save_safetensors_atomic
from sd_scripts.models.safetensors_writer import Deferred
g = torch.Generator().manual_seed(0)
tensors = {f"w{i:02d}": torch.randn(1024, 1024, generator=g) for i in range(40)}  # 160 MB of float32
parts = [tensors["w00"], tensors["w01"]]
tensors["fused"] = Deferred((2048, 1024), torch.float32, lambda: torch.cat(parts))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
save_safetensors_atomic(tensors, sys.argv[1], {"k": "v"}, torch.bfloat16)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_full_model_saves_stream_one_tensor_at_a_time(tmp_path):
    """A save casts and writes tensor by tensor (sd-scripts' mem_eff_save, always): saving 160 MB of float32 as
    bf16 raises the peak memory by far less than the 80 MB a cast copy of the whole model would take; the file holds
    the cast values, the fused (Deferred) tensor included."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import subprocess_env

    path = tmp_path / "m.safetensors"
    out = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(path)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    grown_mb = int(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 30, f"peak memory grew by {grown_mb} MB while saving"
    g = torch.Generator().manual_seed(0)
    want = {f"w{i:02d}": torch.randn(1024, 1024, generator=g) for i in range(40)}
    got = load_file(str(path))
    assert got["w05"].dtype == torch.bfloat16 and torch.equal(got["w05"], want["w05"].to(torch.bfloat16))
    assert torch.equal(got["fused"], torch.cat([want["w00"], want["w01"]]).to(torch.bfloat16))
