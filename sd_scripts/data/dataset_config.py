"""Build the list of DatasetConfig a trainer trains on: from `--dataset_config` TOML, or from the folder convention
(`train_data_dir` / `reg_data_dir`). Checks bucket settings against the model family's size divisor."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from typing import Any

from ..errors import DatasetError
from ..options import parse_resolution
from .buckets import INTERPOLATIONS
from .captions import CaptionOptions
from .config_types import DatasetConfig, SubsetConfig
from .dataset_keys import ALIASES, ALLOWED_AT, KEYS
from .folders import scan_concept_folders

logger = logging.getLogger(__name__)

__all__ = ["DatasetConfig", "SubsetConfig", "load_datasets", "read_dataset_toml"]

_TABLE_NAMES = {"general": "[general]", "datasets": "[[datasets]]", "subsets": "[[datasets.subsets]]"}


class _Lookup:
    """Resolves a key through subset -> dataset -> general -> command line -> default."""

    def __init__(self, source: str, layers: list[dict[str, Any]], args: argparse.Namespace):
        self.source, self.layers, self.args = source, layers, args

    def get(self, name: str) -> Any:
        key = KEYS[name]
        for layer in self.layers:
            if name in layer:
                return self._parse(name, layer[name])
        if key.cli is not None:
            value = getattr(self.args, key.cli, None)
            if value is not None:
                return self._parse(name, value, from_cli=True)
        return key.default

    def _parse(self, name: str, value: Any, from_cli: bool = False) -> Any:
        try:
            if from_cli and name == "resolution":
                value = parse_resolution(value)
            return KEYS[name].parse(value)
        except ValueError as e:
            where = f"option --{KEYS[name].cli}" if from_cli else f"{self.source}: key '{name}'"
            raise DatasetError(f"{where} has value {value!r}: {e}") from None


def _check_keys(table: dict, level: str, path: str) -> dict:
    """The table with aliases resolved; an unknown or misplaced key is an error naming it and the file."""
    out = {}
    for key, value in table.items():
        if level != "subsets" and key in ("datasets", "subsets"):
            continue
        name = ALIASES.get(key, key)
        if name not in KEYS:
            raise DatasetError(f"{path}: unknown key '{key}' in {_TABLE_NAMES[level]}: check its spelling "
                               f"(dataset TOML keys are listed in FORMATS.md)")
        if name not in ALLOWED_AT[level]:
            home = "[[datasets.subsets]]" if KEYS[name].level == "subset_only" else "[general] or [[datasets]]"
            raise DatasetError(f"{path}: key '{key}' is not allowed in {_TABLE_NAMES[level]}: move it to {home}")
        out[name] = value
    return out


def read_dataset_toml(path: str) -> dict:
    """The parsed TOML; a missing or malformed file is a DatasetError naming it."""
    import tomllib

    if not os.path.isfile(path):
        raise DatasetError(f"dataset_config {path} does not exist: check the path given to --dataset_config")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"dataset_config {path} is not valid TOML: {e}") from None


def _caption_options(look: _Lookup) -> CaptionOptions:
    return CaptionOptions(
        prefix=look.get("caption_prefix"), suffix=look.get("caption_suffix"), shuffle=look.get("shuffle_caption"),
        separator=look.get("caption_separator"), keep_tokens=look.get("keep_tokens"),
        keep_tokens_separator=look.get("keep_tokens_separator"),
        secondary_separator=look.get("secondary_separator"), enable_wildcard=look.get("enable_wildcard"),
        dropout_rate=look.get("caption_dropout_rate"),
        dropout_every_n_epochs=look.get("caption_dropout_every_n_epochs"),
        tag_dropout_rate=look.get("caption_tag_dropout_rate"), token_warmup_min=look.get("token_warmup_min"),
        token_warmup_step=look.get("token_warmup_step"))


def _subset_options(base: SubsetConfig, look: _Lookup) -> SubsetConfig:
    """`base` with every option that the lookup chain supplies."""
    return replace(
        base, caption=_caption_options(look), flip_aug=look.get("flip_aug"), color_aug=look.get("color_aug"),
        random_crop=look.get("random_crop"), face_crop_aug_range=look.get("face_crop_aug_range"),
        cache_info=look.get("cache_info"), custom_attributes=look.get("custom_attributes") or {},
        resize_interpolation=look.get("resize_interpolation"))


def _dataset_options(look: _Lookup, subsets: list[SubsetConfig]) -> DatasetConfig:
    return DatasetConfig(
        resolution=look.get("resolution"), batch_size=look.get("batch_size"), enable_bucket=look.get("enable_bucket"),
        min_bucket_reso=look.get("min_bucket_reso"), max_bucket_reso=look.get("max_bucket_reso"),
        bucket_reso_steps=look.get("bucket_reso_steps"), bucket_no_upscale=look.get("bucket_no_upscale"),
        network_multiplier=look.get("network_multiplier"), validation_split=look.get("validation_split"),
        validation_seed=look.get("validation_seed"), resize_interpolation=look.get("resize_interpolation"),
        subsets=subsets)


def _resolve_path(value: str, toml_path: str) -> str:
    """A relative path is taken from the working directory (as sd-scripts does), else from the TOML's folder."""
    value = os.path.expanduser(value)
    if os.path.isabs(value) or os.path.exists(value):
        return os.path.abspath(value)
    return os.path.join(os.path.dirname(os.path.abspath(toml_path)), value)


