"""The '<repeats>_<class tokens>' folder convention and the errors users hit with it (sd_scripts.data.folders)."""
import logging
import os

import pytest
from PIL import Image

from sd_scripts.data.dataset import TrainDataset
from sd_scripts.data.folders import parse_concept_name, scan_concept_folders
from sd_scripts.errors import DatasetError
from sd_scripts.data.config_types import DatasetConfig


def image(path, size=(64, 64)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


@pytest.mark.parametrize("name,parsed", [
    ("10_sks dog", (10, "sks dog")),
    ("1_a_b", (1, "a_b")),
    ("3_", (3, "")),
    ("0_dog", None),
    ("dog", None),
    ("x10_dog", None),
    ("10dog", None),
])
def test_parse_concept_name(name, parsed):
    assert parse_concept_name(name) == parsed


def test_scan_finds_concepts_and_warns_per_ignored_folder(tmp_path, caplog):
    image(str(tmp_path / "10_sks dog" / "a.png"))
    image(str(tmp_path / "2_cat" / "b.JPG"))
    image(str(tmp_path / "photos" / "c.png"))
    image(str(tmp_path / "0_none" / "d.png"))
    (tmp_path / ".cache").mkdir()
    warnings = []
    with caplog.at_level(logging.WARNING):
        subsets = scan_concept_folders(str(tmp_path), is_reg=False, caption_extension=".txt", warnings=warnings)
    assert [(os.path.basename(s.image_dir), s.num_repeats, s.class_tokens) for s in subsets] == [
        ("10_sks dog", 10, "sks dog"), ("2_cat", 2, "cat")]
    assert all(s.caption_extension == ".txt" and not s.is_reg for s in subsets)
    assert len(warnings) == 2 and any("photos" in w for w in warnings) and any("0_none" in w for w in warnings)
    assert "photos" in caplog.text


def _layout_missing(tmp):
    return str(tmp / "nope"), "does not exist"


def _layout_empty_concept(tmp):
    (tmp / "5_dog").mkdir()
    image(str(tmp / "3_cat" / "a.png"))
    return str(tmp), "5_dog has no images"


def _layout_no_prefix(tmp):
    image(str(tmp / "dogs" / "a.png"))
    return str(tmp), "'dogs' are not named"


def _layout_pointed_at_concept(tmp):
    image(str(tmp / "10_dog" / "a.png"))
    return str(tmp / "10_dog"), "set train_data_dir to its parent"


def _layout_loose_images(tmp):
    image(str(tmp / "imgs" / "a.png"))
    return str(tmp / "imgs"), "holds images directly"


def _layout_images_in_subfolder_only(tmp):
    image(str(tmp / "10_dog" / "sub" / "a.png"))  # no recursion
    return str(tmp), "10_dog has no images"


@pytest.mark.parametrize("layout", [_layout_missing, _layout_empty_concept, _layout_no_prefix,
                                    _layout_pointed_at_concept, _layout_loose_images,
                                    _layout_images_in_subfolder_only])
def test_folder_errors_are_one_line_naming_the_path(tmp_path, layout):
    parent, fragment = layout(tmp_path)
    with pytest.raises(DatasetError) as err:
        scan_concept_folders(parent, is_reg=False, caption_extension=".caption")
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert str(tmp_path) in message


def test_reg_folder_errors_name_reg_data_dir(tmp_path):
    with pytest.raises(DatasetError, match="reg_data_dir"):
        scan_concept_folders(str(tmp_path / "missing"), is_reg=True, caption_extension=".caption")


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_corrupt_image_names_the_file(tmp_path, content):
    image(str(tmp_path / "1_dog" / "good.png"))
    (tmp_path / "1_dog" / "bad.png").write_bytes(content)
    subsets = scan_concept_folders(str(tmp_path), is_reg=False, caption_extension=".caption")
    with pytest.raises(DatasetError) as err:
        TrainDataset([DatasetConfig(resolution=(64, 64), subsets=subsets)], seed=0)
    assert str(tmp_path / "1_dog" / "bad.png") in str(err.value) and "\n" not in str(err.value)


def test_truncated_image_fails_at_load_naming_the_file(tmp_path):
    path = tmp_path / "1_dog" / "a.jpg"
    os.makedirs(path.parent)
    Image.effect_noise((256, 256), 64).convert("RGB").save(str(path), quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact (size readable), pixels cut
    subsets = scan_concept_folders(str(tmp_path), is_reg=False, caption_extension=".caption")
    ds = TrainDataset([DatasetConfig(resolution=(64, 64), subsets=subsets)], seed=0)
    with pytest.raises(DatasetError, match="a.jpg"):
        ds[0]


def test_caption_errors_surface_when_building_the_dataset(tmp_path):
    image(str(tmp_path / "1_dog" / "a.png"))
    (tmp_path / "1_dog" / "a.caption").write_bytes(b"\xff\xfe\xfa")
    subsets = scan_concept_folders(str(tmp_path), is_reg=False, caption_extension=".caption")
    with pytest.raises(DatasetError, match="UTF-8"):
        TrainDataset([DatasetConfig(resolution=(64, 64), subsets=subsets)], seed=0)
