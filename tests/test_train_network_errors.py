"""Bad inputs: each gives one clear line naming the file or field and the fix, no traceback, nothing half-written."""
from __future__ import annotations

import shutil

import pytest

from sd_scripts.train_network import main


def run_main(capsys, *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(tmp_path, demo_data):
    target = tmp_path / "data"
    shutil.copytree(demo_data, target)
    return target


def base_args(model, data, out):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "64", "--caption_extension", ".txt", "--max_train_steps", "2"]


def assert_nothing_written(out):
    assert not out.exists() or not list(out.rglob("*.safetensors"))


def test_corrupt_image(capsys, tmp_path, tiny_sd1, data):
    bad = next(data.glob("*/*.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    line = run_main(capsys, *base_args(tiny_sd1.single_file, data, tmp_path / "out"))
    assert bad.name in line
    assert_nothing_written(tmp_path / "out")


def test_empty_concept_folder(capsys, tmp_path, tiny_sd1, data):
    (data / "3_empty").mkdir()
    line = run_main(capsys, *base_args(tiny_sd1.single_file, data, tmp_path / "out"))
    assert "3_empty" in line


def test_folder_without_repeats_prefix(capsys, tmp_path, tiny_sd1, data):
    parent = tmp_path / "plain"
    (parent / "dogs").mkdir(parents=True)
    for img in list(data.glob("*/*.png"))[:2]:
        shutil.copy(img, parent / "dogs" / img.name)
    line = run_main(capsys, *base_args(tiny_sd1.single_file, parent, tmp_path / "out"))
    assert "dogs" in line


def test_pointed_at_the_concept_folder_itself(capsys, tmp_path, tiny_sd1, data):
    concept = next(p for p in data.iterdir() if p.is_dir())
    line = run_main(capsys, *base_args(tiny_sd1.single_file, concept, tmp_path / "out"))
    assert concept.name in line and "parent" in line


def test_missing_model_file(capsys, tmp_path, data):
    missing = tmp_path / "nope.safetensors"
    line = run_main(capsys, *base_args(str(missing), data, tmp_path / "out"))
    assert "nope.safetensors" in line


def test_corrupt_model_file(capsys, tmp_path, data):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a model")
    line = run_main(capsys, *base_args(str(bad), data, tmp_path / "out"))
    assert "broken.safetensors" in line


def test_non_utf8_caption(capsys, tmp_path, tiny_sd1, data):
    caption = next(data.glob("*/*.txt"))
    caption.write_bytes("caf\xe9 au lait".encode("latin-1"))
    line = run_main(capsys, *base_args(tiny_sd1.single_file, data, tmp_path / "out"))
    assert caption.name in line and "UTF-8" in line


def test_unknown_dataset_toml_key(capsys, tmp_path, tiny_sd1, data):
    concept = next(p for p in data.iterdir() if p.is_dir())
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(f'[general]\nresolution = 64\n[[datasets]]\nbatch_sise = 2\n[[datasets.subsets]]\n'
                   f'image_dir = "{concept}"\nnum_repeats = 2\n')
    line = run_main(capsys, "--pretrained_model_name_or_path", tiny_sd1.single_file, "--dataset_config", str(cfg),
                    "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2")
    assert "batch_sise" in line and "dataset.toml" in line


def test_unwritable_output_dir(capsys, tmp_path, tiny_sd1, data):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = run_main(capsys, *base_args(tiny_sd1.single_file, data, blocker / "out"))
    assert "a_file" in line


def test_unknown_option_is_refused(capsys, tmp_path, tiny_sd1, data):
    line = run_main(capsys, *base_args(tiny_sd1.single_file, data, tmp_path / "out"), "--network_dimm", "4")
    assert "--network_dimm" in line
