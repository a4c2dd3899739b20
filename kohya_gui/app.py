"""Assembles the GUI: training tabs, Utilities and Jobs on the left, the run monitor on the right.

`AppContext` is the one object the tabs talk to: it owns the JobManager (ticked by a background thread, so queued
runs start and finished ones settle even when no browser is open), the TensorBoard process, the config.toml defaults,
presets, and the per-job incremental readers of events.jsonl. Tabs never touch the backend modules directly.
"""
from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from kohya_gui import monitor, net_guard
from kohya_gui.command import ACCEL_PREFIX, AccelerateSettings
from kohya_gui.components.defaults import FAMILY_DEPENDENT
from kohya_gui.components.form import FAMILY_KEY
from kohya_gui.file_browser import FileBrowser
from kohya_gui.gui_config import GuiConfig
from kohya_gui.job_files import JobsDirError
from kohya_gui.jobs import FINAL_STATUSES, Job, JobError, JobManager
from kohya_gui.tensorboard import TensorBoard
from kohya_gui.tool_command import is_tool_kind
from sd_scripts.options import GROUPS

TICK_S = 0.5
ASSETS = Path(__file__).resolve().parent / "assets"


class AppContext:
    """Shared state of one GUI process (all browser sessions see the same jobs)."""

    def __init__(self, jobs_dir: str, config: GuiConfig | None = None, python: str | None = None):
        self.config = config or GuiConfig()
        python = python or str(self.config.gui("python") or "") or sys.executable
        self.jobs = JobManager(jobs_dir, python=python, grace_s=float(self.config.gui("stop_grace_s")))
        self.jobs_dir = self.jobs.jobs_dir
        self.tensorboard = TensorBoard()
        roots = self.config.gui("browse_roots")
        self.browser = FileBrowser(roots if isinstance(roots, list) else None)
        if not isinstance(roots, list):
            self.config.problems.append("[gui] browse_roots must be a list of folders; using your home folder")
        self.config_warnings = list(self.config.problems)
        self._views: dict[str, tuple[monitor.EventTail, monitor.RunView]] = {}
        self._logs: dict[str, tuple[tuple, str]] = {}
        self._lock = threading.RLock()
        self._gallery_dir = tempfile.mkdtemp(prefix="kohya_gui_gallery_")
        self._stop_ticker = threading.Event()
        self._ticker: threading.Thread | None = None

    # ---- config.toml
    def initial_values(self, kind: str) -> dict[str, Any]:
        """A training tab's starting values: config.toml's defaults for the kind, its accelerate settings.

        Family-dependent defaults (learning rate, resolution) are left to the form's family table unless the user
        set them in config.toml.
        """
        values = self.config.defaults_for(kind)
        explicit: set[str] = set()
        for section in (*GROUPS, kind):
            explicit.update(self.config.values.get(section, {}))
        for name in FAMILY_DEPENDENT:
            if name not in explicit:
                values.pop(name, None)
        accel = self.config.accelerate().to_dict()
        values.update({ACCEL_PREFIX + k: v for k, v in accel.items()})
        return values

    # ---- presets
    def _gui_path(self, key: str) -> str | None:
        """A [gui] folder only when config.toml sets it (else the presets module's own default/env applies)."""
        return self.config.path_setting(key) if key in self.config.values.get("gui", {}) else None

    def preset_names(self, kind: str) -> list[str]:
        """Presets of `kind`; [] when they cannot be listed (a page must still load; loading one says why)."""
        try:
            from kohya_gui.presets import list_presets

            return list(list_presets(kind, user_dir=self._gui_path("user_presets_dir")))
        except (ImportError, OSError, ValueError) as e:
            print(f"kohya_gui: cannot list presets: {e}", file=sys.stderr)
            return []

    def load_preset(self, kind: str, name: str) -> tuple[dict[str, Any], list[str]]:
        """(values, notes): the preset's full values, with the model family it is for, and what the loader noticed
        (unknown keys, the demo model being made)."""
        from kohya_gui.presets import load_preset

        values = load_preset(kind, name, user_dir=self._gui_path("user_presets_dir"),
                             demo_dir=self._gui_path("demo_dir"))
        notes = [f"unknown key ignored: {k}" for k in getattr(values, "unknown_keys", [])]
        notes += list(getattr(values, "notes", []))
        values = dict(values)
        values.setdefault(FAMILY_KEY, guess_family(values))
        return values, notes

    def save_preset(self, kind: str, name: str, values: dict[str, Any]) -> str:
        from kohya_gui.presets import save_preset

        return save_preset(kind, name, values, user_dir=self._gui_path("user_presets_dir"))

    def import_kohya(self, kind: str, path: str) -> tuple[dict[str, Any], list[str]]:
        """(values, notes) of a kohya_ss GUI JSON file; notes name the keys that could not be imported."""
        from kohya_gui.presets import import_kohya_json

        values, unknown = import_kohya_json(path, kind)
        values = dict(values)
        if values.get(FAMILY_KEY) is None:
            values[FAMILY_KEY] = guess_family(values, _kohya_config(path))
        return values, [f"not imported: {k}" for k in unknown]

    # ---- launching
    def preflight(self, kind: str, values: dict[str, Any], accel: AccelerateSettings, family: str) -> list:
        """Pre-flight checks, plus a warning when the model file is of another family than the one selected."""
        from kohya_gui.preflight import Check, detect_family, run_preflight

        detected = detect_family(values.get("pretrained_model_name_or_path"))
        # the model file's family when it tells, else the selector's
        checks = list(run_preflight(kind, values, accel, python=self.jobs.python,
                                    family=None if detected else family))
        if detected and detected != family:
            checks.append(Check("warning", "model_family",
                                f"the model file looks like {detected} but the Model family selector says {family}: "
                                f"choose {detected} to see its options and defaults"))
        return checks

    def preview_job_dir(self) -> str:
        """Where a job started now would live (for 'Print command')."""
        return os.path.join(self.jobs_dir, "<new-job>")

    def busy(self) -> bool:
        return self.jobs.running() is not None

    def create_job(self, kind: str, values: dict[str, Any], accel: AccelerateSettings, name: str) -> Job:
        job = self.jobs.create(kind, values, accel, name)
        self.jobs.start_next()
        return self.jobs.get(job.id) or job

    def create_tool_job(self, name: str, values: dict[str, Any]) -> Job:
        """Queue a run of tool `name` (sd_scripts.tools.registry) with its form values and start the queue. Every path
        value must lie inside the file browser's roots, inputs must exist and outputs' folders be writable
        (CommandError naming the field otherwise)."""
        from kohya_gui.tool_command import normalize_tool_values, path_problems, tool_kind
        from sd_scripts.tools.registry import tool_entry

        checked = normalize_tool_values(name, values, resolve=self.browser.resolve)
        problems = path_problems(name, checked)
        if problems:
            raise problems[0]
        job = self.jobs.create(tool_kind(name), checked, None, tool_entry(name).title)
        self.jobs.start_next()
        return self.jobs.get(job.id) or job

    def tool_results(self) -> list[str]:
        """The files finished tool jobs wrote that still exist, newest first (to use as a training tab's input)."""
        out: list[str] = []
        for job in self.jobs.list():
            if is_tool_kind(job.kind) and job.status == "completed":
                out += [p for p in job.outputs if p not in out and os.path.isfile(p)]
        return out

    def control(self, job_id: str | None, what: str) -> str:
        """Stop / save now / sample now for the watched job (or the running one)."""
        job = self.jobs.get(job_id) if job_id else None
        if job is None or job.status != "running":
            job = self.jobs.running()
        if job is None:
            return "No run is in progress."
        try:
            if what == "stop":
                self.jobs.stop(job.id, use_signal=False)
                return f"Asked job `{job.id}` to stop: it finishes its step, saves and ends."
            self.jobs.request(job.id, what)
        except JobError as e:
            return f"**Not done:** {e}"
        return f"Asked job `{job.id}` to {what} now."

    # ---- TensorBoard
    def toggle_tensorboard(self, logdir: str | None) -> str:
        if self.tensorboard.running():
            self.tensorboard.stop()
            return "TensorBoard stopped."
        try:
            url = self.tensorboard.start(logdir or "")
        except (OSError, ValueError) as e:
            return f"**TensorBoard not started:** {e}"
        return (f"TensorBoard runs on [{url}]({url}) (this machine only; press the button again to stop it; "
                f"remote users see the scalars under *TensorBoard scalars* in the run monitor). "
                f"Logs: `{self.tensorboard.logdir}`")

    # ---- remote use: uploads and TensorBoard scalars
    def extract_upload(self, zip_path: str, folder: str | None) -> str:
        """Extract an uploaded dataset zip into a new folder inside `folder` (checked against the browse roots)."""
        from kohya_gui.uploads import extract_dataset_zip

        limit = self.config.gui("max_upload_mb")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 4096
        return extract_dataset_zip(zip_path, folder or self.browser.home, self.browser, max_bytes=limit << 20)

    def scalars(self, job: Job) -> dict[str, list[tuple[int, float]]]:
        """TensorBoard scalars of the job (from its logging_dir), for the GUI's own chart."""
        from kohya_gui.tb_scalars import read_scalars

        logdir = job.values.get("logging_dir")
        return read_scalars(logdir) if isinstance(logdir, str) and logdir else {}

    # ---- watching jobs
    def job_to_show(self, job_id: str | None) -> Job | None:
        """The watched job; without one, the running job or else the newest."""
        if job_id:
            job = self.jobs.get(job_id)
            if job is not None:
                return job
        return self.jobs.running() or next(iter(self.jobs.list()), None)

    def view(self, job: Job) -> monitor.RunView:
        """The job's RunView, updated with the events appended since the last call (shared by all sessions)."""
        with self._lock:
            tail, view = self._views.get(job.id) or (monitor.EventTail(job.events_path), monitor.RunView())
            monitor.update(view, tail.read())
            view.status = job.status
            if is_tool_kind(getattr(job, "kind", "")):
                self._tool_view(job, view)
            if job.error_message and not view.error_message:
                view.error_message = job.error_message
                view.error_hint = job.error_hint
            self._views[job.id] = (tail, view)
            return view

    def _tool_view(self, job: Job, view: monitor.RunView) -> None:
        """A tool writes no events: its progress comes from the tqdm bar in its log, its outputs from the job."""
        counted = monitor.log_progress(monitor.read_log_tail(job.log_path, 5)) if job.status == "running" else None
        if counted:
            view.step, view.total_steps = counted
        elif job.status == "completed":
            view.step, view.total_steps = 1, 1
        view.outputs = list(job.outputs)

    def log_tail(self, job: Job, lines: int) -> str:
        """The log's last lines (the stored, secret-free tail for a finished job)."""
        if job.status in FINAL_STATUSES and job.log_tail:
            return job.log_tail
        try:
            st = os.stat(job.log_path)
            key = (st.st_size, st.st_mtime_ns)
        except OSError:
            return ""
        cached = self._logs.get(job.id)
        if cached and cached[0] == key:
            return cached[1]
        text = monitor.read_log_tail(job.log_path, lines)
        self._logs[job.id] = (key, text)
        return text

    @staticmethod
    def output_dir(job: Job) -> str | None:
        value = job.values.get("output_dir")
        return value if isinstance(value, str) and value else None

    def gallery(self, job: Job, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Copies of the sample images in a GUI-owned temp folder (gradio serves only files it may serve).

        Only images inside the job's output folder are copied: an event naming any other file (a damaged or forged
        events.jsonl) must not make the GUI serve it."""
        folder = os.path.join(self._gallery_dir, job.id)
        os.makedirs(folder, exist_ok=True)
        out = []
        for path, caption in items:
            if not sample_image_allowed(path, self.output_dir(job)):
                continue
            dest = os.path.join(folder, f"{abs(hash(path)) % 10**10}_{os.path.basename(path)}")
            if not os.path.exists(dest):
                try:
                    shutil.copyfile(path, dest)
                except OSError:
                    continue
            out.append((dest, caption))
        return out

    # ---- lifecycle
    def start_ticker(self) -> None:
        """Tick the job manager in the background: queue advances and dead runs settle without a browser."""
        def loop():
            while not self._stop_ticker.wait(TICK_S):
                try:
                    self.jobs.tick()
                except Exception as e:  # noqa: BLE001 - the ticker must survive a bad job folder
                    print(f"kohya_gui: job manager tick failed: {e}", file=sys.stderr)

        self._ticker = threading.Thread(target=loop, name="job-ticker", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop_ticker.set()
        self.jobs.close()
        self.tensorboard.stop()
        shutil.rmtree(self._gallery_dir, ignore_errors=True)


SAMPLE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SAMPLE_BYTES = 64 * 1024 * 1024


def sample_image_allowed(path: str, output_dir: str | None) -> bool:
    """True for an image file (by extension, a regular file, not huge) whose real path is inside output_dir."""
    if not output_dir or not isinstance(path, str) or not path.lower().endswith(SAMPLE_EXTENSIONS):
        return False
    try:
        real, root = os.path.realpath(path), os.path.realpath(output_dir)
        if os.path.commonpath([real, root]) != root:
            return False
        st = os.stat(real)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size <= MAX_SAMPLE_BYTES


def guess_family(values: dict[str, Any], kohya_config: dict | None = None) -> str:
    """The model family a preset or imported config is for (the trainers' own rules: sd_scripts.families)."""
    from sd_scripts.families import guess_family as family_of_settings

    return family_of_settings(values, kohya_config)


def _kohya_config(path: str) -> dict | None:
    """A kohya_ss config's own keys (its family checkboxes), or None when unreadable."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build_app(ctx: AppContext) -> gr.Blocks:
    """The whole page. Cheap: widgets only; nothing is read from disk until a page loads."""
    from kohya_gui.tabs.jobs import JobsTab
    from kohya_gui.tabs.run_monitor import RunMonitor
    from kohya_gui.tabs.training import TRAINING_TABS, TrainingTab
    from kohya_gui.tabs.utilities import UtilitiesTab

    with gr.Blocks(title="Kohya studio — LoRA and fine-tuning", fill_width=True) as demo:
        watched = gr.State(None)
        if ctx.config_warnings:
            gr.Markdown("\n".join(f"⚠️ {w}" for w in ctx.config_warnings), elem_id="config-warnings")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs(selected=ctx.config.gui("default_kind"), elem_id="main-tabs") as main_tabs:
                    tabs = [TrainingTab(ctx, kind, label, watched) for kind, label in TRAINING_TABS]
                    utilities = UtilitiesTab(ctx, tabs, watched)
                    jobs_tab = JobsTab(ctx, watched)
                jobs_tab.watch_tabs(main_tabs)
            with gr.Column(scale=2, min_width=380):
                RunMonitor(ctx, watched)
        for tab in tabs:
            demo.load(tab.on_load, None, tab.load_outputs, show_progress="hidden")
        demo.load(jobs_tab.refresh, None, jobs_tab.refresh_outputs, show_progress="hidden")
    hide_api(demo)
    demo.kohya_tabs = tabs  # for tests
    demo.kohya_utilities = utilities
    return demo


def hide_api(demo: gr.Blocks) -> None:
    """Make every event private: no API docs, no calls from gradio clients, only from the page itself.

    gradio 6 embeds the API description (every widget's label and default) in the index page it serves even to a
    visitor who has not logged in; with no public endpoint that description is empty. It also makes the page ~1 MB
    lighter.
    """
    for fn in demo.fns.values():
        fn.api_visibility = "private"


def launch(args: argparse.Namespace) -> int:
    """Build and serve the GUI with the parsed command-line flags (see cli.py). Blocks until Ctrl+C."""
    started = time.monotonic()
    try:
        ctx = AppContext(args.jobs_dir, getattr(args, "gui_config", None))
    except JobsDirError as e:
        print(f"kohya_gui: {e}", file=sys.stderr)
        return 2
    if not ctx.jobs.is_runner:
        print(f"kohya_gui: {ctx.jobs.viewer_reason()}", file=sys.stderr)
    for warning in ctx.config_warnings:
        print(f"kohya_gui: {warning}", file=sys.stderr)
    demo = build_app(ctx)
    ctx.start_ticker()
    auth = (args.username, args.password) if args.username and args.password else None
    guard = net_guard.middleware(args.listen, (getattr(args, "allowed_hosts", "") or "").split(","), args.share)
    try:
        demo.queue(default_concurrency_limit=4).launch(
            app_kwargs={"middleware": guard}, server_name=args.listen, server_port=args.server_port or None, share=args.share, auth=auth,
            inbrowser=args.inbrowser and not args.headless, root_path=args.root_path, show_error=True,
            prevent_thread_lock=True, css_paths=[ASSETS / "style.css"], footer_links=["settings"],
            allowed_paths=[ctx._gallery_dir])
        print(f"kohya_gui: serving on {demo.local_url} (ready in {time.monotonic() - started:.1f}s); jobs in "
              f"{ctx.jobs_dir}", flush=True)
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        ctx.close()
        demo.close()
    return 0
