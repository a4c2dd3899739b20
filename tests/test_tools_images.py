"""Image and dataset tools: resize_images_to_resolution, canny, basic_caption, group_images, dataset_balancing."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from sd_scripts.tools import basic_caption, canny, dataset_balancing, group_images, resize_images_to_resolution


def _image(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------ resize_images_to_resolution
def test_resize_resolutions_divisible_formats_and_associated(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _image(src / "a.png", 200, 100)
    _image(src / "small.jpg", 30, 20)
    (src / "a.txt").write_text("a cat")
    (src / "notes.md").write_text("x")
    main = resize_images_to_resolution.main
    assert main([str(src), str(dst), "--max_resolution", "100x50, 64x64", "--divisible_by", "8"]) == 0
    with Image.open(dst / "a+100x50.jpg") as im:
        assert im.size == (96, 48) and im.format == "JPEG"  # 100x50 area, then multiples of 8
    with Image.open(dst / "a+64x64.jpg") as im:
        assert im.size == (88, 40)  # 90x45 fits 64*64 pixels; cropped to multiples of 8
    with Image.open(dst / "small+64x64.jpg") as im:
        assert im.size == (24, 16)  # never enlarged, only cropped
    assert (dst / "a.txt").read_text() == "a cat" and (dst / "notes.md").exists()
    assert not (dst / "a+64x64.txt").exists()
    dst2 = tmp_path / "dst2"
    assert main([str(src), str(dst2), "--max_resolution", "64x64", "--save_as_png", "--copy_associated_files",
                 "--interpolation", "nearest"]) == 0
    assert (dst2 / "a+64x64.txt").read_text() == "a cat" and not (dst2 / "notes+64x64.md").exists()
    with Image.open(dst2 / "a+64x64.png") as im:
        nearest = np.asarray(im)
    with Image.open(src / "a.png") as im:  # nearest takes source pixels as they are
        assert set(map(tuple, nearest.reshape(-1, 3)[:50])) <= set(map(tuple, np.asarray(im).reshape(-1, 3)))
    main([str(src), str(tmp_path / "d3"), "--max_resolution", "64x64", "--save_as_png", "--interpolation", "box"])
    assert not np.array_equal(nearest, np.asarray(Image.open(tmp_path / "d3" / "a+64x64.png")))
    assert main([str(src), str(tmp_path / "d4"), "--max_resolution", "64"]) == 1


# ------------------------------------------------------------------ canny
def test_canny_edges_and_thresholds(tmp_path):
    img = np.zeros((40, 40), np.uint8)
    img[10:30, 10:30] = 200  # a bright square: strong edges
    img[:, 35:] = 30  # a faint step: weak edges only
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "edges.png"
    assert canny.main(["--input", str(tmp_path / "in.png"), "--output", str(out)]) == 0
    edges = np.asarray(Image.open(out))
    assert edges.shape == (40, 40) and set(np.unique(edges)) == {0, 255}
    assert edges[20, 8:12].any() and edges[20, 28:32].any() and not edges[20, 15:25].any()
    assert not edges[:, 33:37].any()  # below thres2 and connected to no strong edge
    assert canny.main(["--input", str(tmp_path / "in.png"), "--output", str(out), "--thres1", "10",
                       "--thres2", "60"]) == 0
    assert np.asarray(Image.open(out))[:, 33:37].any()
    # hysteresis: with a high thres2 nothing survives; thres1 below it keeps what is connected
    assert canny.main(["--input", str(tmp_path / "in.png"), "--output", str(out), "--thres2", "5000"]) == 0
    assert not np.asarray(Image.open(out)).any()
    folder = tmp_path / "out"
    assert canny.main(["--input", str(tmp_path), "--output", str(folder)]) == 0
    assert sorted(os.listdir(folder)) == ["edges.png", "in.png"]
    assert canny.main(["--input", str(tmp_path / "none.png"), "--output", str(out)]) == 1


# ------------------------------------------------------------------ basic_caption
def test_basic_caption(tmp_path, capsys):
    for name in ("a.png", "b.jpg", "c.webp"):
        _image(tmp_path / name, 8, 8)
    (tmp_path / "b.txt").write_text("old caption")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "d.png", 8, 8)
    main = basic_caption.main
    assert main([str(tmp_path), "--caption_text", "sks dog", "--caption_file_ext", ".txt"]) == 0
    assert (tmp_path / "a.txt").read_text() == "sks dog" and (tmp_path / "b.txt").read_text() == "old caption"
    assert not (tmp_path / "sub" / "d.txt").exists()
    assert main([str(tmp_path), "--caption_text", "sks dog", "--caption_extension", ".txt", "--overwrite",
                 "--file_pattern", "*.jpg"]) == 0
    assert (tmp_path / "b.txt").read_text() == "sks dog"
    (tmp_path / "c.txt").unlink()
    # prefix / postfix / find-replace change existing captions only with --overwrite
    assert main([str(tmp_path), "--caption_file_ext", ".txt", "--prefix", "photo of", "--postfix", "outdoors"]) == 0
    assert (tmp_path / "a.txt").read_text() == "sks dog"
    args = [str(tmp_path), "--caption_file_ext", ".txt", "--prefix", "photo of", "--postfix", "outdoors",
            "--find", "dog", "--replace", "cat", "--overwrite", "--recursive"]
    assert main(args) == 0 and main(args) == 0  # twice: the prefix is not doubled
    assert (tmp_path / "a.txt").read_text() == "photo of sks cat outdoors"
    assert (tmp_path / "c.txt").read_text() == "photo of outdoors"  # no caption before: prefix and postfix
    assert (tmp_path / "sub" / "d.txt").read_text() == "photo of outdoors"
    (tmp_path / "line.txt").write_text("from a file\nsecond")
    assert main([str(tmp_path / "sub"), "--caption_file", str(tmp_path / "line.txt"), "--overwrite"]) == 0
    assert (tmp_path / "sub" / "d.caption").read_text() == "from a file"
    assert main([str(tmp_path / "none"), "--caption_text", "x"]) == 1
    assert main([str(tmp_path), "--replace", "x"]) == 1


# ------------------------------------------------------------------ group_images
def test_group_images(tmp_path):
    src = tmp_path / "10_sks dog"
    src.mkdir()
    for i, (w, h) in enumerate(((40, 20), (44, 20), (20, 40), (20, 44), (30, 30))):
        _image(src / f"im{i}.png", w, h, seed=i)
    (src / "im0.txt").write_text("caption 0")
    (src / "im0.npz").write_bytes(b"x")
    out = tmp_path / "out"
    assert group_images.main([str(src), str(out), "2"]) == 0
    names = sorted(os.listdir(out))
    assert "group-2-2-im0.jpg" in names and "group-2-2-im0.txt" in names and not any(n.endswith(".npz") for n in names)
    sizes = {n: Image.open(out / n).size for n in names if n.endswith(".jpg")}
    assert sizes["group-1-1-im3.jpg"] == sizes["group-1-2-im2.jpg"]  # the tall ones share one size
    assert len(sizes) == 5 and len(set(sizes.values())) == 3
    out2 = tmp_path / "out2"
    assert group_images.main([str(src), str(out2), "5", "--pad", "--caption", "--caption_ext", ".cap",
                              "--no_copy"]) == 0
    assert (out2 / "group-1-4-im0.cap").read_text() == "sks dog" and not (out2 / "group-1-4-im0.txt").exists()
    padded = np.asarray(Image.open(out2 / "group-1-4-im0.jpg"))  # the widest image, padded top and bottom
    assert padded[0].mean() < 10 and padded[padded.shape[0] // 2].mean() > 30
    out3 = tmp_path / "out3"
    assert group_images.main([str(tmp_path), str(out3), "5", "--include_subfolders", "--do_not_copy_other_files"]) == 0
    assert len(os.listdir(out3)) == 5 + 10  # both folders, no companions
    assert group_images.main([str(tmp_path / "none"), str(out3), "2"]) == 1


# ------------------------------------------------------------------ dataset_balancing
def test_dataset_balancing(tmp_path, capsys):
    for name, n in (("5_dog", 4), ("{2}1_cat", 10), ("plain", 2), ("3_empty", 0)):
        (tmp_path / name).mkdir()
        for i in range(n):
            _image(tmp_path / name / f"{i}.png", 4, 4)
    assert dataset_balancing.main([str(tmp_path), "--concept_repeats", "100", "--dry_run"]) == 0
    assert "5_dog -> 25_dog" in capsys.readouterr().out and (tmp_path / "5_dog").exists()
    assert dataset_balancing.main([str(tmp_path), "--concept_repeats", "100"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["20_cat", "25_dog", "3_empty", "plain"]
    assert dataset_balancing.main([str(tmp_path), "--concept_repeats", "10", "--insecure"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["1_cat", "2_dog", "3_empty", "5_plain"]  # round(10 / 4) = 2, as kohya_ss
    assert dataset_balancing.main([str(tmp_path), "--concept_repeats", "0"]) == 1
