"""Dataset TOML lookup precedence, key errors and bucket checks (sd_scripts.data.dataset_config)."""
import os
import textwrap

import pytest
from PIL import Image

from sd_scripts.data.dataset_config import load_datasets
from sd_scripts.errors import DatasetError
from sd_scripts.options import parse_args


def image(path, size=(64, 64)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size).save(path)


@pytest.fixture
def folders(tmp_path):
    for name in ("a", "b", "c"):
        image(str(tmp_path / name / "x.png"))
    return tmp_path


def write_toml(tmp_path, body):
    path = tmp_path / "dataset.toml"
    path.write_text(textwrap.dedent(body).replace("@", str(tmp_path).replace("\\", "/")), encoding="utf-8")
    return str(path)


def args_for(*argv):
    return parse_args("network", list(argv))


def test_lookup_precedence_subset_dataset_general_cli_default(folders):
    toml = write_toml(folders, """
        [general]
        keep_tokens = 1
        resolution = [768, 512]
        caption_extension = ".txt"

        [[datasets]]
        keep_tokens = 2
        batch_size = 3

          [[datasets.subsets]]
          image_dir = "@/a"
          keep_tokens = 3
          num_repeats = 5

          [[datasets.subsets]]
          image_dir = "@/b"
          is_reg = true

        [[datasets]]
        resolution = 256
          [[datasets.subsets]]
          image_dir = "@/c"
          caption_extension = ".cap"
        """)
    args = args_for("--dataset_config", toml, "--keep_tokens", "4", "--shuffle_caption", "--train_batch_size", "7",
                    "--caption_extension", ".cli")
    first, second = load_datasets(args, 64)
    a, b = first.subsets
    (c,) = second.subsets
    assert [a.caption.keep_tokens, b.caption.keep_tokens, c.caption.keep_tokens] == [3, 2, 1]  # subset/dataset/general
    assert a.caption.shuffle and c.caption.shuffle  # command line
    assert a.flip_aug is False and a.caption.separator == ","  # defaults
    assert (first.batch_size, second.batch_size) == (3, 7)  # dataset / command line (train_batch_size)
    assert (first.resolution, second.resolution) == ((768, 512), (256, 256))
    assert [a.caption_extension, b.caption_extension, c.caption_extension] == [".txt", ".txt", ".cap"]
    assert (a.num_repeats, b.num_repeats, b.is_reg, a.is_reg) == (5, 1, True, False)
    assert a.image_dir == str(folders / "a") and a.class_tokens is None