def _subset_from_toml(look: _Lookup, path: str, where: str) -> SubsetConfig:
    image_dir, metadata_file = look.get("image_dir"), look.get("metadata_file")
    if image_dir is None and metadata_file is None:
        raise DatasetError(f"{path}: {where} has no image_dir: add image_dir = \"<folder of images>\"")
    if image_dir is not None:
        image_dir = _resolve_path(image_dir, path)
        if not os.path.isdir(image_dir):
            raise DatasetError(f"{path}: image_dir {image_dir} of {where} does not exist: check the path")
    if metadata_file is not None:
        metadata_file = _resolve_path(metadata_file, path)
        if not os.path.isfile(metadata_file):
            raise DatasetError(f"{path}: metadata_file {metadata_file} of {where} does not exist: check the path")
    mask_dir = look.get("conditioning_data_dir")
    if mask_dir is not None:
        mask_dir = _resolve_path(mask_dir, path)
        if not os.path.isdir(mask_dir):
            raise DatasetError(f"{path}: conditioning_data_dir {mask_dir} of {where} does not exist: check the path")
    base = SubsetConfig(image_dir=image_dir, num_repeats=look.get("num_repeats"),
                        class_tokens=look.get("class_tokens"), is_reg=look.get("is_reg"),
                        caption_extension=look.get("caption_extension"), alpha_mask=look.get("alpha_mask"),
                        metadata_file=metadata_file, conditioning_data_dir=mask_dir)
    return _subset_options(base, look)


def _from_toml(path: str, args: argparse.Namespace) -> list[DatasetConfig]:
    data = read_dataset_toml(path)
    for key in data:
        if key not in ("general", "datasets"):
            raise DatasetError(f"{path}: unknown top-level key '{key}': a dataset TOML holds [general] and "
                               f"[[datasets]] (with [[datasets.subsets]])")
    general = _check_keys(data.get("general", {}), "general", path)
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise DatasetError(f"{path}: no [[datasets]]: add a [[datasets]] table with at least one "
                           f"[[datasets.subsets]] holding image_dir")
    configs = []
    for i, raw_dataset in enumerate(datasets, 1):
        dataset = _check_keys(raw_dataset, "datasets", path)
        subsets_raw = raw_dataset.get("subsets", [])
        if not subsets_raw:
            raise DatasetError(f"{path}: [[datasets]] #{i} has no [[datasets.subsets]]: add one with image_dir")
        subsets = []
        for j, raw_subset in enumerate(subsets_raw, 1):
            subset = _check_keys(raw_subset, "subsets", path)
            look = _Lookup(path, [subset, dataset, general], args)
            subsets.append(_subset_from_toml(look, path, f"[[datasets.subsets]] #{j} of [[datasets]] #{i}"))
        configs.append(replace(_dataset_options(_Lookup(path, [dataset, general], args), subsets), source=path))
    return configs


def _from_folders(args: argparse.Namespace) -> list[DatasetConfig]:
    train_dir = getattr(args, "train_data_dir", None)
    if not train_dir:
        raise DatasetError("no training images: set train_data_dir (a folder of '<repeats>_<class tokens>' "
                           "folders) or dataset_config")
    look = _Lookup("command line", [], args)
    ext = look.get("caption_extension")
    bases = scan_concept_folders(train_dir, is_reg=False, caption_extension=ext)
    reg_dir = getattr(args, "reg_data_dir", None)
    if reg_dir:
        bases += scan_concept_folders(reg_dir, is_reg=True, caption_extension=ext)
    mask_dir = _cli_mask_dir(args)
    subsets = [replace(_subset_options(b, look), alpha_mask=bool(look.get("alpha_mask")),
                       conditioning_data_dir=_concept_mask_dir(mask_dir, b.image_dir) if mask_dir else None)
               for b in bases]
    return [_dataset_options(look, subsets)]


