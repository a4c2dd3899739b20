"""Shared fixtures: tiny models and the demo dataset, built once per test session (offline, seconds)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_sd1(tiny_root):
    from sd_scripts.tools.tiny_model import build_tiny_model

    return build_tiny_model(str(tiny_root / "sd1"), family="sd1", layout="both", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2v(tiny_root):
    from sd_scripts.tools.tiny_model import build_tiny_model

    return build_tiny_model(str(tiny_root / "sd2v"), family="sd2", v_prediction=True, layout="both", seed=0)


@pytest.fixture(scope="session")
def demo_data(tiny_root):
    from sd_scripts.tools.tiny_model import make_demo_dataset

    return make_demo_dataset(str(tiny_root / "demo_data"), seed=0)


def accelerate_cmd(*trainer_args: str, num_processes: int = 1, module: str = "sd_scripts.train_network") -> list[str]:
    """A real `accelerate launch` of one of our trainers on the CPU."""
    # Several processes on a machine without GPUs: accelerate's multi-process launcher, gloo on the CPU.
    device_flag = "--cpu" if num_processes == 1 else "--multi_gpu"
    return [PYTHON, "-m", "accelerate.commands.launch", device_flag, "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", "-m", module, *trainer_args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="session")
def tiny_lumina(tiny_root):
    """The tiny Lumina Image 2.0 model: {'transformer', 'gemma2', 'ae', 'diffusers_dir'} paths."""
    from sd_scripts.families.lumina.tiny import build_tiny_lumina

    return build_tiny_lumina(str(tiny_root / "lumina"), layout="both", seed=0)
