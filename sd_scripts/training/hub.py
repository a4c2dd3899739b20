"""Hugging Face Hub: uploads of saved models and state folders, and resuming from a state folder on the Hub.

Options (sd-scripts' names): `huggingface_repo_id` (where every saved file goes, created when missing, private unless
`huggingface_repo_visibility` is 'public'), `huggingface_repo_type`, `huggingface_path_in_repo` (a folder in the
repository; the file keeps its name), `huggingface_token` (else huggingface_hub's own HF_TOKEN / login),
`save_state_to_huggingface` (state folders too), `async_upload` (a background thread, one upload at a time; the final
save is always waited for), `resume_from_huggingface` (`resume` is 'user/repo/path[:revision[:repo_type]]').

The local file is always written before its upload starts, and a failed upload is a warning naming the repository and
the local file, never a failed run: the trained model is not lost because the network was.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..options import OptionError

log = logging.getLogger("sd_scripts.train")


def check_options(args: argparse.Namespace) -> list[str]:
    """Errors (OptionError) for options that cannot work together; returns warnings for options without effect."""
    warnings = []
    repo = getattr(args, "huggingface_repo_id", None)
    if getattr(args, "save_state_to_huggingface", False) and not repo:
        raise OptionError("option 'save_state_to_huggingface' needs huggingface_repo_id: the repository the state "
                          "folders are uploaded to")
    if getattr(args, "resume_from_huggingface", False):
        if not args.resume:
            raise OptionError("option 'resume_from_huggingface' needs resume: the state folder on the Hub as "
                              "'user/repo/path/in/repo[:revision[:repo_type]]'")
        parse_resume_spec(args.resume)
    if not repo:
        for name in ("async_upload", "huggingface_path_in_repo", "huggingface_repo_visibility"):
            if getattr(args, name, None):
                warnings.append(f"option '{name}' has no effect without huggingface_repo_id")
    elif getattr(args, "save_state_to_huggingface", False) and not (args.save_state or args.save_state_on_train_end):
        warnings.append("option 'save_state_to_huggingface' has no effect without save_state or "
                        "save_state_on_train_end: no state folder is saved")
    return warnings


def parse_resume_spec(spec: str) -> tuple[str, str, str | None, str | None]:
    """'user/repo/path/in/repo[:revision[:repo_type]]' -> (repo_id, path_in_repo, revision, repo_type)."""
    head, *rest = spec.split(":")
    parts = [p for p in head.split("/") if p]
    if len(parts) < 2 or len(rest) > 2:
        raise OptionError(f"option 'resume' with resume_from_huggingface: {spec!r} is not "
                          "'user/repo/path/in/repo[:revision[:repo_type]]'")
    revision = rest[0] or None if rest else None
    repo_type = rest[1] or None if len(rest) > 1 else None
    if repo_type not in (None, "model", "dataset", "space"):
        raise OptionError(f"option 'resume': repository type {repo_type!r} in {spec!r} is not model, dataset or "
                          "space")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision, repo_type


def download_state(args: argparse.Namespace, dest_root: str) -> str:
    """Download the state folder `args.resume` names on the Hub under dest_root; returns the local folder."""
    from huggingface_hub import HfApi

    repo_id, path_in_repo, revision, repo_type = parse_resume_spec(args.resume)
    token = getattr(args, "huggingface_token", None) or None
    where = f"{repo_id}/{path_in_repo}" + (f"@{revision}" if revision else "")
    api = HfApi(token=token)
    try:
        files = [f for f in api.list_repo_files(repo_id, revision=revision, repo_type=repo_type)
                 if not path_in_repo or f.startswith(path_in_repo.rstrip("/") + "/")]
    except Exception as e:  # noqa: BLE001 - any failure of the Hub is the user's to see, with the repository named
        raise OptionError(f"option 'resume': cannot list the state folder {where} on the Hub ({e}); check the "
                          "repository, path and token") from None
    if not files:
        raise OptionError(f"option 'resume': the Hub repository {repo_id} has no files under {path_in_repo!r}"
                          + (f" at revision {revision}" if revision else "") + ": check the path")
    local_dir = os.path.join(dest_root, repo_id.replace("/", "--"))
    log.info("downloading the state %s from the Hub (%d files) to %s", where, len(files), local_dir)
    for name in files:
        try:
            api.hf_hub_download(repo_id, name, revision=revision, repo_type=repo_type, token=token, local_dir=local_dir)
        except Exception as e:  # noqa: BLE001
            raise OptionError(f"option 'resume': downloading {name} from the Hub repository {repo_id} failed ({e})") \
                from None
    return os.path.join(local_dir, path_in_repo) if path_in_repo else local_dir


class HubUploader:
    """Uploads saved files and folders to `huggingface_repo_id` (does nothing without it). Main process only."""

    def __init__(self, args: argparse.Namespace, warn: Callable[..., None]):
        self.repo_id = getattr(args, "huggingface_repo_id", None)
        self.repo_type = getattr(args, "huggingface_repo_type", None) or "model"
        self.folder = (getattr(args, "huggingface_path_in_repo", None) or "").strip("/")
        self.private = getattr(args, "huggingface_repo_visibility", None) != "public"
        self.token = getattr(args, "huggingface_token", None) or None
        self.warn = warn
        self.uploaded: list[str] = []  # paths in the repository
        self._repo_ready = False
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hub-upload") \
            if self.repo_id and getattr(args, "async_upload", False) else None

    @property
    def enabled(self) -> bool:
        return bool(self.repo_id)

    def path_in_repo(self, local_path: str) -> str:
        name = os.path.basename(os.path.normpath(local_path))
        return f"{self.folder}/{name}" if self.folder else name

    def upload(self, local_path: str, *, wait: bool = False) -> None:
        """Upload a saved file or folder (already complete on disk); in the background with async_upload unless
        `wait`. Failures are warnings."""
        if not self.enabled:
            return
        if self._executor is not None and not wait:
            self._pending.append(self._executor.submit(self._upload, local_path))
        else:
            self.wait()  # earlier background uploads first: the repository gets the files in the order saved
            self._upload(local_path)

    def wait(self) -> None:
        """Wait for background uploads (end of the run)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _upload(self, local_path: str) -> None:
        from huggingface_hub import HfApi

        dest = self.path_in_repo(local_path)
        try:
            api = HfApi(token=self.token)
            self._ensure_repo(api)
            message = f"Upload {os.path.basename(os.path.normpath(local_path))}"
            if os.path.isdir(local_path):
                api.upload_folder(repo_id=self.repo_id, repo_type=self.repo_type, folder_path=local_path,
                                  path_in_repo=dest, commit_message=message)
            else:
                api.upload_file(path_or_fileobj=local_path, repo_id=self.repo_id, repo_type=self.repo_type,
                                path_in_repo=dest, commit_message=message)
        except Exception as e:  # noqa: BLE001 - an upload never fails the run: the file is on disk
            self.warn(f"uploading {local_path} to the Hub repository {self.repo_id} ({self.repo_type}) as {dest} "
                      f"failed: {type(e).__name__}: {e}",
                      hint=f"the file is kept at {local_path}; upload it later, e.g. `hf upload {self.repo_id} "
                           f"{local_path} {dest}`, and check huggingface_token / HF_TOKEN and the network")
            return
        with self._lock:
            self.uploaded.append(dest)
        log.info("uploaded %s to the Hub repository %s as %s", local_path, self.repo_id, dest)

    def _ensure_repo(self, api) -> None:
        """Create the repository when missing (private unless huggingface_repo_visibility is 'public'); an existing
        one keeps its visibility."""
        with self._lock:
            if self._repo_ready:
                return
            api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
            self._repo_ready = True
