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


def test_wd14_tag_processing(images, model_dir, tmp_path, capsys, caplog):
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
    import logging

    with caplog.at_level(logging.INFO):
        assert wd14.main([*base, "--output_path", str(out), "--max_data_loader_n_workers", "2", "--debug"]) == 0
    assert "General tags: red_thing" in caplog.text and "Character tags: hero_(series)" in caplog.text
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


# ------------------------------------------------------------------ BLIP, GIT, Florence-2
WORDS = ["a", "photo", "of", "dog", "cat", "red", "blue", "with", "the", "words", "sign", "that", "says"]


def _bert_tokenizer(folder):
    from transformers import BertTokenizer

    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(path)


VISION = dict(hidden_size=16, image_size=32, patch_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32)
TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def captioners(tmp_path_factory):
    """Tiny random BLIP, GIT and Florence-2 models with their processors, saved as transformers folders."""
    import torch
    from transformers import (BartTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, GitConfig, GitForCausalLM, GitProcessor)

    root = tmp_path_factory.mktemp("captioners")
    tok = _bert_tokenizer(root)
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), bos_token_id=2, pad_token_id=0, eos_token_id=3)
    blip = BlipForConditionalGeneration(BlipConfig(text_config={**TEXT, **ids, "sep_token_id": 3},
                                                   vision_config=VISION))
    for obj in (blip, BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                                    tokenizer=tok)):
        obj.save_pretrained(root / "blip")
    git = GitForCausalLM(GitConfig(vision_config=VISION, **TEXT, **ids))
    clip_ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for obj in (git, GitProcessor(image_processor=clip_ip, tokenizer=tok)):
        obj.save_pretrained(root / "git")
    # Florence-2: a BART tokenizer with the image token, a 2-stage DaViT (32 px -> 4x4 tokens + 1)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in sorted(set("".join(WORDS) + "WhatdoesimgcrbDESCRIPTION?<>_Ġ")) + ["Ġ" + w for w in WORDS]:
        vocab.setdefault(piece, len(vocab))
    vocab["<image>"] = len(vocab)
    (root / "bart").mkdir()
    with open(root / "bart" / "vocab.json", "w") as f:
        json.dump(vocab, f)
    (root / "bart" / "merges.txt").write_text("#version: 0.2\n")
    bart = BartTokenizer(str(root / "bart" / "vocab.json"), str(root / "bart" / "merges.txt"),
                         extra_special_tokens={"image_token": "<image>"})
    florence = Florence2ForConditionalGeneration(Florence2Config(
        vision_config=dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                           patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(2, 2), num_groups=(2, 2),
                           window_size=2, projection_dim=32, drop_path_rate=0.0, max_position_embeddings=16),
        text_config=dict(model_type="bart", vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                         decoder_ffn_dim=32, max_position_embeddings=128, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0),
        image_token_id=bart.image_token_id))
    florence_ip = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=17)
    for obj in (florence, Florence2Processor(image_processor=florence_ip, tokenizer=bart)):
        obj.save_pretrained(root / "florence")
    return {name: str(root / name) for name in ("blip", "git", "florence")}


@pytest.fixture
def photos(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGBA", (30, 40), (10, 10, 200, 128)).save(tmp_path / "b.webp")
    Image.new("RGB", (20, 20), (0, 200, 0)).save(tmp_path / "sub" / "c.jpg")
    return tmp_path


def _captions(folder, ext, recursive=False):
    pattern = f"**/*{ext}" if recursive else f"*{ext}"
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.glob(pattern))}


