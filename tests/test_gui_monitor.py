"""kohya_gui.monitor: incremental event reading, the run view, log tails."""
import json

from kohya_gui import monitor
from kohya_gui.monitor import EventTail, RunView, read_log_tail, update


def _line(**kw):
    return (json.dumps(kw) + "\n").encode()


def test_event_tail_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []  # no file yet
    with open(path, "ab") as f:
        f.write(_line(type="start", total_steps=10))
        f.write(b'{"type": "progress", "st')  # being written
    assert [e["type"] for e in tail.read()] == ["start"]
    with open(path, "ab") as f:
        f.write(b'ep": 1, "loss": 0.5}\n')
        f.write(b"not json\n")
        f.write(_line(type="progress", step=2, loss=0.25))
    assert [e.get("step") for e in tail.read()] == [1, 2]
    assert tail.read() == []
    path.write_bytes(_line(type="done", status="completed"))  # replaced by a shorter file
    assert [e["type"] for e in tail.read()] == ["done"]


def test_run_view_from_every_event_type():
    events = [
        dict(type="start", total_steps=4, total_epochs=2, images=3),
        dict(type="progress", step=1, total_steps=4, epoch=1, total_epochs=2, loss=1.0, avg_loss=1.0, lr=1e-4,
             it_per_s=2.0, eta_s=1.5),
        dict(type="progress", step=2, total_steps=4, epoch=1, total_epochs=2, loss=None, avg_loss=1.0, lr=1e-4,
             it_per_s=2.0, eta_s=1.0),  # NaN loss arrives as null
        dict(type="progress", step=3, total_steps=4, epoch=2, total_epochs=2, loss=0.0, avg_loss=0.5, lr=1e-4,
             it_per_s=2.0, eta_s=3725),
        dict(type="sample", step=3, epoch=2, paths=["a.png", "b.png"], prompts=["a dog"]),
        dict(type="save", path="m-000001.safetensors", kind="epoch"),
        dict(type="validation", step=3, loss=0.4),
        dict(type="warning", message="low disk", hint="free some space"),
        dict(type="error", message="out of memory", hint="lower batch size"),
        dict(type="done", status="failed", outputs=["m-000001.safetensors"]),
        dict(type="mystery"),
    ]
    view = update(RunView(), events)
    assert (view.status, view.step, view.total_steps, view.epoch, view.total_epochs) == ("running", 3, 4, 2, 2)
    assert view.loss_points == [(1, 1.0), (3, 0.0)]
    assert view.smoothed[0] == (1, 1.0) and abs(view.smoothed[1][1] - 0.9) < 1e-9
    assert view.samples == [(3, "a.png", "a dog"), (3, "b.png", "")]
    assert view.saves == [("epoch", "m-000001.safetensors")]
    assert view.warnings == ["low disk (free some space)"] and view.validations[0]["loss"] == 0.4
    assert (view.error_message, view.error_hint, view.done_status) == ("out of memory", "lower batch size", "failed")
    assert view.outputs == ["m-000001.safetensors"] and view.start["images"] == 3
    assert view.fraction == 0.75 and view.eta_text == "1h 02m 05s"
    assert monitor.format_duration(65) == "1m 05s" and monitor.format_duration(None) == ""


def test_log_tail_collapses_tqdm_updates_and_limits_lines(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "steps: 1%\rsteps: 50%\rsteps: 100%\n")
    tail = read_log_tail(log, n_lines=3)
    assert tail.splitlines() == ["line 98", "line 99", "steps: 100%"]
    assert read_log_tail(tmp_path / "missing.txt") == ""


def test_validation_loss_is_its_own_line_of_the_loss_chart():
    from kohya_gui.tabs import render
    from kohya_gui.tabs.run_monitor import RunMonitor

    events = [
        dict(type="progress", step=1, total_steps=4, loss=1.0),
        dict(type="validation", kind="step", step=1, epoch=1, loss=0.8, divergence=-0.2),
        dict(type="progress", step=2, total_steps=4, loss=0.5),
        dict(type="validation", kind="step", step=2, epoch=1, loss=0.7),
        dict(type="validation", kind="epoch", step=2, epoch=1, loss=0.7),  # same weights: the same point
        dict(type="validation", kind="step", step=3, epoch=2, loss=None),  # NaN arrives as null: no point
    ]
    view = update(RunView(), events)
    assert view.validation_points == [(1, 0.8), (2, 0.7)] and len(view.validations) == 4
    rows = render.loss_rows(view)
    assert [r for r in rows if r[2] == "validation"] == [(1, 0.8, "validation"), (2, 0.7, "validation")]
    assert {r[2] for r in rows} == {"loss", "smoothed", "validation"}
    frame = RunMonitor._plot_value(view)
    assert sorted(set(frame["series"])) == ["loss", "smoothed", "validation"]
    assert frame[frame["series"] == "validation"]["loss"].tolist() == [0.8, 0.7]
    # the monitor redraws the chart when only a validation point arrived
    from types import SimpleNamespace

    class Ctx:
        def job_to_show(self, watched):
            return SimpleNamespace(id="j", name="run", kind="lora", status="running", job_dir="/j")

        def view(self, job):
            return shown

        def log_tail(self, job, lines):
            return ""

        def output_dir(self, job):
            return None

        def gallery(self, job, items):
            return items

    monitor_self = SimpleNamespace(ctx=Ctx(), PARTS=RunMonitor.PARTS, _plot_value=RunMonitor._plot_value,
                                   _interval=RunMonitor._interval)
    shown = update(RunView(), events[:3])
    *_, signature, _timer = RunMonitor.tick(monitor_self, None, {})
    shown = update(RunView(), events[:4])
    out = RunMonitor.tick(monitor_self, None, signature)
    plot = out[RunMonitor.PARTS.index("plot")]
    assert plot["series"].tolist().count("validation") == 2


def test_the_monitor_ticks_fast_only_while_the_shown_job_lives():
    """Each tick costs the browser work in proportion to the page: the timer runs at TICK_S while the shown job is
    queued or running, at IDLE_TICK_S otherwise, and is only updated when that changes."""
    import gradio as gr
    from types import SimpleNamespace

    from kohya_gui.tabs.run_monitor import IDLE_TICK_S, TICK_S, RunMonitor

    assert TICK_S < IDLE_TICK_S
    job = SimpleNamespace(id="j", name="run", kind="lora", status="queued", job_dir="/j")
    shown = {"job": job}

    class Ctx:
        def job_to_show(self, watched):
            return shown["job"]

        def view(self, job):
            return RunView()

        def log_tail(self, job, lines):
            return ""

        def output_dir(self, job):
            return None

        def gallery(self, job, items):
            return items

    monitor_self = SimpleNamespace(ctx=Ctx(), PARTS=RunMonitor.PARTS, _plot_value=RunMonitor._plot_value,
                                   _interval=RunMonitor._interval)

    def tick(signature):
        *_, signature, timer = RunMonitor.tick(monitor_self, None, signature)
        return signature, (None if isinstance(timer, type(gr.skip())) else timer.value)

    signature, interval = tick({})  # the page starts idle-slow: a queued job speeds it up
    assert interval == TICK_S
    job.status = "running"
    signature, interval = tick(signature)
    assert interval is None  # unchanged: no update sent
    job.status = "completed"
    signature, interval = tick(signature)
    assert interval == IDLE_TICK_S
    signature, interval = tick(signature)
    assert interval is None
    shown["job"] = None
    signature, interval = tick(signature)
    assert interval is None and signature["interval"] == IDLE_TICK_S
