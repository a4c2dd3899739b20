"""Installs the two packages of the studio: kohya_gui (the browser GUI) and sd_scripts (the trainers)."""
from pathlib import Path

from setuptools import find_packages, setup

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
    packages=find_packages(include=["kohya_gui", "kohya_gui.*", "sd_scripts", "sd_scripts.*"]),
    include_package_data=True,
    package_data={"sd_scripts": ["models/configs/**/*", "tools/demo_assets/**/*"], "kohya_gui": ["assets/*"]},
    install_requires=requirements,
    python_requires=">=3.10",
    entry_points={"console_scripts": ["kohya-gui=kohya_gui.cli:main", "sd-train-network=sd_scripts.train_network:main"]},
)
