"""kohya_gui.dataset_prep: the '<repeats>_<tokens>' layout, captions, counts, links, and what the trainer's rule sees."""
import os

import pytest

from kohya_gui import preflight
from kohya_gui.dataset_prep import DatasetPrepError, prepare_dataset


def _raw(tmp_path, n=3, captions=True, name="raw"):
    raw = tmp_path / name
    raw.mkdir()
    for i in range(n):
        (raw / f"{i}.jpg").write_bytes(b"img%d" % i)
        if captions and i:
            (raw / f"{i}.txt").write_text(f"caption {i}")
    (raw / "notes.md").write_text("not an image")
    return raw


def test_layout_counts_and_captions(tmp_path):
    raw = _raw(tmp_path)
    reg = _raw(tmp_path, n=5, captions=False, name="regsrc")
    res = prepare_dataset(str(raw), str(tmp_path / "out"), "sks", "dog", 10, reg_images_dir=str(reg), reg_repeats=1)
    concept = tmp_path / "out" / "img" / "10_sks dog"
    assert res.train_data_dir == str(tmp_path / "out" / "img") and res.reg_data_dir == str(tmp_path / "out" / "reg")
    assert sorted(os.listdir(concept)) == ["0.jpg", "1.jpg", "1.txt", "2.jpg", "2.txt"]
    assert (concept / "1.txt").read_text() == "caption 1" and res.captions == 2
    assert res.counts == {"10_sks dog": 3, "reg/1_dog": 5}
    assert res.steps_per_epoch == 60  # 3 images x 10 repeats, doubled by regularisation
    checks = []
    assert preflight.scan_concepts(res.train_data_dir, "train_data_dir", ".txt", checks) == {"10_sks dog": (3, 10)}


def test_link_mode_and_rerun(tmp_path):
    raw = _raw(tmp_path)
    res = prepare_dataset(str(raw), str(tmp_path / "out"), "ohwx", "cat", 5, link=True)
    target = os.path.join(res.train_data_dir, "5_ohwx cat", "0.jpg")
    assert os.path.islink(target) and open(target, "rb").read() == b"img0"
    res = prepare_dataset(str(raw), str(tmp_path / "out"), "ohwx", "cat", 5)  # again, copying: replaces links
    assert not os.path.islink(target) and res.steps_per_epoch == 15


def test_bad_inputs_name_the_field(tmp_path):
    raw = _raw(tmp_path)
    with pytest.raises(DatasetPrepError, match="raw_images_dir"):
        prepare_dataset(str(tmp_path / "missing"), str(tmp_path / "o"), "sks", "dog", 1)
    with pytest.raises(DatasetPrepError, match="instance_prompt"):
        prepare_dataset(str(raw), str(tmp_path / "o"), "a/b", "dog", 1)
    with pytest.raises(DatasetPrepError, match="instance_prompt"):
        prepare_dataset(str(raw), str(tmp_path / "o"), " ", "", 1)
    with pytest.raises(DatasetPrepError, match="repeats"):
        prepare_dataset(str(raw), str(tmp_path / "o"), "sks", "dog", 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetPrepError, match="no images"):
        prepare_dataset(str(empty), str(tmp_path / "o"), "sks", "dog", 1)
