"""Finding a captioning model's files offline: a local folder, else the user's Hugging Face cache. Nothing is
downloaded; a missing model is one line naming it and where to put it."""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import UserError


def hub_cache_dir(repo_id: str, files: Sequence[str], subfolder: str | None = None) -> str | None:
    """The folder of `repo_id` in the Hugging Face cache holding every one of `files` (under `subfolder`), or
    None when the cache lacks one of them."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    folder = None
    for name in files:
        try:
            path = hf_hub_download(repo_id, name, subfolder=subfolder, local_files_only=True)
        except Exception:  # noqa: BLE001 - any miss (not cached, bad id) means "not available offline"
            return None
        folder = os.path.dirname(path)
    return folder


def model_folder(name_or_path: str, files: Sequence[str], what: str, option: str) -> str:
    """A folder holding `files` of the model `name_or_path`: the path itself when it is a folder, else the
    Hugging Face cache's copy of that repository id. UserError naming the model and where to put it otherwise."""
    if os.path.isdir(name_or_path):
        missing = [f for f in files if not os.path.isfile(os.path.join(name_or_path, f))]
        if missing:
            raise UserError(f"{what} folder {name_or_path} lacks {', '.join(missing)}: copy the model's files "
                            f"there ({', '.join(files)})")
        return name_or_path
    found = hub_cache_dir(name_or_path, files) if "/" in name_or_path and not os.path.exists(name_or_path) else None
    if found:
        return found
    raise UserError(f"{what} {name_or_path!r} is not a local folder and is not in the Hugging Face cache (nothing is "
                    f"downloaded here): download it with `huggingface-cli download {name_or_path}` or pass its "
                    f"folder with --{option}")
