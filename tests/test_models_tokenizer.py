"""The bundled CLIP tokenizer: ids match the real CLIP-L tokenizer; SD1 pads with <|endoftext|>, SD2 with '!'."""
import os

from sd_scripts.models.tokenizer import TOKENIZER_DIR, load_clip_tokenizer
from sd_scripts.tools import build_tokenizer


def test_known_ids_and_size():
    tok = load_clip_tokenizer()
    assert tok("a photo of sks dog")["input_ids"] == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tok) == 49408
    assert tok.model_max_length == 77


def test_padding_modes():
    eos = load_clip_tokenizer("eos")("dog", padding="max_length", max_length=6)["input_ids"]
    zero = load_clip_tokenizer("zero")("dog", padding="max_length", max_length=6)["input_ids"]
    assert eos == [49406, 1929, 49407, 49407, 49407, 49407]
    assert zero == [49406, 1929, 49407, 0, 0, 0]


def test_merges_header():
    with open(os.path.join(TOKENIZER_DIR, "merges.txt"), encoding="utf-8") as f:
        assert f.readline().strip() == "#version: 0.2"


def _download_open_clip_wheel(folder) -> str:
    """The open_clip_torch wheel from the package registry (pip download, no dependencies); skips when the registry
    cannot be reached. Its BPE list has not changed since open_clip's first releases, so any version will do."""
    import glob
    import subprocess
    import sys

    import pytest

    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "open_clip_torch", "-d", str(folder)],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("pip download open_clip_torch timed out: the package registry is not reachable")
    wheels = glob.glob(os.path.join(str(folder), "open_clip_torch-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        pytest.skip(f"pip download open_clip_torch failed (is the package registry reachable?): {last}")
    return wheels[0]


def test_rebuild_from_the_open_clip_wheel_matches_bundled_files(tmp_path):
    wheel = _download_open_clip_wheel(tmp_path / "wheel")
    assert build_tokenizer.main(["--wheel", wheel, "--out", str(tmp_path / "out")]) == 0
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        with open(tmp_path / "out" / name, "rb") as a, open(os.path.join(TOKENIZER_DIR, name), "rb") as b:
            assert a.read() == b.read(), name


def test_missing_wheel_is_one_line_error(tmp_path, capsys):
    assert build_tokenizer.main(["--wheel", str(tmp_path / "nope.whl"), "--out", str(tmp_path)]) == 1
    assert "nope.whl" in capsys.readouterr().err