@pytest.mark.parametrize("body,fragment", [
    ("[general]\nshuffle_captions = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'", "'shuffle_captions'"),
    ("[[datasets]]\nbatchsize = 2\n[[datasets.subsets]]\nimage_dir='@/a'", "'batchsize'"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'\nflip = true", "'flip'"),
    ("[extra]\nx = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'", "'extra'"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'\nbatch_size = 2", "move it to [general] or [[datasets]]"),
    ("[general]\nimage_dir='@/a'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'", "[[datasets.subsets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'\nnum_repeats = 'ten'", "whole number"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/missing'", "does not exist"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2", "no image_dir"),
    ("[general]\nbatch_size = 1", "no [[datasets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'\nnum_repeats = 0", "num_repeats 0"),
    ("[[datasets]]\nresize_interpolation = 'magic'\n[[datasets.subsets]]\nimage_dir='@/a'", "resize_interpolation"),
    ("[[datasets]\n", "not valid TOML"),
])
def test_toml_errors_name_the_key_and_file(folders, body, fragment):
    toml = write_toml(folders, body)
    with pytest.raises(DatasetError) as err:
        load_datasets(args_for("--dataset_config", toml), 64)
    message = str(err.value)
    assert fragment in message and toml in message and "\n" not in message


def test_missing_toml_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nope.toml"):
        load_datasets(args_for("--dataset_config", str(tmp_path / "nope.toml")), 64)


def test_alias_caption_extention_is_accepted(folders):
    toml = write_toml(folders, "[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'\ncaption_extention='.txt'")
    (ds,) = load_datasets(args_for("--dataset_config", toml), 64)
    assert ds.subsets[0].caption_extension == ".txt"


def test_folders_from_command_line(tmp_path):
    image(str(tmp_path / "train" / "10_sks dog" / "a.png"))
    image(str(tmp_path / "reg" / "1_dog" / "b.png"))
    args = args_for("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                    "--resolution", "512,768", "--train_batch_size", "2", "--flip_aug", "--caption_extension",
                    ".txt", "--keep_tokens", "1")
    (ds,) = load_datasets(args, 64)
    assert ds.resolution == (512, 768) and ds.batch_size == 2
    train, reg = ds.subsets
    assert (train.num_repeats, train.class_tokens, train.is_reg) == (10, "sks dog", False)
    assert (reg.num_repeats, reg.class_tokens, reg.is_reg) == (1, "dog", True)
    assert train.flip_aug and reg.flip_aug and train.caption.keep_tokens == 1 and train.caption_extension == ".txt"


def test_no_data_source_is_an_error():
    with pytest.raises(DatasetError, match="train_data_dir"):
        load_datasets(args_for(), 64)


@pytest.mark.parametrize("argv,divisor,fragment", [
    (["--enable_bucket", "--bucket_reso_steps", "32"], 64, "multiple of 64"),
    (["--enable_bucket", "--bucket_reso_steps", "48"], 32, "multiple of 32"),
    (["--resolution", "520"], 64, "multiple of 64"),
    (["--enable_bucket", "--resolution", "1024", "--max_bucket_reso", "768"], 64, "max_bucket_reso"),
])
def test_bucket_checks(tmp_path, argv, divisor, fragment):
    image(str(tmp_path / "1_a" / "x.png"))
    with pytest.raises(DatasetError, match=fragment):
        load_datasets(args_for("--train_data_dir", str(tmp_path), *argv), divisor)


@pytest.mark.parametrize("argv,divisor", [
    (["--enable_bucket", "--bucket_reso_steps", "32"], 32),  # SDXL allows 32
    (["--enable_bucket", "--bucket_reso_steps", "64"], 32),
    (["--resolution", "768,512"], 64),
    (["--enable_bucket", "--bucket_no_upscale", "--resolution", "1024", "--max_bucket_reso", "768"], 64),
])
def test_bucket_checks_pass(tmp_path, argv, divisor):
    image(str(tmp_path / "1_a" / "x.png"))
    load_datasets(args_for("--train_data_dir", str(tmp_path), *argv), divisor)


def test_min_max_snap_to_steps(tmp_path):
    image(str(tmp_path / "1_a" / "x.png"))
    (ds,) = load_datasets(args_for("--train_data_dir", str(tmp_path), "--enable_bucket", "--min_bucket_reso", "300",
                                   "--max_bucket_reso", "1000"), 64)
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (256, 1024)


def test_toml_datasets_are_described_for_metadata(folders):
    from sd_scripts.data.dataset import TrainDataset

    toml = write_toml(folders, "[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir='@/a'\nnum_repeats=3")
    configs = load_datasets(args_for("--dataset_config", toml), 64)
    assert configs[0].source == toml
    (described,) = TrainDataset(configs, seed=0).summary().dataset_config
    assert described["batch_size_per_device"] == 2 and described["bucket_info"] == {"512x512": 3}
    assert described["subsets"][0]["image_dir"] == "a" and described["subsets"][0]["num_repeats"] == 3


def test_fine_tune_metadata_file_and_cache_info(folders):
    import json

    from sd_scripts.data.dataset import TrainDataset

    (folders / "meta.json").write_text(json.dumps({"x": {"caption": "a cat", "tags": "red, fluffy"},
                                                   "missing": {"caption": "gone"}}), encoding="utf-8")
    toml = write_toml(folders, "[[datasets]]\n[[datasets.subsets]]\nimage_dir='@/a'\nmetadata_file='@/meta.json'\n"
                               "cache_info = true\ncustom_attributes = { lora = 'style' }")
    configs = load_datasets(args_for("--dataset_config", toml), 64)
    assert configs[0].subsets[0].custom_attributes == {"lora": "style"}
    ds = TrainDataset(configs, seed=0)
    assert [r.caption for r in ds.records] == ["a cat, red, fluffy"]
    cached = json.loads((folders / "a" / "metadata_cache.json").read_text(encoding="utf-8"))
    entry = cached[str(folders / "a" / "x.png")]  # sd-scripts' layout: {image path: {caption, resolution}}
    assert entry["resolution"] == [64, 64] and entry["caption"] == "a cat, red, fluffy"
