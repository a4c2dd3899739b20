"""GUI start-up and live-view latency.

1. Time from starting `python kohya_gui.py` to its page being served (HTTP 200 on /), next to a bare
   `python -c "import gradio"` (the floor: the GUI cannot start faster than gradio imports). Median of --repeat runs.
2. Delay from a trainer appending a progress event to a job's events.jsonl to headless Chromium showing it in the
   run monitor (needs /usr/bin/chromium and playwright; skipped otherwise).

    .venv/bin/python benchmarks/gui_startup.py [--repeat 3] [--events 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_import_gradio() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gradio"], check=True, cwd=ROOT)
    return time.perf_counter() - start


def start_gui(jobs_dir: str) -> tuple[subprocess.Popen, int, float]:
    """Start the GUI; return (process, port, seconds until / answered 200)."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "kohya_gui.py"), "--server_port", str(port),
                             "--headless", "--jobs_dir", jobs_dir], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc, port, time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if proc.poll() is not None:
            raise RuntimeError("the GUI exited during start-up")
        if time.perf_counter() - start > 120:
            proc.kill()
            raise RuntimeError("the GUI did not start within 120 s")
        time.sleep(0.01)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fake_running_job(jobs_dir: str):
    """A job whose 'trainer' just sleeps: we write its events ourselves."""
    from kohya_gui.command import RunCommand
    from kohya_gui.jobs import JobManager

    def build(kind, values, accel, job_dir, python=sys.executable):
        return RunCommand(argv=[python, "-c", "import time; time.sleep(600)"], toml_text="", toml_path=os.path.join(
            job_dir, "run.toml"), prompts_text=None, prompts_path=None)

    manager = JobManager(jobs_dir, build=build)
    job = manager.create("lora", {}, None, "latency probe")
    manager.start_next()
    return manager, manager.get(job.id)


def event_latency(port: int, jobs_dir: str, count: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    manager, job = fake_running_job(jobs_dir)
    delays = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#run-progress .kg-progress", timeout=60_000)
            with open(job.events_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"type": "start", "time": time.time(), "total_steps": 1000}) + "\n")
            for step in range(1, count + 1):
                time.sleep(0.37)  # land at varied phases of the polling timer
                with open(job.events_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"type": "progress", "time": time.time(), "step": step,
                                        "total_steps": 1000, "loss": 0.1}) + "\n")
                written = time.perf_counter()
                page.wait_for_function(
                    "s => (document.querySelector('#run-progress .kg-progress-text') || {}).textContent"
                    "?.startsWith(s)", arg=f"step {step} / 1000", timeout=30_000, polling=10)
                delays.append(time.perf_counter() - written)
            browser.close()
    finally:
        manager.kill(job.id)
    return delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--events", type=int, default=10)
    args = parser.parse_args()
    time_import_gradio()  # warm the file cache for both measurements
    bare = [time_import_gradio() for _ in range(args.repeat)]
    served = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            proc, port, seconds = start_gui(os.path.join(tmp, f"jobs{i}"))
            served.append(seconds)
            stop(proc)
        print(f"import gradio (bare python):   median {statistics.median(bare):.2f} s  runs {_fmt(bare)}")
        print(f"kohya_gui.py -> page served:   median {statistics.median(served):.2f} s  runs {_fmt(served)}")
        print(f"ratio: {statistics.median(served) / statistics.median(bare):.2f}x (target <= 1.3x)")
        if not os.path.exists("/usr/bin/chromium") or shutil.which("chromium") is None:
            print("event -> browser latency: skipped (no chromium)")
            return 0
        jobs_dir = os.path.join(tmp, "latency-jobs")
        proc, port, _ = start_gui(jobs_dir)
        try:
            delays = event_latency(port, jobs_dir, args.events)
        finally:
            stop(proc)
        print(f"event appended -> shown in browser: median {statistics.median(delays) * 1000:.0f} ms, "
              f"max {max(delays) * 1000:.0f} ms over {len(delays)} events")
    return 0


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
