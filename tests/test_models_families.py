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


def test_probe_is_torch_free(tmp_path):
    from sd_scripts.tools.tiny_model import build_tiny_model

    paths = build_tiny_model(str(tmp_path), "sd2", True)
    code = ("import sys; from sd_scripts.models.detect import probe_model as p; "
            f"a = p({paths.single_file!r}); b = p({paths.diffusers_dir!r}); "
            "assert (a.family, a.v_prediction, a.layout) == ('sd2', True, 'single_file'), a; "
            "assert (b.family, b.v_prediction, b.layout) == ('sd2', True, 'diffusers'), b; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probe_errors(tmp_path):
    from sd_scripts.errors import ModelLoadError
    from sd_scripts.models.detect import probe_model

    with pytest.raises(ModelLoadError, match="no such file"):
        probe_model(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_text("hello")
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        probe_model(str(bad))
    with pytest.raises(ModelLoadError, match="diffusers"):
        probe_model(str(tmp_path))
