"""Jobs are folders: a queue of training runs, started one at a time, stopped gracefully, re-attached after a restart.

Each job lives in `<jobs_dir>/<id>/`: `job.json` (the state below), `run.toml`, `prompts.txt` (when there are sample
prompts; written before launch), `log.txt` (stdout+stderr of the process) and `events.jsonl` (the trainer's events).
Nothing about a run lives only in memory: a new JobManager on the same folder knows everything.

Liveness is never assumed: a job is running only while a process with its pid AND its recorded create time exists.
`tick()` (the UI calls it every second) notices a dead process within a second, finishes its job from the exit code
and the `done` event, and starts the next queued job, so stale state can never block a new start.

Trust: a job runs from its kind and run.toml, rebuilt and checked by the GUI at launch; the argv kept in job.json is
for display only and is never executed. The jobs folder must be private (job_files.ensure_private_dir); one GUI per
folder runs the queue (file lock), the others are read-only viewers. Every job.json field is type-checked: a bad job
is listed as unreadable with the reason and never stops the others or the tick.

Tools (kind `tool:<name>`, sd_scripts.tools.registry) are jobs too: their checked values are kept in `tool.json`
(instead of run.toml) and the argv is rebuilt from them and the tool's declared options at launch; they write no
events, so their outputs are their `out_file` / `out_dir` paths that exist when they exit 0, and stopping one kills it
at once (a tool has nothing to save; its output is written atomically or not at all).

Stopping: `stop()` writes the `stop` request file into the job folder (the trainer finishes its step, saves, emits
`done: stopped` and exits 0); if the process is still alive `grace_s` seconds later, `tick()` kills the whole process
tree (psutil + the process group). No shell anywhere: processes start from an argument list.
"""
from __future__ import annotations

import json
import logging
import os
import secrets as _random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil

from sd_scripts import options as schema

from . import monitor
from .atomic import atomic_write
from .command import (FAMILY_KEY, JOB_OPTIONS, AccelerateSettings, CommandError, RunCommand, build_command,
                      format_command, trainer_for)
from .job_files import JobFileError, JobsDirError, QueueLock, check_job_fields, ensure_private_dir
from .secrets import redact, secret_values, strip_secrets
from .tool_command import build_tool_command, is_tool_kind, output_paths, read_tool_values, tool_name

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("queued", "running", "completed", "stopped", "failed", "cancelled")
FINAL_STATUSES = frozenset({"completed", "stopped", "failed", "cancelled"})
CONTROL_REQUESTS = ("stop", "save", "sample")
LOG_TAIL_LINES = 40
JOB_JSON = "job.json"
LOG_FILE = "log.txt"


class JobError(ValueError):
    """An action that is not possible for this job now (message says why), or an unknown job id."""


