"""Tests for sd_scripts.training.events: the JSON-lines event stream."""
import json
import math
import time

import numpy as np
import pytest
import torch

from sd_scripts.training.events import EventWriter, read_events, tail_events


def test_each_event_is_one_json_line_with_type_and_time(tmp_path):
    path = tmp_path / "job" / "events.jsonl"  # the folder is created
    before = time.time()
    w = EventWriter(str(path))
    w.start(images=10, total_steps=20, family="sd1")
    w.progress(step=1, total_steps=20, epoch=1, total_epochs=2, loss=0.5, avg_loss=0.25, lr=1e-4, it_per_s=2.0,
               eta_s=9.5)
    w.sample(step=5, epoch=1, paths=["a.png"], prompts=["a dog"])
    w.save(path="out.safetensors", kind="final", step=20)
    w.validation(step=5, loss=0.1)
    w.warning("low memory", hint="use a smaller batch")
    w.error("bad", hint="fix it")
    w.done("completed", outputs=["out.safetensors"], steps=20)
    lines = path.read_text(encoding="utf-8").splitlines()  # flushed per line, before close
    assert len(lines) == 8
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events] == ["start", "progress", "sample", "save", "validation", "warning", "error",
                                           "done"]
    assert all(before <= e["time"] <= time.time() for e in events)
    assert events[0] == {"type": "start", "time": events[0]["time"], "images": 10, "total_steps": 20, "family": "sd1"}
    assert events[1]["eta_s"] == 9.5 and events[1]["lr"] == 1e-4 and events[1]["avg_loss"] == 0.25
    assert events[2]["paths"] == ["a.png"] and events[2]["prompts"] == ["a dog"] and events[2]["epoch"] == 1
    assert events[3] == {"type": "save", "time": events[3]["time"], "path": "out.safetensors", "kind": "final",
                         "step": 20}
    assert events[5]["message"] == "low memory" and events[5]["hint"] == "use a smaller batch"
    assert events[7]["status"] == "completed" and events[7]["outputs"] == ["out.safetensors"]
    w.close()
    w.progress(2, 20, 1, 2, 0.1, 0.1, 1e-4, 1.0, 1.0)  # after close: ignored
    assert len(read_events(path)) == 8


def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.emit("a")
    with EventWriter(path) as w:
        w.emit("b", x=1)
    assert [e["type"] for e in read_events(path)] == ["a", "b"]


def test_non_finite_floats_tensors_and_numpy_become_plain_json(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.progress(step=np.int64(3), total_steps=10, epoch=1, total_epochs=1, loss=float("nan"),
                   avg_loss=torch.tensor(float("inf")), lr=np.float32(0.5), it_per_s=torch.tensor(2.0), eta_s=None)
        w.emit("x", values=[1.0, -math.inf, {"k": float("nan")}])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    progress, x = read_events(path)
    assert progress["step"] == 3 and progress["loss"] is None and progress["avg_loss"] is None
    assert progress["lr"] == 0.5 and progress["it_per_s"] == 2.0 and progress["eta_s"] is None
    assert x["values"] == [1.0, None, {"k": None}]


def test_disabled_writer_writes_nothing(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(str(path), enabled=False)
    w.start(a=1)
    w.done("failed")
    w.close()
    assert not path.exists()
    EventWriter(None).progress(1, 2, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1)  # no file, no error


def test_done_rejects_unknown_status(tmp_path):
    with EventWriter(tmp_path / "e.jsonl") as w, pytest.raises(ValueError, match="completed"):
        w.done("finished")


def test_read_events_tolerates_partial_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "start", "time": 1}\n{"type": "progress", "time": 2, "step": 1}\n{"type": "prog',
                    encoding="utf-8")
    assert [e["type"] for e in read_events(path)] == ["start", "progress"]
    assert read_events(tmp_path / "missing.jsonl") == []


def test_tail_events_follows_a_growing_file(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"type": "a", "time": 1}\n{"type": "b", "ti')
    events, offset = tail_events(path)
    assert [e["type"] for e in events] == ["a"]
    assert offset == len(b'{"type": "a", "time": 1}\n')
    with open(path, "ab") as f:
        f.write(b'me": 2}\n{"type": "c", "time": 3}\n')
    events, offset2 = tail_events(path, offset)
    assert [e["type"] for e in events] == ["b", "c"]
    assert offset2 == path.stat().st_size
    assert tail_events(path, offset2) == ([], offset2)
    path.write_bytes(b'{"type": "new", "time": 1}\n')  # replaced by a shorter file: start again
    assert [e["type"] for e in tail_events(path, offset2)[0]] == ["new"]
