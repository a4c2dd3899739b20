"""Family descriptors: torch-free facts and the metadata names they produce."""
import subprocess
import sys

import pytest

from sd_scripts.models.families import FAMILIES, base_model_version, family_info, modelspec_architecture


def test_facts():
    assert FAMILIES["sd1"].bucket_step == 64 and FAMILIES["sdxl"].bucket_step == 32
    assert FAMILIES["sd2"].default_resolution_for(True) == 768
    assert FAMILIES["sd2"].default_resolution_for(False) == 512
    assert FAMILIES["sdxl"].default_resolution == 1024
    assert FAMILIES["sd1"].vae_scaling_factor == 0.18215 and FAMILIES["sdxl"].vae_scaling_factor == 0.13025
    assert FAMILIES["sdxl"].lora_te_prefixes == ("lora_te1", "lora_te2")


def test_metadata_names():
    assert [base_model_version("sd1", False), base_model_version("sd2", False), base_model_version("sd2", True),
            base_model_version("sdxl", False)] == ["sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"]
    assert modelspec_architecture("sd1", False) == "stable-diffusion-v1"
    assert modelspec_architecture("sd2", False) == "stable-diffusion-v2-512"
    assert modelspec_architecture("sd2", True) == "stable-diffusion-v2-768-v"
    assert modelspec_architecture("sdxl", False) == "stable-diffusion-xl-v1-base"
    with pytest.raises(ValueError, match="sd3"):
        family_info("sd3")


def test_torch_free():
    code = "import sys, sd_scripts.models.families; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