def _cli_mask_dir(args: argparse.Namespace) -> str | None:
    mask_dir = getattr(args, "conditioning_data_dir", None)
    if mask_dir is None:
        return None
    if not os.path.isdir(mask_dir):
        raise DatasetError(f"conditioning_data_dir {mask_dir} does not exist or is not a folder: check the path")
    return os.path.abspath(mask_dir)


def _concept_mask_dir(mask_dir: str, image_dir: str) -> str:
    """The masks of a concept folder: `<conditioning_data_dir>/<concept folder name>` when that folder exists, else
    conditioning_data_dir itself (one folder of masks for every concept)."""
    own = os.path.join(mask_dir, os.path.basename(os.path.normpath(image_dir)))
    return own if os.path.isdir(own) else mask_dir


def _from_metadata(args: argparse.Namespace) -> list[DatasetConfig]:
    """Fine-tuning: one subset of the images named in `in_json` (keys relative to train_data_dir, or absolute),
    repeated `dataset_repeats` times per epoch."""
    in_json = os.path.abspath(args.in_json)
    if not os.path.isfile(in_json):
        raise DatasetError(f"in_json {args.in_json} does not exist: build it with python -m "
                           f"sd_scripts.tools.build_metadata --train_data_dir DIR --out {args.in_json}")
    train_dir = getattr(args, "train_data_dir", None)
    if train_dir and not os.path.isdir(train_dir):
        raise DatasetError(f"train_data_dir {train_dir} does not exist or is not a folder: check the path")
    look = _Lookup("command line", [], args)
    base = SubsetConfig(image_dir=os.path.abspath(train_dir) if train_dir else None, metadata_file=in_json,
                        num_repeats=getattr(args, "dataset_repeats", None) or 1,
                        caption_extension=look.get("caption_extension"), alpha_mask=bool(look.get("alpha_mask")),
                        conditioning_data_dir=_cli_mask_dir(args))
    return [_dataset_options(look, [_subset_options(base, look)])]


def _adjust_to_steps(ds: DatasetConfig, where: str) -> DatasetConfig:
    step = ds.bucket_reso_steps
    low, high = ds.min_bucket_reso, ds.max_bucket_reso
    if low % step or high % step:
        low, high = low - low % step, high + (-high) % step
        logger.warning("%s: min_bucket_reso/max_bucket_reso are not multiples of bucket_reso_steps %d; using %d "
                       "and %d", where, step, low, high)
    return replace(ds, min_bucket_reso=low, max_bucket_reso=high)


def check_dataset(ds: DatasetConfig, divisor: int, where: str) -> DatasetConfig:
    """Bucket and size settings that the model family can train on; min/max snapped to the step."""
    step = ds.bucket_reso_steps
    if step < 1 or step % divisor:
        raise DatasetError(f"{where}: bucket_reso_steps {step} does not suit this model: use a multiple of "
                           f"{divisor}")
    if ds.batch_size < 1:
        raise DatasetError(f"{where}: batch_size {ds.batch_size} must be 1 or more")
    if not 0 <= ds.validation_split < 1:
        raise DatasetError(f"{where}: validation_split {ds.validation_split} must be at least 0 and below 1")
    interp = [s.resize_interpolation for s in ds.subsets] + [ds.resize_interpolation]
    for name in interp:
        if name is not None and name.lower() not in INTERPOLATIONS:
            raise DatasetError(f"{where}: resize_interpolation {name!r} is not one of {sorted(INTERPOLATIONS)}")
    for s in ds.subsets:
        _check_subset(s, where)
        if s.face_crop_aug_range is not None and ds.enable_bucket:
            logger.warning("%s: face_crop_aug_range of %s is ignored with enable_bucket (as in sd-scripts): images "
                           "are fitted to their buckets", where, s.image_dir or s.metadata_file)
    if ds.enable_bucket:
        ds = _adjust_to_steps(ds, where)
        w, h = ds.resolution
        if not ds.bucket_no_upscale and (ds.min_bucket_reso > min(w, h) or ds.max_bucket_reso < max(w, h)):
            raise DatasetError(f"{where}: resolution {w}x{h} lies outside min_bucket_reso {ds.min_bucket_reso} .. "
                               f"max_bucket_reso {ds.max_bucket_reso}: widen the bucket range")
    elif ds.resolution[0] % divisor or ds.resolution[1] % divisor:
        raise DatasetError(f"{where}: resolution {ds.resolution[0]}x{ds.resolution[1]} must be a multiple of "
                           f"{divisor} for this model: change it or set enable_bucket")
    return ds


