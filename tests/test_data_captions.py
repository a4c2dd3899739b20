"""Caption files and the per-draw processing order (sd_scripts.data.captions)."""
import random

import pytest

from sd_scripts.data.captions import CaptionOptions, expand_wildcards, process_caption, read_caption, warmup_tag_count
from sd_scripts.errors import DatasetError


def run(caption, epoch=1, step=0, max_steps=100, seed=0, **opts):
    return process_caption(caption, CaptionOptions(**opts), random.Random(seed), epoch, step, max_steps)


@pytest.mark.parametrize("caption,opts,expected", [
    ("a, b, c", {}, "a, b, c"),  # nothing on: text untouched (no re-join)
    ("a,b ,  c", {}, "a,b ,  c"),
    ("dog", {"prefix": "photo of", "suffix": "best"}, "photo of dog best"),
    ("a,b ,  c", {"keep_tokens": 1, "tag_dropout_rate": 0.0, "token_warmup_step": 0}, "a,b ,  c"),
    ("a, b, c", {"dropout_rate": 1.0}, ""),
    ("a, b, c", {"dropout_every_n_epochs": 1}, ""),
    ("a, b, c", {"tag_dropout_rate": 1.0, "keep_tokens": 1}, "a"),  # kept head survives tag dropout
    # separator absent from the caption: keep_tokens decides the head
    ("a, b, c, d", {"tag_dropout_rate": 1.0, "keep_tokens_separator": "|||", "keep_tokens": 2}, "a, b"),
    ("a, b ||| c, d ||| e", {"tag_dropout_rate": 1.0, "keep_tokens_separator": "|||"}, "a, b, e"),  # fixed tail
    ("a ||| b, c ||| d", {"tag_dropout_rate": 1.0, "keep_tokens_separator": "|||", "keep_tokens": 3}, "a, d"),
    ("a;b, c", {"secondary_separator": ";"}, "a,b, c"),
    ("a,,b, ,c", {"shuffle": True, "keep_tokens": 3}, "a, b, c"),  # empty tags dropped when split
    ("x {{y}}", {"enable_wildcard": True}, "x {y}"),
    ("line one\nline two", {}, "line one"),  # without wildcards only the first line counts
])
def test_process_caption_table(caption, opts, expected):
    assert run(caption, **opts) == expected


def test_every_n_epochs_uses_one_based_epoch():
    assert run("a", epoch=2, dropout_every_n_epochs=2) == ""
    assert run("a", epoch=3, dropout_every_n_epochs=2) == "a"
    assert run("a", epoch=1, dropout_every_n_epochs=2) == "a"


def test_dropout_rate_is_a_probability():
    drops = sum(run("a", seed=s, dropout_rate=0.3) == "" for s in range(2000))
    assert 500 < drops < 700


def test_prefix_suffix_then_dropout_then_split():
    # the prefix becomes part of the first tag, so keep_tokens=1 keeps it with that tag
    for seed in range(10):
        out = run("dog, b, c, d", seed=seed, prefix="photo of", suffix="end", shuffle=True, keep_tokens=1)
        assert out.startswith("photo of dog, ")
        assert sorted(out.split(", ")[1:]) == ["b", "c", "d end"]


def test_shuffle_is_a_seeded_permutation_keeping_the_head():
    tags = [f"t{i}" for i in range(8)]
    outs = {run(", ".join(tags), seed=s, shuffle=True, keep_tokens=2) for s in range(20)}
    assert len(outs) > 10
    for out in outs:
        parts = out.split(", ")
        assert parts[:2] == ["t0", "t1"] and sorted(parts) == sorted(tags)
    assert run(", ".join(tags), seed=5, shuffle=True) == run(", ".join(tags), seed=5, shuffle=True)


def test_keep_tokens_separator_fixed_head_and_tail_with_shuffle():
    for seed in range(10):
        out = run("h1, h2 ||| f1, f2, f3 ||| t1", seed=seed, shuffle=True, keep_tokens_separator="|||",
                  keep_tokens=5)
        parts = out.split(", ")
        assert parts[:2] == ["h1", "h2"] and parts[-1] == "t1" and sorted(parts[2:5]) == ["f1", "f2", "f3"]


def test_tag_dropout_drops_flexible_tags_at_the_rate():
    kept = sum(len(run("k, " + ", ".join("x" * 10), seed=s, tag_dropout_rate=0.25, keep_tokens=1).split(", ")) - 1
               for s in range(200))
    assert 0.70 < kept / 2000 < 0.80


def test_secondary_separator_groups_shuffle_together():
    for seed in range(10):
        out = run("a;;b, c, d", seed=seed, shuffle=True, secondary_separator=";;")
        assert "a,b" in out and sorted(out.replace("a,b", "ab").split(", ")) == ["ab", "c", "d"]


@pytest.mark.parametrize("n,step,warmup,max_steps,minimum,expected", [
    (10, 0, 100, 1000, 1, 1),
    (10, 50, 100, 1000, 1, 5),  # floor(50 * 9 / 100) + 1
    (10, 99, 100, 1000, 1, 9),
    (10, 100, 100, 1000, 1, 10),  # warmup over
    (10, 10, 0.1, 1000, 2, 2),  # fraction: 100 steps; floor(10 * 8 / 100) + 2
    (10, 60, 0.1, 1000, 2, 6),
    (10, 500, 0.1, 1000, 2, 10),
    (3, 0, 100, 1000, 5, 3),  # never more than there are
    (10, 5, 0, 1000, 1, 10),  # warmup off
])
def test_warmup_counts(n, step, warmup, max_steps, minimum, expected):
    opts = CaptionOptions(token_warmup_step=warmup, token_warmup_min=minimum)
    assert warmup_tag_count(n, opts, step, max_steps) == expected


def test_warmup_applies_to_flexible_tags_only():
    out = run("k, a, b, c, d", step=0, max_steps=100, keep_tokens=1, token_warmup_step=10, token_warmup_min=1)
    assert out == "k, a"
    assert run("k, a, b, c, d", step=5, keep_tokens=1, token_warmup_step=10) == "k, a, b"


def test_wildcard_chooses_a_line_and_expands_choices():
    seen = {run("red {cat|dog}\nblue bird", seed=s, enable_wildcard=True, prefix="p") for s in range(50)}
    assert seen == {"p red cat", "p red dog", "p blue bird"}
    assert {expand_wildcards("{a|b|c}", random.Random(s)) for s in range(50)} == {"a", "b", "c"}


def test_read_caption(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    assert read_caption(str(img), ".txt", "sks dog") == "sks dog"  # no caption file: class tokens
    (tmp_path / "a.txt").write_text("\ufefffirst, line\n\nsecond\n", encoding="utf-8")
    assert read_caption(str(img), ".txt", "x") == "first, line"
    assert read_caption(str(img), "txt", "x", enable_wildcard=True) == "first, line\nsecond"


@pytest.mark.parametrize("content,fragment", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"caf\xe9 au lait", "UTF-8"),
])
def test_read_caption_errors_name_the_file(tmp_path, content, fragment):
    (tmp_path / "a.caption").write_bytes(content)
    with pytest.raises(DatasetError) as err:
        read_caption(str(tmp_path / "a.png"), ".caption", "x")
    message = str(err.value)
    assert fragment in message and str(tmp_path / "a.caption") in message and "\n" not in message
