"""Captioning tools on tiny models built on the fly: the WD14 tagger (an ONNX graph written with onnx's helper API),
BLIP, GIT and Florence-2 (tiny random transformers models from configs). Files are checked, not the words."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from sd_scripts.finetune import tag_images_by_wd14_tagger as wd14

# ------------------------------------------------------------------ WD14 tagger
# (name, category, weight on the B, G, R means of the image in 0..1, bias): logits -> sigmoid in the graph
TAGS = [
    ("general", "9", (0, 0, 0), 1.0), ("sensitive", "9", (0, 0, 0), -1.0),
    ("questionable", "9", (0, 0, 0), -2.0), ("explicit", "9", (0, 0, 0), -3.0),
    ("red_thing", "0", (0, 0, 10), -5.0), ("blue_thing", "0", (10, 0, 0), -5.0),
    ("always_on", "0", (0, 0, 0), 3.0), ("medium_tag", "0", (0, 0, 0), 0.0), ("^_^", "0", (0, 0, 0), 3.0),
    ("hero_(series)", "4", (0, 0, 0), 0.2),
]


def write_tagger(folder, size: int = 16, batch: int | str = "N", sub: str | None = None):
    """A tagger with WD14's interface: NHWC BGR 0..255 in, one sigmoid confidence per selected_tags.csv row out."""
    import onnx
    from onnx import TensorProto, helper

    os.makedirs(folder, exist_ok=True)
    w = np.array([t[2] for t in TAGS], np.float32).T / 255.0  # [3, T], on 0..255 means
    b = np.array([t[3] for t in TAGS], np.float32)
    nodes = [helper.make_node("ReduceMean", ["input_1", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])]
    nodes.append(helper.make_node("Identity" if sub else "Sigmoid", ["logits"], ["predictions_sigmoid"]))
    shape = [batch, 3, size, size] if sub else [batch, size, size, 3]
    axes = [2, 3] if sub else [1, 2]
    graph = helper.make_graph(
        nodes, "tiny_tagger", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], axes),
                     onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if sub:  # tag_mapping.json layout: NCHW in -1..1 (means then are 2x/255 - 1: shift the bias back)
        onnx.save(model, os.path.join(folder, "model_optimized.onnx"))
        mapping = {str(i): {"tag": name, "category": {"9": "Rating", "0": "General", "4": "Character"}[cat]}
                   for i, (name, cat, _w, _b) in enumerate(TAGS)}
        with open(os.path.join(folder, "tag_mapping.json"), "w") as f:
            json.dump(mapping, f)
        return
    onnx.save(model, os.path.join(folder, "model.onnx"))
    with open(os.path.join(folder, "selected_tags.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, _w, _b) in enumerate(TAGS):
            writer.writerow([i, name, cat, 100])


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (24, 24), (0, 0, 255)).save(folder / "blue.jpg")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(folder / "clear.png")  # transparent: white once composited
    Image.new("RGB", (20, 20), (255, 0, 0)).save(folder / "sub" / "deep.png")
    return folder


@pytest.fixture
def model_dir(tmp_path):
    write_tagger(tmp_path / "models" / "me_tiny-tagger")
    return str(tmp_path / "models")


def _tags(path) -> str:
    return open(path, encoding="utf-8").read()


def test_wd14_thresholds_and_files(images, model_dir, tmp_path):
    base = [str(images), "--repo_id", "me/tiny-tagger", "--model_dir", model_dir]
    assert wd14.main([*base, "--batch_size", "2"]) == 0
    assert _tags(images / "red.txt") == "red_thing, always_on, medium_tag, ^_^, hero_(series)\n"
    assert _tags(images / "blue.txt") == "blue_thing, always_on, medium_tag, ^_^, hero_(series)\n"
    assert _tags(images / "clear.txt").startswith("red_thing, blue_thing")  # composited on white: every channel
    assert not (images / "sub" / "deep.txt").exists()
    assert wd14.main([*base, "--recursive", "--thresh", "0.6", "--caption_extension", ".tags"]) == 0
    assert _tags(images / "sub" / "deep.tags") == "red_thing, always_on, ^_^\n"
    assert wd14.main([*base, "--general_threshold", "0.995", "--character_threshold", "0.5",
                      "--caption_extention", ".c2"]) == 0
    assert _tags(images / "red.c2") == "hero_(series)\n"
    assert wd14.main([*base, "--character_threshold", "1.1", "--general_threshold", "0.4",
                      "--caption_extension", ".c3", "--undesired_tags", "medium_tag, ^_^"]) == 0
    assert _tags(images / "red.c3") == "red_thing, always_on\n"


def test_wd14_tag_processing(images, model_dir, tmp_path, capsys):
    base = [str(images), "--repo_id", "me/tiny-tagger", "--model_dir", model_dir, "--caption_extension", ".t"]
    assert wd14.main([*base, "--remove_underscore", "--character_tag_expand", "--character_tags_first",
                      "--use_rating_tags", "--tag_replacement", "always on,ALWAYS;blue thing,azure",
                      "--caption_separator", "|", "--always_first_tags", "medium tag"]) == 0
    assert _tags(images / "red.t") == "medium tag|general|hero|series|red thing|ALWAYS|^_^\n"
    assert _tags(images / "blue.t").startswith("medium tag|general|hero|series|azure|")
    assert wd14.main([*base, "--use_rating_tags_as_last_tag", "--undesired_tags", "medium_tag,^_^,hero_(series)",
                      "--frequency_tags"]) == 0
    assert _tags(images / "red.t") == "red_thing, always_on, general\n"
    assert "always_on: 3" in capsys.readouterr().out
    (images / "red.t").write_text("mine, always_on\n")
    assert wd14.main([*base, "--append_tags", "--undesired_tags", "medium_tag,^_^,hero_(series)"]) == 0
    assert _tags(images / "red.t") == "mine, always_on, red_thing\n"
    out = tmp_path / "tags.json"
    assert wd14.main([*base, "--output_path", str(out), "--caption_extension", ".none"]) == 0
    data = json.loads(out.read_text())
    assert data[str(images / "blue.jpg")]["image_size"] == [24, 24] and not (images / "red.none").exists()
    out = tmp_path / "tags.jsonl"
    assert wd14.main([*base, "--output_path", str(out), "--max_data_loader_n_workers", "2", "--debug"]) == 0
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(lines) == 3 and {"image_path", "caption", "image_size"} <= set(lines[0])


def test_wd14_model_layouts_and_errors(images, tmp_path, capsys):
    # a fixed batch of 2 for 3 images (padded), and the tag_mapping.json layout (owner/name/sub)
    write_tagger(tmp_path / "m" / "me_fixed", batch=2)
    assert wd14.main([str(images), "--repo_id", "me/fixed", "--model_dir", str(tmp_path / "m")]) == 0
    assert _tags(images / "red.txt").startswith("red_thing, always_on")
    write_tagger(tmp_path / "m" / "me_cl" / "v1", sub="v1")
    assert wd14.main([str(images), "--repo_id", "me/cl/v1", "--model_dir", str(tmp_path / "m"),
                      "--caption_extension", ".cl", "--use_rating_tags", "--onnx"]) == 0
    assert _tags(images / "blue.cl").startswith("general, ")
    assert wd14.main([str(images), "--repo_id", "nobody/none", "--model_dir", str(tmp_path / "m")]) == 1
    assert wd14.main([str(images), "--repo_id", "me/fixed", "--model_dir", str(tmp_path / "m"),
                      "--force_download"]) == 1
    assert wd14.main([str(images), "--repo_id", "me/fixed", "--model_dir", str(tmp_path / "m"),
                      "--tag_replacement", "a,b,c"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 3 and "nobody/none" in err[0] and "me_fixed" not in err[0] and "download" in err[1]
