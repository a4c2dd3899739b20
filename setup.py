"""Installs the two packages of the studio: kohya_gui (the browser GUI) and sd_scripts (the trainers)."""
from pathlib import Path

from setuptools import find_namespace_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="kohya-studio",
    version="0.1.0",
    description="Train Stable Diffusion LoRAs and fine-tunes from the browser, with a bundled trainer package.",
    # Data folders (bundled model configs, the tokenizer list, the GUI's CSS) are listed as namespace packages so that
    # setuptools installs them without pages of "Package would be ignored" warnings; their files are package data.
    packages=find_namespace_packages(include=["kohya_gui", "kohya_gui.*", "sd_scripts", "sd_scripts.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"sd_scripts.models.configs": ["*/*.json", "*/*.txt", "*/*.model", "*/LICENSE", "*/NOTICE"],
                  "": ["*.json", "*.txt", "*.css"]},
    install_requires=requirements,
    extras_require={"deepspeed": ["deepspeed"]},  # --deepspeed (see requirements.txt)
    python_requires=">=3.10",
    entry_points={"console_scripts": ["kohya-gui=kohya_gui.cli:main", "sd-train-network=sd_scripts.train_network:main"]},
)
