"""SDXL sample images during training: StableDiffusionXLPipeline around the in-memory modules."""
from __future__ import annotations

import torch
from PIL import Image

from sd_scripts.families.sd.sdxl import SDXLFamily
from sd_scripts.training.sampling import SamplePrompt, generate_samples
from sdxl_parts import bundle_view, tiny_sdxl_parts

SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}


def test_sdxl_pipeline_and_samples(tmp_path):
    p = tiny_sdxl_parts()
    bundle = bundle_view(p)
    bundle.scheduler_config = SCHEDULER
    family = SDXLFamily(bundle)
    pipe = family.sample_pipeline("euler").pipeline
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.unet is p.unet
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    p.unet.train()
    state = torch.get_rng_state()
    paths = generate_samples(family, prompts=[SamplePrompt("sks dog", "blurry", 64, 64, seed=3, steps=2, scale=5.0),
                                      SamplePrompt("ohwx cat", width=64, height=96, seed=4, steps=2)],
                             out_dir=str(tmp_path / "sample"), output_name="x", step=5, device="cpu",
                             dtype=torch.float32)
    assert [Image.open(q).size for q in paths] == [(64, 64), (64, 96)]
    assert p.unet.training and torch.equal(torch.get_rng_state(), state)