def _check_subset(s: SubsetConfig, where: str) -> None:
    name = s.image_dir or s.metadata_file
    if s.num_repeats < 1:
        raise DatasetError(f"{where}: num_repeats {s.num_repeats} of {name} must be 1 or more")
    c = s.caption
    for key, rate in (("caption_dropout_rate", c.dropout_rate), ("caption_tag_dropout_rate", c.tag_dropout_rate)):
        if not 0 <= rate <= 1:
            raise DatasetError(f"{where}: {key} {rate} of {name} must be between 0 and 1")
    if s.alpha_mask and s.conditioning_data_dir:
        raise DatasetError(f"{where}: {name} sets both alpha_mask and conditioning_data_dir: a subset's loss mask "
                           f"comes from one of them; remove the other")


def load_datasets(args: argparse.Namespace, bucket_step_default: int) -> list[DatasetConfig]:
    """The datasets to train on. `bucket_step_default` is the model family's size divisor (64 for SD1/SD2, 32 for
    SDXL): bucket_reso_steps must be a multiple of it, and it is the step when none is given anywhere."""
    if getattr(args, "bucket_reso_steps", None) is None:
        args = argparse.Namespace(**{**vars(args), "bucket_reso_steps": bucket_step_default})
    config_path = getattr(args, "dataset_config", None)
    if config_path:
        if getattr(args, "train_data_dir", None) or getattr(args, "reg_data_dir", None):
            logger.warning("dataset_config %s is used; train_data_dir and reg_data_dir are ignored", config_path)
        configs = _from_toml(config_path, args)
        where = [f"{config_path} [[datasets]] #{i}" for i in range(1, len(configs) + 1)]
    elif getattr(args, "in_json", None):
        if getattr(args, "reg_data_dir", None):
            logger.warning("in_json %s is used: reg_data_dir is ignored (a metadata JSON dataset has no "
                           "regularisation images; use a dataset_config for both)", args.in_json)
        configs = _from_metadata(args)
        where = [f"in_json {args.in_json}"]
    else:
        configs = _from_folders(args)
        where = ["command line"]
    if config_path and getattr(args, "conditioning_data_dir", None):
        logger.warning("dataset_config %s is used; option conditioning_data_dir is ignored: set conditioning_data_dir "
                       "in each [[datasets.subsets]] whose images have masks", config_path)
    configs = [check_dataset(ds, bucket_step_default, w) for ds, w in zip(configs, where)]
    _check_masks(configs, getattr(args, "masked_loss", None), config_path)
    return configs


def _check_masks(configs: list[DatasetConfig], masked_loss: bool | None, config_path: str | None) -> None:
    """Mask images are for masked_loss, and masked_loss needs masks (sd-scripts would silently train unmasked).
    `masked_loss` is None for a trainer without the option."""
    subsets = [s for ds in configs for s in ds.subsets]
    with_dir = [s for s in subsets if s.conditioning_data_dir]
    if with_dir and masked_loss is None:
        raise DatasetError(f"conditioning_data_dir {with_dir[0].conditioning_data_dir}: this trainer has no "
                           f"masked_loss; use alpha_mask (the images' alpha channel) or remove conditioning_data_dir")
    if with_dir and not masked_loss:
        raise DatasetError(f"conditioning_data_dir {with_dir[0].conditioning_data_dir} holds loss masks, which are "
                           f"used with masked_loss: add --masked_loss (or remove conditioning_data_dir)")
    if masked_loss and not any(s.has_mask for s in subsets):
        fix = ("set conditioning_data_dir (mask images) or alpha_mask in the subsets of " + config_path
               if config_path else "give conditioning_data_dir (a folder of mask images) or alpha_mask")
        raise DatasetError(f"option masked_loss has no masks to use: {fix}")