def test_blip_captions(captioners, photos):
    from sd_scripts.finetune import make_captions

    base = [str(photos), "--caption_weights", captioners["blip"], "--max_length", "6", "--min_length", "2"]
    assert make_captions.main([*base, "--seed", "1", "--batch_size", "2", "--recursive"]) == 0
    first = _captions(photos, ".caption", recursive=True)
    assert set(first) == {"a.caption", "b.caption", "sub/c.caption"}
    assert all(t.endswith("\n") and len(t.split()) <= 5 for t in first.values())
    assert make_captions.main([*base, "--seed", "1", "--caption_extention", ".again", "--recursive",
                               "--batch_size", "2", "--max_data_loader_n_workers", "2"]) == 0
    assert list(_captions(photos, ".again", recursive=True).values()) == list(first.values())  # seeded sampling
    assert make_captions.main([*base, "--beam_search", "--num_beams", "2", "--top_p", "0.5",
                               "--caption_extension", ".beam"]) == 0
    beams = _captions(photos, ".beam")
    assert set(beams) == {"a.beam", "b.beam"}  # not recursive: sub/ is left out
    assert make_captions.main([*base, "--beam_search", "--num_beams", "2", "--caption_extension", ".beam2",
                               "--seed", "7"]) == 0
    assert list(_captions(photos, ".beam2").values()) == list(beams.values())  # beam search does not sample


def test_git_and_florence_captions(captioners, photos, monkeypatch, caplog):
    import logging

    from sd_scripts.finetune import make_captions_by_florence2, make_captions_by_git

    with caplog.at_level(logging.INFO):
        assert make_captions_by_git.main([str(photos), "--model_id", captioners["git"], "--max_length", "5",
                                          "--batch_size", "3", "--recursive", "--debug"]) == 0
    assert f"{photos / 'a.png'}: " in caplog.text  # --debug logs each caption
    git = _captions(photos, ".caption", recursive=True)
    assert len(git) == 3 and all(0 < len(t.split()) <= 4 for t in git.values())
    assert make_captions_by_git.remove_text_phrases('a man holding a sign that says "hi there" on it') == \
        "a man holding a sign"
    seen = []
    monkeypatch.setattr(make_captions_by_git, "caption_images", lambda args, gen, post=None: seen.append(post))
    make_captions_by_git.main([str(photos), "--model_id", captioners["git"], "--remove_words"])
    assert seen == [make_captions_by_git.remove_text_phrases]
    assert make_captions_by_florence2.main([str(photos), "--model_id", captioners["florence"], "--task", "<CAPTION>",
                                            "--num_beams", "1", "--max_new_tokens", "4", "--prefix", "sks",
                                            "--postfix", "style"]) == 0
    florence = _captions(photos, ".txt")
    assert set(florence) == {"a.txt", "b.txt"}
    assert all(t.startswith("sks") and t.endswith("style\n") for t in florence.values())


def test_captioner_errors(captioners, photos, capsys):
    import torch

    from sd_scripts.finetune import make_captions, make_captions_by_git

    if not torch.cuda.is_available():  # --device reaches the model: a GPU asked for on a machine without one
        assert make_captions_by_git.main([str(photos), "--model_id", captioners["git"], "--device", "cuda"]) == 1
        assert "--device cuda" in capsys.readouterr().err

    assert make_captions.main([str(photos), "--caption_weights", str(photos / "none")]) == 1
    assert make_captions.main([str(photos), "--caption_weights", "model_large_caption.pth"]) == 1
    assert make_captions_by_git.main([str(photos / "empty"), "--model_id", captioners["git"]]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 3 and "none" in err[0] and "Salesforce" in err[1] and "empty" in err[2]


def test_wd14_model_from_the_hugging_face_cache(images, tmp_path, monkeypatch):
    """No local folder: the repository's files are taken from the user's Hugging Face cache (offline)."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hub"
    snapshot = cache / "models--owner--cached-tagger" / "snapshots" / ("0" * 40)
    write_tagger(snapshot)
    (cache / "models--owner--cached-tagger" / "refs").mkdir()
    (cache / "models--owner--cached-tagger" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert wd14.main([str(images), "--repo_id", "owner/cached-tagger", "--model_dir", str(tmp_path / "none"),
                      "--caption_extension", ".hub"]) == 0
    assert _tags(images / "red.hub").startswith("red_thing, always_on")
