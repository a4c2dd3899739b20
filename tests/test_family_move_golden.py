"""The family plug-in move changes no numbers: LoRAs trained with a fixed seed equal the ones the pre-move code made.

`tests/data/golden/*.safetensors` were written by the trainers before model families became packages (commit
ac8eb0c, torch 2.13.0 CPU). The runs exercise the step's maths (offset noise, min-SNR, v-prediction, prior loss
weights through regularisation images, gradient clipping), text-encoder training and LoCon, through a real
`accelerate launch`. Regenerate only for an intended change of numbers: `python tests/test_family_move_golden.py`.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate_cmd, subprocess_env

pytestmark = pytest.mark.timeout(600)
GOLDEN = os.path.join(REPO, "tests", "data", "golden")

RUNS = {
    # name: (tiny model family, v-prediction, extra options)
    "sd1_lora": ("sd1", False, dict(noise_offset=0.1, min_snr_gamma=5.0, network_args=["conv_dim=2", "conv_alpha=1"],
                                    max_grad_norm=0.01)),
    "sd2v_lora": ("sd2", True, dict(min_snr_gamma=3.0, with_reg=True, prior_loss_weight=0.5)),
    "sdxl_lora": ("sdxl", False, dict(noise_offset=0.05)),
}


def _train(name: str, root: str, out_dir: str) -> str:
    from sd_scripts.options import dump_toml
    from sd_scripts.tools.tiny_model import build_tiny_model, make_demo_dataset

    family, v_pred, extra = RUNS[name]
    extra = dict(extra)
    model = build_tiny_model(os.path.join(root, "model"), family=family, v_prediction=v_pred, layout="single",
                             seed=0).single_file
    data = make_demo_dataset(os.path.join(root, "data"), seed=0)
    if extra.pop("with_reg", False):
        extra["reg_data_dir"] = make_demo_dataset(os.path.join(root, "reg"), seed=1)
    values = dict(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=out_dir, output_name=name,
                  resolution="64", network_dim=4, network_alpha=2.0, learning_rate=1e-3, max_train_steps=3,
                  caption_extension=".txt", cache_latents=True, seed=7, save_model_as="safetensors", **extra)
    cfg = os.path.join(root, "run.toml")
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(dump_toml(values, "network"))
    proc = subprocess.run(accelerate_cmd("--config_file", cfg), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=540)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stderr[-4000:]}")
    return os.path.join(out_dir, f"{name}.safetensors")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_lora_is_bit_identical_to_the_pre_move_trainer(name, tmp_path):
    made = load_file(_train(name, str(tmp_path), str(tmp_path / "out")))
    golden = load_file(os.path.join(GOLDEN, f"{name}.safetensors"))
    assert sorted(made) == sorted(golden)
    differing = [k for k in golden if not torch.equal(made[k], golden[k])]
    assert not differing, f"{len(differing)} tensors differ from the golden file, e.g. {differing[:3]}"


if __name__ == "__main__":  # regenerate the golden files
    import shutil
    import tempfile

    sys.path.insert(0, os.path.dirname(__file__))
    os.makedirs(GOLDEN, exist_ok=True)
    for run in sorted(RUNS):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(_train(run, tmp, os.path.join(tmp, "out")), os.path.join(GOLDEN, f"{run}.safetensors"))
            print("wrote", run)