@dataclass
class Job:
    """The state of one run, stored in `<jobs_dir>/<id>/job.json`."""

    id: str
    kind: str
    name: str = ""
    status: str = "queued"
    pid: int | None = None
    create_time: float | None = None  # psutil create time of pid: tells our process from a recycled pid
    argv: list[str] = field(default_factory=list)
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    error_message: str | None = None
    error_hint: str | None = None
    log_tail: str = ""
    queue_index: int = 0
    stop_requested: float | None = None  # when stop() was asked (the grace period runs from here)
    killed: bool = False
    outputs: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)  # GUI values, secrets removed
    accel: dict[str, Any] = field(default_factory=dict)
    folder: str = field(default="", compare=False)  # not stored: where job.json was read from

    # ---- paths
    @property
    def job_dir(self) -> str:
        """The job folder (also the trainer's control folder)."""
        return self.folder

    @property
    def job_json(self) -> str:
        return os.path.join(self.folder, JOB_JSON)

    @property
    def toml_path(self) -> str:
        return os.path.join(self.folder, "run.toml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, LOG_FILE)

    @property
    def events_path(self) -> str:
        return os.path.join(self.folder, "events.jsonl")

    @property
    def prompts_path(self) -> str:
        return os.path.join(self.folder, "prompts.txt")

    @property
    def command_line(self) -> str:
        """The argv as a copy-pasteable shell line (display only)."""
        return format_command(self.argv)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("folder")
        return data

    @classmethod
    def from_dict(cls, data: Any, folder: str) -> "Job":
        """A Job from job.json content; JobFileError names a field of the wrong type."""
        job = cls(**check_job_fields(data, os.path.basename(folder), STATUSES))
        job.folder = folder
        return job


def _atomic_write(path: str, text: str) -> None:
    atomic_write(path, text)


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` runs and is the same process (same create time), not a recycled pid or a zombie."""
    if not pid or create_time is None:
        return False
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.5:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def kill_tree(pid: int, create_time: float | None = None, timeout: float = 3.0) -> None:
    """SIGKILL the process, all its descendants and its process group (it leads its own session)."""
    try:
        root = psutil.Process(pid)
        if create_time is not None and abs(root.create_time() - create_time) > 0.5:
            return  # pid recycled: not ours
        procs = [root] + root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    try:  # grandchildren whose parent already died are still in the group
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    psutil.wait_procs(procs, timeout=timeout)


class JobManager:
    """The queue and the one running job. Thread-safe; every change is written to job.json at once.

    `build` makes the RunCommand (tests inject a fake trainer); `python` is the interpreter jobs run with.
    """

    def __init__(self, jobs_dir: str, python: str = sys.executable, grace_s: float = 30,
                 build: Callable[..., RunCommand] = build_command, cwd: str = REPO_ROOT,
                 env: dict[str, str] | None = None):
        self.jobs_dir = os.path.abspath(jobs_dir)
        self.python = python
        self.grace_s = grace_s
        self.build = build
        self.cwd = cwd
        self.extra_env = dict(env or {})
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._secrets: dict[str, list[str]] = {}
        self._secret_env: dict[str, dict[str, str]] = {}  # job id -> secrets for its environment (memory only)
        self._cache: dict[str, tuple[int, Job | str]] = {}  # job id -> (mtime, Job or why it is unreadable)
        self._live: dict[str, tuple[int, float | None]] = {}  # job id -> (pid, create time) of runs seen running
        self._tails: dict[str, tuple[monitor.EventTail, monitor.RunView]] = {}
        ensure_private_dir(self.jobs_dir)
        self._queue_lock = QueueLock(self.jobs_dir)
        if self._queue_lock.try_acquire():
            self.reattach()

    # ---- the queue-runner lock
    @property
    def is_runner(self) -> bool:
        """True when this GUI runs the queue; False: another GUI does and this one only shows the jobs."""
        return self._queue_lock.held

    def viewer_reason(self) -> str:
        return (f"another GUI (pid {self._queue_lock.holder()}) runs the queue of {self.jobs_dir}; this one only "
                f"shows it. Use that GUI, or close it and this one takes over")

    def _require_runner(self) -> None:
        if not self._queue_lock.try_acquire():
            raise JobError(self.viewer_reason())

    def close(self) -> None:
        """Give up the queue (another GUI may take over). Running trainers keep running."""
        self._queue_lock.release()

    # ---- storage
    def _save(self, job: Job) -> None:
        _atomic_write(job.job_json, json.dumps(job.to_dict(), indent=2, ensure_ascii=False))

    def _read(self, job_id: str) -> Job | None:
        folder = os.path.join(self.jobs_dir, job_id)
        path = os.path.join(folder, JOB_JSON)
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return None
        cached = self._cache.get(job_id)
        if cached and cached[0] == mtime:
            return cached[1] if isinstance(cached[1], Job) else None
        try:
            with open(path, encoding="utf-8") as f:
                job: Job | str = Job.from_dict(json.load(f), folder)
        except JobFileError as e:
            job = str(e)
        except (OSError, ValueError, TypeError, RecursionError) as e:
            job = f"job.json cannot be read: {e}"
        if isinstance(job, str):
            log.warning("unreadable job %s: %s", path, job)
        self._cache[job_id] = (mtime, job)
        return job if isinstance(job, Job) else None

    def unreadable(self) -> list[tuple[str, str]]:
        """(job id, reason) of the job folders whose job.json is not what the GUI writes (shown, never run)."""
        with self._lock:
            self._all()
            out = []
            for job_id, (_, entry) in sorted(self._cache.items()):
                if isinstance(entry, str) and os.path.isfile(os.path.join(self.jobs_dir, job_id, JOB_JSON)):
                    out.append((job_id, entry))
            return out

    def _all(self) -> list[Job]:
        try:
            names = os.listdir(self.jobs_dir)
        except FileNotFoundError:
            return []
        jobs = [self._read(n) for n in names
                if not n.startswith(".") and os.path.isfile(os.path.join(self.jobs_dir, n, JOB_JSON))]
        return [j for j in jobs if j is not None]

    def list(self) -> list[Job]:
        """All jobs, newest first."""
        with self._lock:
            return sorted(self._all(), key=lambda j: (j.created, j.id), reverse=True)

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self._lock:
            return self._read(job_id)

    def _need(self, job_id: str) -> Job:
        job = self._read(job_id)
        if job is None:
            raise JobError(f"no job {job_id!r} in {self.jobs_dir}")
        return job

    def queued(self) -> list[Job]:
        """Queued jobs in the order they will start."""
        with self._lock:
            return sorted((j for j in self._all() if j.status == "queued"), key=lambda j: (j.queue_index, j.created))

    def running(self) -> Job | None:
        """The job whose process is alive now, if any (liveness is checked, not assumed)."""
        with self._lock:
            for job in self._all():
                if job.status == "running" and self._alive(job):
                    self._live.setdefault(job.id, (job.pid or 0, job.create_time))
                    return job
            return None

    def _busy(self) -> bool:
        """A run is alive: a readable running job, or one seen running whose job.json became unreadable."""
        if self.running() is not None:
            return True
        for job_id, (pid, create_time) in list(self._live.items()):
            proc = self._procs.get(job_id)
            if (proc.poll() is None) if proc is not None else process_alive(pid, create_time):
                return True
            self._live.pop(job_id, None)
        return False

    def _reap_orphans(self) -> list[str]:
        """Kill the process tree of runs whose job folder was deleted while they ran (nothing would watch them)."""
        killed = []
        for job_id, (pid, create_time) in list(self._live.items()):
            if os.path.isdir(os.path.join(self.jobs_dir, job_id)):
                continue
            log.warning("job folder %s was deleted while its run was alive: killing the run", job_id)
            kill_tree(pid, create_time)
            proc = self._procs.pop(job_id, None)
            if proc is not None:
                proc.wait()
            self._live.pop(job_id, None)
            self._cache.pop(job_id, None)
            killed.append(job_id)
        return killed

    # ---- creating and starting
    def create(self, kind: str, values: dict[str, Any], accel: AccelerateSettings | None = None,
               name: str | None = None) -> Job:
        """Queue a run: build its command (errors raise before anything is written), write the job folder."""
        accel = accel or AccelerateSettings()
        with self._lock:
            self._require_runner()
            label = tool_name(kind) if is_tool_kind(kind) else kind
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{_random.token_hex(3)}"
            folder = os.path.join(self.jobs_dir, job_id)
            cmd = self._builder(kind)(kind, values, accel, folder, python=self.python)
            os.makedirs(folder, mode=0o700)
            _atomic_write(cmd.toml_path, cmd.toml_text)
            if cmd.prompts_text is not None and cmd.prompts_path:
                _atomic_write(cmd.prompts_path, cmd.prompts_text)
            index = max([j.queue_index for j in self._all()] + [0]) + 1
            if is_tool_kind(kind):  # a tool's values as checked (paths resolved): its outputs are read from them
                values = dict(cmd.values)
            job = Job(id=job_id, kind=kind, name=name or str(values.get("output_name") or kind), argv=cmd.argv,
                      created=time.time(), queue_index=index, values=strip_secrets(dict(values)),
                      accel=strip_secrets(accel.to_dict()), folder=folder)
            self._secrets[job_id] = secret_values(dict(values)) + secret_values(accel.to_dict())
            self._secret_env[job_id] = dict(cmd.env)
            self._save(job)
            return job

    def start_next(self) -> Job | None:
        """Start the first queued job if nothing is running. Returns the started job (or None)."""
        with self._lock:
            if not self._queue_lock.try_acquire() or self._busy():
                return None
            for job in self.queued():
                self._launch(job)
                return job
            return None

    def _env(self, job_id: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(self._secret_env.get(job_id, {}))  # the form's secrets (a GUI restart forgets them)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
        return env

    def _builder(self, kind: str) -> Callable[..., RunCommand]:
        """A tool job's command comes from the tool's declared options, a training job's from `build`."""
        return build_tool_command if is_tool_kind(kind) else self.build

    def _rebuild(self, job: Job) -> RunCommand:
        """The job's command, made now from its kind, run.toml and accelerate settings, all checked again (the files
        may have been edited since they were queued). CommandError / OptionError say what is wrong."""
        if is_tool_kind(job.kind):
            cmd = build_tool_command(job.kind, read_tool_values(job.job_dir), None, job.job_dir, python=self.python)
            _atomic_write(cmd.toml_path, cmd.toml_text)
            return cmd
        trainer = trainer_for(job.kind)
        values = schema.config_values(job.toml_path, trainer)
        for name in JOB_OPTIONS:
            values.pop(name, None)
        family = (job.values or {}).get(FAMILY_KEY)
        if isinstance(family, str) and family:  # the form's family (the model file's own wins in build_command)
            values[FAMILY_KEY] = family
        accel = AccelerateSettings.from_dict(job.accel)
        cmd = self.build(job.kind, values, accel, job.job_dir, python=self.python)
        _atomic_write(cmd.toml_path, cmd.toml_text)
        return cmd

    def _launch(self, job: Job) -> None:
        try:
            cmd = self._rebuild(job)
        except (CommandError, ValueError, OSError) as e:
            job.status, job.ended = "failed", time.time()
            job.error_message = f"not started: {e}"
            job.error_hint = "The job's run.toml or settings are not valid; queue the run again from the form."
            self._save(job)
            return
        job.argv = list(cmd.argv)  # for display; what runs is cmd.argv, built just now
        for name in CONTROL_REQUESTS:  # a stale request must not stop the new run
            try:
                os.remove(os.path.join(job.job_dir, name))
            except OSError:
                pass
        job.status, job.started = "running", time.time()
        try:
            with open(job.log_path, "ab") as logf:
                logf.write(f"$ {job.command_line}\n".encode("utf-8", "replace"))
                logf.flush()
                proc = subprocess.Popen(cmd.argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.cwd, env=self._env(job.id), start_new_session=True, close_fds=True)
        except OSError as e:
            job.status, job.ended = "failed", time.time()
            job.error_message = f"could not start {job.argv[0]!r}: {e}"
            job.error_hint = "Check the Python interpreter the GUI runs jobs with (and that it is executable)."
            self._save(job)
            return
        self._procs[job.id] = proc
        job.pid = proc.pid
        self._live[job.id] = (proc.pid, None)
        try:
            job.create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            job.create_time = None
        self._live[job.id] = (proc.pid, job.create_time)
        self._save(job)

    # ---- watching
    def _alive(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        return process_alive(job.pid, job.create_time)

    def tick(self) -> list[Job]:
        """Call about once a second: finish jobs whose process ended, kill runs past their stop grace period,
        start the next queued job. Returns the jobs whose status changed."""
        changed: list[Job] = []
        with self._lock:
            if not self._queue_lock.held:
                if not self._queue_lock.try_acquire():
                    return changed  # a viewer: the runner GUI settles and starts jobs
                changed += self.reattach()
            self._reap_orphans()
            for job in self._all():
                if job.status != "running":
                    continue
                if self._alive(job):
                    if job.stop_requested and not job.killed and time.time() - job.stop_requested > self.grace_s:
                        log.warning("job %s did not stop within %ss: killing its process tree", job.id, self.grace_s)
                        self._kill(job, "did not stop within the grace period; killed (the last save may be "
                                        "missing)")
                        changed.append(job)
                    continue
                self._finish(job)
                self._live.pop(job.id, None)
                changed.append(job)
            started = self.start_next()
            if started is not None:
                changed.append(started)
        return changed

    def _finish(self, job: Job) -> None:
        """The process is gone: settle the final status from its exit code and events."""
        proc = self._procs.pop(job.id, None)
        rc = proc.wait() if proc is not None else None
        view = self._event_view(job)
        tail = redact(monitor.read_log_tail(job.log_path, LOG_TAIL_LINES), self._secrets.get(job.id, []))
        job.log_tail, job.exit_code, job.ended = tail, rc, time.time()
        job.outputs = view.outputs or [p for _, p in view.saves]
        if is_tool_kind(job.kind) and not job.outputs and rc == 0:  # tools write no events: their output options
            job.outputs = _tool_outputs(job)
        done = view.done_status
        message = view.error_message
        if job.killed:
            status = "stopped"
        elif done in ("completed", "stopped") and rc in (0, None):
            status = done
        elif done == "failed":
            status = "failed"
        elif rc == 0:
            status = "completed"
        elif rc is None:
            status = "failed"
            message = message or ("the process ended while the GUI was not watching it and left no 'done' event; "
                                  "see the log tail")
        else:
            status = "failed"
            if done:
                message = message or f"exited with code {rc} after reporting '{done}'"
            else:
                message = message or f"exited with code {rc}{_last_line(tail)}"
        job.status = status
        if not job.killed:
            job.error_message = message if status == "failed" else None
            job.error_hint = (view.error_hint or None) if status == "failed" else None
        self._save(job)

    def reattach(self) -> list[Job]:
        """After a restart: keep live runs (same pid and create time) as running; finish dead ones from their
        events and log tail. Returns the jobs that were finished."""
        finished = []
        with self._lock:
            for job in self._all():
                if job.status != "running":
                    continue
                if process_alive(job.pid, job.create_time):
                    self._live[job.id] = (job.pid or 0, job.create_time)
                else:
                    self._finish(job)
                    finished.append(job)
        return finished

    # ---- control
    def stop(self, job_id: str, use_signal: bool = False) -> Job:
        """Graceful stop: writes the `stop` request (and SIGINT with use_signal). A queued job is cancelled.
        If the run is still alive grace_s later, tick() kills its process tree."""
        from sd_scripts.training.control import request

        with self._lock:
            self._require_runner()
            job = self._need(job_id)
            if job.status == "queued":
                return self.cancel(job_id)
            if job.status != "running":
                raise JobError(f"job {job_id} is {job.status}, not running")
            if is_tool_kind(job.kind):  # a tool has nothing to save: it ends now (its output is written atomically)
                self._kill(job, "stopped by the user")
                if not self._alive(job):
                    self._finish(job)
                return job
            request(job.job_dir, "stop")
            if use_signal and self._alive(job):
                try:
                    os.kill(job.pid, signal.SIGINT)
                except OSError:
                    pass
            job.stop_requested = job.stop_requested or time.time()
            self._save(job)
            return job

    def _kill(self, job: Job, message: str) -> None:
        proc = self._procs.get(job.id)
        if proc is not None and proc.poll() is not None:
            return
        if job.pid:
            kill_tree(job.pid, job.create_time)
        job.killed = True
        job.error_message = message
        self._save(job)

    def kill(self, job_id: str) -> Job:
        """Kill the run's whole process tree now (no final save)."""
        with self._lock:
            self._require_runner()
            job = self._need(job_id)
            if job.status != "running":
                raise JobError(f"job {job_id} is {job.status}, not running")
            self._kill(job, "killed by the user (no final save)")
            if not self._alive(job):
                self._finish(job)
            return job

    def request(self, job_id: str, what: str) -> Job:
        """Ask the running trainer to 'save' or 'sample' now (request file in the job folder)."""
        from sd_scripts.training.control import request

        if what not in ("save", "sample"):
            raise JobError(f"request must be 'save' or 'sample', got {what!r}")
        with self._lock:
            self._require_runner()
            job = self._need(job_id)
            if job.status != "running":
                raise JobError(f"job {job_id} is {job.status}, not running")
            request(job.job_dir, what)
            return job

    def cancel(self, job_id: str) -> Job:
        """Take a queued job off the queue (status cancelled)."""
        with self._lock:
            self._require_runner()
            job = self._need(job_id)
            if job.status != "queued":
                raise JobError(f"only queued jobs can be cancelled; job {job_id} is {job.status} (use stop)")
            job.status, job.ended = "cancelled", time.time()
            self._save(job)
            return job

    def move(self, job_id: str, direction: str | int) -> list[Job]:
        """Move a queued job one place 'up' (earlier) or 'down'. Returns the new queue order."""
        step = {"up": -1, "down": 1}.get(direction, direction) if isinstance(direction, str) else direction
        if step not in (-1, 1):
            raise JobError(f"direction must be 'up' or 'down', got {direction!r}")
        with self._lock:
            self._require_runner()
            queue = self.queued()
            ids = [j.id for j in queue]
            if job_id not in ids:
                raise JobError(f"job {job_id} is not queued")
            i = ids.index(job_id)
            j = i + step
            if 0 <= j < len(queue):
                a, b = queue[i], queue[j]
                a.queue_index, b.queue_index = b.queue_index, a.queue_index
                if a.queue_index == b.queue_index:  # equal indices from hand-edited files
                    a.queue_index += step
                self._save(a)
                self._save(b)
            return self.queued()

    def delete(self, job_id: str) -> None:
        """Remove a finished job's folder (its outputs in output_dir stay)."""
        import shutil

        with self._lock:
            self._require_runner()
            job = self._need(job_id)
            if not job.is_final:
                raise JobError(f"job {job_id} is {job.status}; stop or cancel it first")
            shutil.rmtree(job.job_dir)
            self._cache.pop(job_id, None)

    def _event_view(self, job: Job) -> monitor.RunView:
        """The job's RunView from its events, reading only what was appended since the last call (offset kept)."""
        tail, view = self._tails.get(job.id) or (monitor.EventTail(job.events_path), monitor.RunView())
        events = tail.read()
        if tail.restarted:  # the file was replaced: rebuild from its start
            view = monitor.RunView()
        monitor.update(view, events)
        self._tails[job.id] = (tail, view)
        return view

    def view(self, job_id: str) -> monitor.RunView:
        """A RunView of the job from its files (status, events incrementally, log tail)."""
        with self._lock:
            job = self._need(job_id)
            view = self._event_view(job)
        view.status = job.status
        view.log_tail = monitor.read_log_tail(job.log_path)
        if job.error_message and not view.error_message:
            view.error_message = job.error_message
        return view


def _tool_outputs(job: Job) -> list[str]:
    """The files a finished tool job wrote (its output options' paths that exist)."""
    try:
        paths = output_paths(tool_name(job.kind), job.values)
    except (CommandError, ImportError, AttributeError):
        return []
    return [p for p in paths if os.path.exists(p)]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f": {lines[-1]}" if lines else ""
