"""Writing model files safely and naming them as sd-scripts does.

Every write goes to a temporary file in the target folder and is moved into place with os.replace, so a crash or a
full disk never leaves a half-written model under the final name. Names follow FORMATS.md ('Training run files'):
`<name>.safetensors` (final), `<name>-000003.safetensors` (epoch 3), `<name>-step00000100.safetensors` (step 100),
state folders `<name>-000003-state`, `<name>-step00000100-state`, `<name>-state`.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp makes 0600 files; finished models get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_current_umask()


class SaveError(UserError):
    """The output folder or a file in it cannot be written."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)` for a temp file beside `path`, then move it onto `path`; on failure remove it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(temp_path)
        with open(temp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temp_path, _FILE_MODE)
        os.replace(temp_path, path)
    except BaseException:
        try:
            os.remove(temp_path)
        except FileNotFoundError:
            pass
        raise


def atomic_save_safetensors(tensors: dict[str, Any], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """safetensors file with header metadata (every value must be a str), written atomically."""
    from safetensors.torch import save_file

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str; not for {bad[:3]}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, written atomically."""
    import torch

    atomic_write(path, lambda temp: torch.save(obj, temp))


# ---- names
def _ext(ext: str) -> str:
    """'safetensors' -> '.safetensors'; '' stays '' (a diffusers folder has no extension)."""
    return ext if not ext or ext.startswith(".") else "." + ext


def _suffix(epoch: int | None, step: int | None) -> str:
    if epoch is not None and step is not None:
        raise ValueError("give epoch or step, not both")
    if epoch is not None:
        return f"-{int(epoch):06d}"
    if step is not None:
        return f"-step{int(step):08d}"
    return ""


def model_file_name(output_name: str, ext: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """('lora', 'safetensors', epoch=3) -> 'lora-000003.safetensors'; step=100 -> 'lora-step00000100...'."""
    return f"{output_name}{_suffix(epoch, step)}{_ext(ext)}"


def state_dir_name(output_name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """('lora', epoch=3) -> 'lora-000003-state'; step=100 -> 'lora-step00000100-state'; neither -> 'lora-state'."""
    return f"{output_name}{_suffix(epoch, step)}-state"


@dataclass(frozen=True)
class SavedName:
    """What one of our names says: epoch or step number, and whether it is a state folder."""

    epoch: int | None
    step: int | None
    is_state: bool


def parse_save_name(file_name: str, output_name: str, ext: str) -> SavedName | None:
    """The epoch/step in a name our naming produced for `output_name`, or None for any other name."""
    pattern = (re.escape(output_name) + r"-(?:(?P<epoch>\d{6})|step(?P<step>\d{8}))"
               + r"(?:(?P<state>-state)|" + re.escape(_ext(ext)) + r")")
    match = re.fullmatch(pattern, file_name)
    if not match:
        return None
    epoch, step = match.group("epoch"), match.group("step")
    return SavedName(int(epoch) if epoch else None, int(step) if step else None, bool(match.group("state")))


def epochs_between_saves(save_n_epoch_ratio: int, total_epochs: int) -> int:
    """save_n_epoch_ratio N: save every floor(total_epochs / N) epochs, at least every epoch (sd-scripts' rule), so
    about N models come out of the run."""
    if save_n_epoch_ratio < 1:
        raise ValueError("save_n_epoch_ratio must be 1 or more")
    return max(1, total_epochs // save_n_epoch_ratio)


def prune_old_saves(output_dir: str | os.PathLike, output_name: str, ext: str, *,
                    keep_last_n_epochs: int | None = None, current_epoch: int | None = None,
                    keep_last_n_steps: int | None = None, current_step: int | None = None,
                    include_states: bool = True, include_models: bool = True) -> list[str]:
    """Delete older per-epoch saves (keeping the last N up to current_epoch) and per-step saves made more than N
    steps before current_step (sd-scripts' save_last_n_steps: the save at exactly current_step - N stays). Only names
    our naming produced for `output_name` are touched: model files with include_models, state folders with
    include_states; saves numbered after the current one are left alone. Returns the deleted paths."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    epochs: dict[int, list[str]] = {}
    step_paths: list[tuple[int, str]] = []
    for entry in os.listdir(output_dir):
        parsed = parse_save_name(entry, output_name, ext)
        full = os.path.join(output_dir, entry)
        if parsed is None or (parsed.is_state and (not include_states or not os.path.isdir(full))):
            continue
        if not parsed.is_state and (not include_models or not os.path.isfile(full)):
            continue
        if parsed.epoch is not None:
            epochs.setdefault(parsed.epoch, []).append(full)
        else:
            step_paths.append((parsed.step, full))
    doomed: list[str] = []
    if keep_last_n_epochs is not None and current_epoch is not None:
        done = sorted(e for e in epochs if e <= current_epoch)
        for epoch in done[:max(0, len(done) - keep_last_n_epochs)]:
            doomed += epochs[epoch]
    if keep_last_n_steps is not None and current_step is not None:
        doomed += [p for s, p in step_paths if s < current_step - keep_last_n_steps]
    for path in sorted(doomed):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return sorted(doomed)


def check_output_dir_writable(path: str | os.PathLike) -> None:
    """Create the output folder if needed and check a file can be written there; SaveError naming it if not."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SaveError(f"output_dir {path!r} is a file, not a folder: choose a folder for output_dir")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SaveError(f"output_dir {path!r} cannot be written ({e.strerror or e}): choose a folder you can "
                        f"write to, or fix its permissions") from None
