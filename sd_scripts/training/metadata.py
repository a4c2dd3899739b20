"""Header metadata of trained files: sd-scripts' ss_* keys, Stability's modelspec.* keys and the sshs_* hashes.

Facts in FORMATS.md ('LoRA file'). Every value is a str (safetensors requires it): Python str() of the setting, so
None is 'None' and True is 'True'; JSON for the structured keys. One ss_<option> key per training option comes from the
option schema, so adding an option adds its key here without an edit.

Hashes: `sshs_model_hash` is the sha256 of the file's bytes after the safetensors header. The header holds the hash
itself, but the bytes after it (the tensor data) do not depend on the header, so the hash computed from a serialization
with any metadata equals the hash of the final file. `sshs_legacy_hash` is the first 8 hex digits of the sha256 of the
64 KiB at offset 1 MiB of the file serialized with only its ss_* metadata (as sd-scripts defines it).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import struct
from typing import Any, Mapping

from .. import options as option_schema
from ..families import family_spec

SAI_MODEL_SPEC_VERSION = "1.0.1"
MINIMAL_SS_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                   "ss_network_args")

# Options whose ss_ key is written in another form (or not at all): the model and VAE become *_name (file name
# only), metadata_* become modelspec.*, logging and GUI plumbing do not describe the training.
_OPTIONS_NOT_AS_SS = {"pretrained_model_name_or_path", "vae", "network_args", "no_metadata", "metadata_title",
                      "metadata_author", "metadata_description", "metadata_license", "metadata_tags"}
_GROUPS_NOT_AS_SS = {"logging"}
# Options whose ss_ key sd-scripts names differently
_SS_KEY_NAMES = {"debiased_estimation_loss": "ss_debiased_estimation"}


def base_model_version(family: str, v_prediction: bool) -> str:
    """ss_base_model_version of a family (e.g. 'sd_v1', 'sd_v2_v', 'sdxl_base_v1-0'), from its FamilySpec."""
    return family_spec(family).base_model_version_for(v_prediction)


def modelspec_architecture(family: str, v_prediction: bool, adapter: str = "lora") -> str:
    """modelspec.architecture, e.g. 'stable-diffusion-v2-768-v/lora' ('' adapter for a full model)."""
    return family_spec(family).architecture_for(v_prediction, adapter or None)


def _summary_value(summary: Any, key: str, default: Any = None) -> Any:
    if summary is None:
        return default
    if isinstance(summary, Mapping):
        return summary.get(key, default)
    return getattr(summary, key, default)


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _option_value(opt: option_schema.Option, value: Any) -> str:
    if opt.path and isinstance(value, str) and value:
        value = os.path.basename(os.path.normpath(value))  # never leak the user's folder layout
    return str(value)


def option_metadata(args: argparse.Namespace) -> dict[str, str]:
    """One ss_<name> key per schema option present in args (secrets, plumbing and re-shaped ones left out)."""
    out = {}
    for opt in option_schema.OPTIONS:
        if opt.secret or opt.name in _OPTIONS_NOT_AS_SS or opt.group in _GROUPS_NOT_AS_SS:
            continue
        if hasattr(args, opt.name):
            out[_SS_KEY_NAMES.get(opt.name, f"ss_{opt.name}")] = _option_value(opt, getattr(args, opt.name))
    return out


def _network_module(args: argparse.Namespace) -> str:
    """ss_network_module: the network trained, as sd-scripts names it (e.g. 'networks.lora', 'lycoris.kohya')."""
    from ..networks.registry import canonical_network_module

    return canonical_network_module(getattr(args, "network_module", None) or "networks.lora")


def _iso_date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat(timespec="seconds")


def modelspec_metadata(args: argparse.Namespace, *, family: str, v_prediction: bool, resolution: tuple[int, int],
                       timestamp: float, adapter: str = "lora") -> dict[str, str]:
    """modelspec.* keys (Stability AI model spec 1.0.1)."""
    title = getattr(args, "metadata_title", None) or getattr(args, "output_name", None) or "untitled"
    meta = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family, v_prediction, adapter),
        "modelspec.implementation": family_spec(family).modelspec_implementation,
        "modelspec.title": str(title),
        "modelspec.resolution": f"{int(resolution[0])}x{int(resolution[1])}",
        "modelspec.date": _iso_date(timestamp),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    for name in ("author", "description", "license", "tags"):
        value = getattr(args, f"metadata_{name}", None)
        if value:
            meta[f"modelspec.{name}"] = str(value)
    if getattr(args, "clip_skip", None):
        meta["modelspec.encoder_layer"] = str(args.clip_skip)
    min_t, max_t = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    if min_t is not None or max_t is not None:
        meta["modelspec.timestep_range"] = f"{0 if min_t is None else min_t},{1000 if max_t is None else max_t}"
    return meta


def build_training_metadata(args: argparse.Namespace, *, family: str, v_prediction: bool,
                            resolution: tuple[int, int], dataset_summary: Any, total_steps: int, epoch: int,
                            step: int, started_at: float, finished_at: float | None, sd_model_name: str,
                            network_args: dict[str, Any] | None = None,
                            extra: dict[str, Any] | None = None) -> dict[str, str]:
    """All ss_* and modelspec.* keys of a trained LoRA file (sshs_* hashes are added when the file is written).

    dataset_summary: a mapping or object with num_train_images, num_reg_images, tag_frequency ({dir: {tag: n}}),
    dataset_dirs ({dir: {n_repeats, img_count}}) and dataset_config (JSON text or data, or None).
    extra: more keys (values str()-ed) that win over the computed ones.
    """
    meta = option_metadata(args)
    optimizer_args = getattr(args, "optimizer_args", None)
    optimizer = str(getattr(args, "optimizer_type", None))
    tag_frequency = _summary_value(dataset_summary, "tag_frequency", {}) or {}
    tag_frequency = {d: {str(t).lower(): int(n) for t, n in tags.items()} for d, tags in tag_frequency.items()}
    meta.update({
        "ss_network_module": _network_module(args),
        "ss_network_dim": str(getattr(args, "network_dim", None)),
        "ss_network_alpha": str(getattr(args, "network_alpha", None)),
        "ss_v2": str(family_spec(family).ss_v2),
        "ss_base_model_version": base_model_version(family, v_prediction),
        "ss_sd_model_name": str(sd_model_name),
        "ss_output_name": str(getattr(args, "output_name", None)),
        "ss_resolution": str((int(resolution[0]), int(resolution[1]))),
        "ss_max_train_steps": str(total_steps),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_train_images": str(_summary_value(dataset_summary, "num_train_images", 0)),
        "ss_num_reg_images": str(_summary_value(dataset_summary, "num_reg_images", 0)),
        "ss_tag_frequency": _json(tag_frequency),
        "ss_dataset_dirs": _json(_summary_value(dataset_summary, "dataset_dirs", {}) or {}),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at),
        "ss_optimizer": optimizer + (f"({','.join(optimizer_args)})" if optimizer_args else ""),
    })
    vae = getattr(args, "vae", None)
    if vae:
        meta["ss_vae_name"] = os.path.basename(os.path.normpath(vae))
    dataset_config = _summary_value(dataset_summary, "dataset_config", None)
    if dataset_config is not None:
        meta["ss_datasets"] = _json(dataset_config)
    if network_args:
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else str(value)
    timestamp = finished_at if finished_at is not None else started_at
    meta.update(modelspec_metadata(args, family=family, v_prediction=v_prediction, resolution=resolution,
                                   timestamp=timestamp))
    return meta


def minimal_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """What --no_metadata keeps: ss_v2, ss_base_model_version, ss_network_module/dim/alpha/args, modelspec.*,
    sshs_*."""
    return {k: v for k, v in metadata.items()
            if k in MINIMAL_SS_KEYS or k.startswith("modelspec.") or k.startswith("sshs_")}


# ---- hashes
def _header_length(data: bytes) -> int:
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than 8 bytes")
    return struct.unpack("<Q", data[:8])[0]


def model_hash_of_bytes(data: bytes) -> str:
    """sha256 of a safetensors serialization's bytes after its header."""
    return hashlib.sha256(data[8 + _header_length(data):]).hexdigest()


def legacy_hash_of_bytes(data: bytes) -> str:
    """First 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB."""
    return hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def safetensors_model_hash(path: str | os.PathLike) -> str:
    """sshs_model_hash of a file on disk, read in chunks (what a reader computes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_model_hashes(path_or_tensors: str | os.PathLike | Mapping[str, Any],
                     metadata: Mapping[str, str]) -> dict[str, str]:
    """metadata plus sshs_model_hash and sshs_legacy_hash of the tensors (or of the tensors of a .safetensors file),
    as they will be written. Returns a new dict."""
    from safetensors.torch import save

    if isinstance(path_or_tensors, (str, os.PathLike)):
        from safetensors.torch import load_file

        tensors = load_file(os.fspath(path_or_tensors))
    else:
        tensors = {k: v.contiguous() for k, v in path_or_tensors.items()}
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(tensors, metadata=ss_only)
    out = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    out["sshs_model_hash"] = model_hash_of_bytes(blob)
    out["sshs_legacy_hash"] = legacy_hash_of_bytes(blob)
    return out
