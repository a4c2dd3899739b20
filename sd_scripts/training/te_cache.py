"""Text-encoder output cache: encode every caption once before training (cache_text_encoder_outputs[_to_disk]).

With frozen text encoders and captions that never change, each caption's conditioning is a constant: it is
encoded once, before the first step, and the encoders are moved off the accelerator to the CPU (the loop frees
them when no sample images need them). Families that support it say so (FamilySpec.text_encoder_cache; the
others, e.g. SD 1.x/2.x, memoise frozen
encodings on their own).

On disk (`cache_text_encoder_outputs_to_disk`), one file per image next to it: `<image stem>_te_outputs.npz`
(sd-scripts' name) with sd-scripts' keys `hidden_state1` [L, 768] and `hidden_state2` [L, 1280] (the penultimate
states of text encoders 1 and 2, L = 77 or 2 + max_token_length) and `pool2` [1280] (the pooled, projected output
of text encoder 2), all float32, plus ours: `caption` (the exact text encoded) and `text_encoder_id` (a hash of
both encoders' weights, the tokenizers' sizes and max_token_length). A file is reused only when both still match;
otherwise it is re-encoded and replaced (with skip_cache_check, any file with the three arrays is trusted).

Refused, with a one-line OptionError saying what to change, when captions change between draws (shuffle, caption
or tag dropout, token warmup, wildcards) or when a text encoder is trained.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..options import OptionError

log = logging.getLogger(__name__)

# (schema option, CaptionOptions attribute, what it does): each makes a caption differ between draws
VARYING_CAPTION_OPTIONS = (
    ("shuffle_caption", "shuffle", "shuffles the tags"),
    ("caption_dropout_rate", "dropout_rate", "drops whole captions"),
    ("caption_dropout_every_n_epochs", "dropout_every_n_epochs", "drops whole captions"),
    ("caption_tag_dropout_rate", "tag_dropout_rate", "drops tags"),
    ("token_warmup_step", "token_warmup_step", "adds tags step by step"),
    ("enable_wildcard", "enable_wildcard", "picks random caption lines"),
)
_SAMPLES_PER_TENSOR = 2048


def _option_name(args) -> str:
    return "cache_text_encoder_outputs" + ("_to_disk" if getattr(args, "cache_text_encoder_outputs_to_disk", False)
                                           and not getattr(args, "cache_text_encoder_outputs", False) else "")


def wanted(args) -> bool:
    """Whether the run caches text-encoder outputs (the _to_disk option implies caching, as in sd-scripts)."""
    return bool(getattr(args, "cache_text_encoder_outputs", False)
                or getattr(args, "cache_text_encoder_outputs_to_disk", False))


#: whole-caption dropout: a family whose cache takes it (FamilySpec.te_cache_caption_dropout) encodes "" once more
CAPTION_DROPOUT_OPTIONS = ("caption_dropout_rate", "caption_dropout_every_n_epochs")


def _varying(values: Any, source: str, caption_dropout: bool = False) -> str | None:
    for option, attribute, effect in VARYING_CAPTION_OPTIONS:
        if caption_dropout and option in CAPTION_DROPOUT_OPTIONS:
            continue
        if getattr(values, option if source == "args" else attribute, None):
            return f"{option} {effect}"
    return None


def check_options(args, *, trains_text_encoder: bool, trainer: str = "network", caption_dropout: bool = False) -> None:
    """Refuse caching up front when the command line makes captions vary or trains a text encoder
    (`caption_dropout`: the model's family caches whole-caption dropout, see CAPTION_DROPOUT_OPTIONS)."""
    if not wanted(args):
        return
    option = _option_name(args)
    if trains_text_encoder:
        fix = ("add network_train_unet_only (or set text_encoder_lr 0)" if trainer == "network"
               else "stop training the text encoder")
        raise OptionError(f"option '{option}' needs frozen text encoders, but this run trains them: {fix}, or "
                          f"turn {option} off")
    reason = _varying(args, "args", caption_dropout)
    if reason:
        raise OptionError(f"option '{option}' needs captions that are the same on every draw, but {reason}: turn "
                          f"{reason.split()[0]} off, or turn {option} off")


def check_dataset(dataset, args, caption_dropout: bool = False) -> None:
    """The same check for subsets of a dataset TOML, which can set caption options of their own."""
    option = _option_name(args)
    for _, subset in dataset.subsets:
        reason = _varying(subset.caption, "subset", caption_dropout)
        if reason:
            where = subset.image_dir or subset.metadata_file
            raise OptionError(f"option '{option}' needs captions that are the same on every draw, but {reason} in "
                              f"subset {where!r}: turn {reason.split()[0]} off there, or turn {option} off")


def te_outputs_path(image_path: str, suffix: str = "_te_outputs.npz") -> str:
    """`<image stem>_te_outputs.npz` next to the image."""
    return os.path.splitext(image_path)[0] + suffix


def text_encoder_id(text_encoders, tokenizers, max_length: int) -> str:
    """A short, stable id of what the outputs depend on: every text-encoder tensor's name and shape plus a strided
    sample of its values, the tokenizers' vocabulary sizes and the token length."""
    digest = hashlib.sha256(f"len={max_length};".encode())
    for i, (te, tok) in enumerate(zip(text_encoders, tokenizers)):
        digest.update(f"te{i};vocab={len(tok)};".encode())
        for name, tensor in sorted(te.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
            digest.update(flat[::step][:_SAMPLES_PER_TENSOR].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def image_captions(dataset) -> list[tuple[str, str]]:
    """(image path, the caption every draw gives when not dropped) for each image of the dataset (captions must be
    fixed but for whole-caption dropout, whose "" is encoded apart)."""
    import dataclasses

    from ..data.captions import process_caption

    out = []
    for rec in dataset.records:
        options = dataclasses.replace(dataset.subsets[rec.subset_index][1].caption, dropout_rate=0.0,
                                      dropout_every_n_epochs=0)
        out.append((rec.path, process_caption(rec.caption, options, random.Random(0), 1, 0, 0)))
    return out


def _drops_captions(dataset) -> bool:
    return any(s.caption.dropout_rate or s.caption.dropout_every_n_epochs for _, s in dataset.subsets)


def _read(path: str, caption: str, te_id: str, skip_check: bool) -> dict[str, np.ndarray] | None:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - a broken file is re-made
        log.warning("text-encoder cache %s is unreadable (%s); it will be re-made", path, e)
        return None
    if not skip_check and (str(arrays.get("caption", "")) != caption
                           or str(arrays.get("text_encoder_id", "")) != te_id):
        return None
    return arrays


def _write(path: str, arrays: dict[str, np.ndarray], caption: str, te_id: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, caption=np.array(caption), text_encoder_id=np.array(te_id))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@dataclass
class TECacheReport:
    """What caching did: distinct captions, captions encoded now, image files reused and written."""

    captions: int = 0
    encoded: int = 0
    reused: int = 0
    written: int = 0


def _cache(family, items: list[tuple[str, str]], *, to_disk: bool, write: bool, skip_check: bool,
           te_id: str, batch_size: int) -> TECacheReport:
    report = TECacheReport(captions=len({c for _, c in items}))
    stale = []
    if to_disk:
        for path, caption in items:
            npz = te_outputs_path(path, family.te_cache_suffix)
            arrays = _read(npz, caption, te_id, skip_check)
            cond = family.from_cache_arrays(arrays) if arrays is not None else None
            if cond is None:
                stale.append((npz, caption))
                continue
            family.remember([caption], type(cond).stack([cond]))
            report.reused += 1
    else:
        stale = [(None, caption) for _, caption in items]
    todo = list(dict.fromkeys(caption for _, caption in stale))
    report.encoded = len(todo)
    family.encode_all(todo, batch_size=batch_size)
    if to_disk and write:
        for npz, caption in stale:
            cond = family.encode_captions([caption], train_text_encoder=False)[0]
            _write(npz, family.cache_arrays(cond), caption, te_id)
            report.written += 1
    return report


DEFAULT_BATCH_SIZE = 16  # captions per text-encoder batch while caching (text_encoder_batch_size sets it)


def cache_text_encoder_outputs(family, dataset, args, accelerator) -> TECacheReport | None:
    """Encode every caption of `dataset` once with the frozen encoders (memoised in `family`), reading and
    writing `<stem>_te_outputs.npz` files with cache_text_encoder_outputs_to_disk (written by the main process,
    read by the others). Afterwards the encoders move to the CPU (the loop frees them when nothing needs them; sample
    images move them back for a moment). Returns None when the run does not cache."""
    if not wanted(args):
        return None
    option = _option_name(args)
    if not family.spec.text_encoder_cache:
        raise OptionError(f"option '{option}' is not available for {family.spec.label} models (they already encode "
                          f"each fixed caption only once): turn {option} off")
    caption_dropout = bool(getattr(family.spec, "te_cache_caption_dropout", False))
    check_dataset(dataset, args, caption_dropout)
    bundle = family.bundle
    to_disk = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
    items = image_captions(dataset)
    te_id = text_encoder_id(bundle.text_encoders, bundle.tokenizers, family.max_length)
    if getattr(family, "weighted_captions", False):  # weighted captions encode to other states
        te_id += "+weighted"
    kwargs = dict(to_disk=to_disk, skip_check=bool(getattr(args, "skip_cache_check", False)), te_id=te_id,
                  batch_size=int(getattr(args, "text_encoder_batch_size", None) or DEFAULT_BATCH_SIZE))
    with torch.no_grad():
        if to_disk:  # the main process writes the files, the others read them
            if accelerator.is_main_process:
                report = _cache(family, items, write=True, **kwargs)
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                report = _cache(family, items, write=False, **kwargs)
        else:
            report = _cache(family, items, write=False, **kwargs)
        if caption_dropout and _drops_captions(dataset):  # a dropped caption's conditioning: "" encoded
            family.encode_all([""])
    for te in bundle.text_encoders:  # off the accelerator; sampling moves them back for a moment
        te.to("cpu")
    log.info("text-encoder outputs: %d captions, %d encoded, %d files reused, %d written", report.captions,
             report.encoded, report.reused, report.written)
    return report
