"""The family registry: torch-free facts, detection, metadata names, and the rule that nothing outside a family's
package names it."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from sd_scripts.families import all_families, family_class, family_for_script, family_spec, tiny_variants
from sd_scripts.training.metadata import base_model_version, modelspec_architecture


def test_facts():
    f = all_families()
    assert f["sd1"].bucket_step == 64 and f["sdxl"].bucket_step == 32
    assert f["sd2"].default_resolution_for(True) == 768
    assert f["sd2"].default_resolution_for(False) == 512
    assert f["sdxl"].default_resolution == 1024
    assert f["sd1"].vae_scaling_factor == 0.18215 and f["sdxl"].vae_scaling_factor == 0.13025
    assert f["sdxl"].lora_te_prefixes == ("lora_te1", "lora_te2")
    assert family_for_script("sdxl_train_network").name == "sdxl" and family_for_script("train_network") is None
    assert tiny_variants()["sd2-v"] == ("sd2", True)


def test_metadata_names():
    assert [base_model_version("sd1", False), base_model_version("sd2", False), base_model_version("sd2", True),
            base_model_version("sdxl", False)] == ["sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"]
    assert modelspec_architecture("sd1", False, "") == "stable-diffusion-v1"
    assert modelspec_architecture("sd2", False, "") == "stable-diffusion-v2-512"
    assert modelspec_architecture("sd2", True) == "stable-diffusion-v2-768-v/lora"
    assert modelspec_architecture("sdxl", False, "textual-inversion") == \
        "stable-diffusion-xl-v1-base/textual-inversion"
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        family_spec("nope")


def test_every_family_has_a_torch_side_and_a_tiny_model():
    from sd_scripts.families.base import Family

    for name, spec in all_families().items():
        assert issubclass(family_class(name), Family), name
        assert spec.tiny_variants, f"{name}: no tiny model for tests and demos"
        assert set(spec.learning_rates) >= {"network"}, name


def test_torch_free():
    code = ("import sys, sd_scripts.families as f, sd_scripts.options; f.all_families(); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probe_is_torch_free(tmp_path):
    from sd_scripts.tools.tiny_model import build_tiny_model

    paths = build_tiny_model(str(tmp_path), "sd2", True)
    code = ("import sys; from sd_scripts.families import probe_model as p; "
            f"a = p({paths.single_file!r}); b = p({paths.diffusers_dir!r}); "
            "assert (a.family, a.v_prediction, a.layout) == ('sd2', True, 'single_file'), a; "
            "assert (b.family, b.v_prediction, b.layout) == ('sd2', True, 'diffusers'), b; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probe_errors(tmp_path):
    from sd_scripts.errors import ModelLoadError
    from sd_scripts.families import probe_model

    with pytest.raises(ModelLoadError, match="no such file"):
        probe_model(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_text("hello")
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        probe_model(str(bad))
    with pytest.raises(ModelLoadError, match="diffusers"):
        probe_model(str(tmp_path))


def _family_name_pattern() -> re.Pattern:
    names = set(all_families())
    for spec in all_families().values():
        names |= set(spec.tiny_variants)
    return re.compile(r"""["'](%s)["']""" % "|".join(sorted(map(re.escape, names), key=len, reverse=True)))


def test_no_family_is_named_outside_the_families_package():
    """A family is one package plus one registry line: the loop, methods, tools, options and GUI name none."""
    pattern = _family_name_pattern()
    offenders = []
    for top in ("sd_scripts", "kohya_gui"):
        for folder, _dirs, files in os.walk(os.path.join(REPO, top)):
            rel = os.path.relpath(folder, REPO)
            if rel.replace(os.sep, "/").startswith("sd_scripts/families"):
                continue
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if pattern.search(line):
                            offenders.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not offenders, "family names outside sd_scripts/families:\n" + "\n".join(offenders[:30])


@pytest.mark.parametrize("variant", ["sd1", "flux", "chroma", "sd3"])
def test_tiny_files_name_what_the_builders_write(variant, tmp_path):
    """families.tiny_files (the GUI's demo presets rely on it): the files `tiny_model --layout single` writes."""
    from sd_scripts.families import family_spec, probe_model, tiny_files, tiny_variants
    from sd_scripts.tools.tiny_model import build_tiny_model

    family, v_pred = tiny_variants()[variant]
    extra = {k: v for k, v in family_spec(family).tiny_variants[variant].items() if k != "v_prediction"}
    build_tiny_model(str(tmp_path), family, v_pred, "single", 0, **extra)
    files = tiny_files(variant)
    for option, name in files.items():
        assert (tmp_path / name).is_file(), (option, name)
        assert option == "pretrained_model_name_or_path" or family_spec(family).accepts_option(option), option
    assert probe_model(str(tmp_path / files["pretrained_model_name_or_path"])).family == family
