"""The keys of the dataset TOML: where each may appear, its type, its default and its command-line twin.

FORMATS.md ("Dataset config TOML") lists them. A key is looked up subset -> dataset -> general -> command line ->
default; a key that is not listed here is an error, never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..options import parse_face_crop_range, parse_resolution


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected a whole number")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("expected a number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string in quotes")
    return v


def _resolution(v: Any) -> tuple[int, int]:
    if isinstance(v, bool):
        raise ValueError("expected a size such as 512 or [768, 512]")
    return parse_resolution(v)


def _float_pair(v: Any) -> tuple[float, float]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError("expected two numbers such as [2.0, 4.0]")
        v = (_float(v[0]), _float(v[1]))
    return parse_face_crop_range(v)


def _table(v: Any) -> dict:
    if not isinstance(v, dict):
        raise ValueError("expected a table such as { key = \"value\" }")
    return dict(v)


@dataclass(frozen=True)
class DatasetKey:
    """One dataset TOML key."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    level: str  # "dataset" (general/dataset), "subset" (any level) or "subset_only"
    cli: str | None = None  # the command-line option it falls back to (None: no fallback)


_K = DatasetKey
KEYS: dict[str, DatasetKey] = {k.name: k for k in (
    # dataset level
    _K("batch_size", _int, 1, "dataset", "train_batch_size"),
    _K("resolution", _resolution, (512, 512), "dataset", "resolution"),
    _K("enable_bucket", _bool, False, "dataset", "enable_bucket"),
    _K("min_bucket_reso", _int, 256, "dataset", "min_bucket_reso"),
    _K("max_bucket_reso", _int, 1024, "dataset", "max_bucket_reso"),
    _K("bucket_reso_steps", _int, 64, "dataset", "bucket_reso_steps"),
    _K("bucket_no_upscale", _bool, False, "dataset", "bucket_no_upscale"),
    _K("network_multiplier", _float, 1.0, "dataset", "network_multiplier"),
    _K("validation_split", _float, 0.0, "dataset", "validation_split"),
    _K("validation_seed", _int, None, "dataset", "validation_seed"),
    # subset level (also allowed at dataset and general level)
    _K("resize_interpolation", _str, None, "subset", "resize_interpolation"),
    _K("num_repeats", _int, 1, "subset"),
    _K("class_tokens", _str, None, "subset"),
    _K("caption_extension", _str, ".caption", "subset", "caption_extension"),
    _K("cache_info", _bool, False, "subset", "cache_info"),
    _K("shuffle_caption", _bool, False, "subset", "shuffle_caption"),
    _K("caption_separator", _str, ",", "subset", "caption_separator"),
    _K("keep_tokens", _int, 0, "subset", "keep_tokens"),
    _K("keep_tokens_separator", _str, "", "subset", "keep_tokens_separator"),
    _K("secondary_separator", _str, None, "subset", "secondary_separator"),
    _K("enable_wildcard", _bool, False, "subset", "enable_wildcard"),
    _K("color_aug", _bool, False, "subset", "color_aug"),
    _K("flip_aug", _bool, False, "subset", "flip_aug"),
    _K("face_crop_aug_range", _float_pair, None, "subset", "face_crop_aug_range"),
    _K("random_crop", _bool, False, "subset", "random_crop"),
    _K("caption_prefix", _str, None, "subset", "caption_prefix"),
    _K("caption_suffix", _str, None, "subset", "caption_suffix"),
    _K("token_warmup_min", _int, 1, "subset", "token_warmup_min"),
    _K("token_warmup_step", _float, 0.0, "subset", "token_warmup_step"),
    _K("caption_dropout_rate", _float, 0.0, "subset", "caption_dropout_rate"),
    _K("caption_dropout_every_n_epochs", _int, 0, "subset", "caption_dropout_every_n_epochs"),
    _K("caption_tag_dropout_rate", _float, 0.0, "subset", "caption_tag_dropout_rate"),
    _K("custom_attributes", _table, None, "subset"),
    # subset only
    _K("image_dir", _str, None, "subset_only"),
    _K("is_reg", _bool, False, "subset_only"),
    _K("alpha_mask", _bool, False, "subset_only", "alpha_mask"),
    _K("conditioning_data_dir", _str, None, "subset_only"),  # mask images (masked_loss), as sd-scripts' ControlNet subsets
    _K("metadata_file", _str, None, "subset_only"),
)}



def _schema_default(key: DatasetKey) -> DatasetKey:
    """A key with a command-line twin in the option schema takes its default from there (declared once)."""
    from ..options import BY_NAME

    opt = BY_NAME.get(key.cli) if key.cli else None
    if opt is None:
        return key
    default = None if opt.default is None else key.parse(opt.default)
    return DatasetKey(key.name, key.parse, default, key.level, key.cli)


KEYS = {name: _schema_default(key) for name, key in KEYS.items()}

ALIASES = {"caption_extention": "caption_extension"}

# Which keys each TOML table may hold.
ALLOWED_AT = {
    "general": {n for n, k in KEYS.items() if k.level != "subset_only"},
    "datasets": {n for n, k in KEYS.items() if k.level != "subset_only"},
    "subsets": {n for n, k in KEYS.items() if k.level != "dataset"},
}
