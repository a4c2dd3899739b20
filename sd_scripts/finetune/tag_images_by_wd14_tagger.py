"""Tag images with a WD14 tagger ONNX model (sd-scripts' finetune/tag_images_by_wd14_tagger.py), offline.

    python -m sd_scripts.finetune.tag_images_by_wd14_tagger TRAIN_DATA_DIR
        [--repo_id SmilingWolf/wd-v1-4-convnext-tagger-v2]
        [--model_dir wd14_tagger_model] [--thresh 0.35] [--general_threshold T] [--character_threshold T]
        [--undesired_tags "a,b"] [--append_tags] [--recursive] [--batch_size 1] [--caption_extension .txt]
        [--remove_underscore] [--tag_replacement "src,dst;src2,dst2"] [--character_tag_expand]
        [--character_tags_first] [--always_first_tags "1girl,1boy"] [--use_rating_tags[_as_last_tag]]
        [--caption_separator ", "] [--output_path captions.json|.jsonl] [--frequency_tags] [--debug] ...

The model is the folder `<model_dir>/<repo_id with / -> _>` (sd-scripts' layout) holding `model.onnx` and
`selected_tags.csv` (tag_id,name,category,count; category 9 rating, 0 general, 4 character; the model's outputs
are the rows in order), else that repository in the user's Hugging Face cache. A repo id with a sub-folder
(`owner/name/sub`) is the other layout sd-scripts reads: `model_optimized.onnx` + `tag_mapping.json`
({id: {tag, category}}, logits, categories Rating/General/Character/Copyright/Meta/Model/Quality/Artist). Nothing
is downloaded: a missing model is one line saying where to put it.

Images are composited on white, padded to a square with white, resized to the model's input size (read from the
model) and given as BGR 0..255 (NHWC; the sub-folder layout: NCHW in -1..1), run through onnxruntime (CUDA when
available). Tags whose confidence reaches the threshold of their category are kept (general and character by
default `--thresh`; a threshold above 1 turns a category off); the rating (and quality) with the highest confidence
is added with `--use_rating_tags` (first) / `--use_rating_tags_as_last_tag`. Names are processed (character
expansion, underscores, replacements) before `--undesired_tags` is applied. Caption files `<stem><ext>` are
written atomically (with `--append_tags`, new tags are added after the existing ones, without repeats); with
`--output_path` a JSON ({path: {tags, image_size}}) or JSONL file is written instead.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import UserError
from ..tools.tool_cli import ToolOption, run_tool, write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
CSV_FILE, ONNX_FILE = "selected_tags.csv", "model.onnx"
JSON_FILE, JSON_ONNX_FILE = "tag_mapping.json", "model_optimized.onnx"
CSV_CATEGORIES = {"9": "Rating", "0": "General", "4": "Character"}
CATEGORIES = ("Rating", "General", "Character", "Copyright", "Meta", "Model", "Quality", "Artist")

OPTIONS: tuple[ToolOption, ...] = (
    ToolOption("train_data_dir", str, None, "folder of the images to tag", positional=True, required=True,
               path="dir"),
    ToolOption("repo_id", str, DEFAULT_REPO, "tagger model: Hugging Face repository id (owner/name[/sub-folder])"),
    ToolOption("model_dir", str, "wd14_tagger_model", "folder of local tagger models (<model_dir>/<owner>_<name>)",
               path="dir"),
    ToolOption("force_download", bool, False, "refused: nothing is downloaded here"),
    ToolOption("batch_size", int, 1, "images per inference batch (a model with a fixed batch size uses its own)"),
    ToolOption("max_data_loader_n_workers", int, None, "threads reading images ahead"),
    ToolOption("output_path", str, None, "write the tags into this JSON (or .jsonl) file instead of caption files",
               path="out_file"),
    ToolOption("caption_extension", str, ".txt", "caption file extension", aliases=("caption_extention",)),
    ToolOption("thresh", float, 0.35, "confidence a tag needs"),
    ToolOption("general_threshold", float, None, "threshold of general tags (default --thresh)"),
    ToolOption("character_threshold", float, None, "threshold of character tags (default --thresh; above 1: none)"),
    ToolOption("meta_threshold", float, None, "threshold of meta tags (tag_mapping.json models; default --thresh)"),
    ToolOption("model_threshold", float, None, "threshold of model tags (tag_mapping.json models)"),
    ToolOption("copyright_threshold", float, None, "threshold of copyright tags (tag_mapping.json models)"),
    ToolOption("artist_threshold", float, None, "threshold of artist tags (tag_mapping.json models)"),
    ToolOption("recursive", bool, False, "also tag the images in sub-folders"),
    ToolOption("remove_underscore", bool, False, "replace underscores with spaces in tags (longer than 3 letters)"),
    ToolOption("debug", bool, False, "log the tags of every image by category"),
    ToolOption("undesired_tags", str, "", "tags never written, separated by the caption separator"),
    ToolOption("frequency_tags", bool, False, "print how often each tag was given"),
    ToolOption("onnx", bool, False, "accepted for sd-scripts command lines: ONNX is the only backend"),
    ToolOption("append_tags", bool, False, "add the tags to existing caption files instead of replacing them"),
    ToolOption("use_rating_tags", bool, False, "put the rating tag first"),
    ToolOption("use_rating_tags_as_last_tag", bool, False, "put the rating tag last"),
    ToolOption("use_quality_tags", bool, False, "put the quality tag first (tag_mapping.json models)"),
    ToolOption("use_quality_tags_as_last_tag", bool, False, "put the quality tag last (tag_mapping.json models)"),
    ToolOption("character_tags_first", bool, False, "put character tags before general tags"),
    ToolOption("always_first_tags", str, None, "tags put at the beginning when given, e.g. '1girl,1boy'"),
    ToolOption("caption_separator", str, ", ", "separator between tags"),
    ToolOption("tag_replacement", str, None, "replacements 'src,dst;src2,dst2' (escape , and ; as \\, and \\;)"),
    ToolOption("character_tag_expand", bool, False, "'name_(series)' character tags become 'name, series'"),
)


# ------------------------------------------------------------------ tag names
def remove_underscore(tag: str) -> str:
    return tag.replace("_", " ") if len(tag) > 3 else tag  # short tags are emoticons such as ^_^


def parse_tag_replacement(text: str | None) -> dict[str, str]:
    """'a,b;c\\,d,e' -> {'a': 'b', 'c,d': 'e'}."""
    if not text:
        return {}
    escaped = text.replace("\\,", "\0c").replace("\\;", "\0s")
    out = {}
    for item in filter(None, escaped.split(";")):
        parts = item.split(",")
        if len(parts) != 2:
            raise UserError(f"--tag_replacement {item!r} is not 'source,target' (escape commas in tags as \\,)")
        source, target = (p.replace("\0c", ",").replace("\0s", ";").strip() for p in parts)
        out[source] = target
    return out


def expand_character(tag: str, separator: str) -> str:
    """'name_(series)' -> 'name<sep>series'; 'name_(costume)_(series)' -> 'name_(costume)<sep>series'."""
    if not tag.endswith(")") or "(" not in tag:
        return tag
    head, _, tail = tag.rpartition("(")
    return head.rstrip("_") + separator + tail[:-1]


@dataclass
class TagSet:
    """The model's output labels: name and category of each output index, and whether outputs are logits."""

    names: list[str]
    categories: list[str]
    logits: bool = False  # tag_mapping.json models output logits (sigmoid applied here)
    channels_first: bool = False  # and take NCHW input in -1..1

    def process_names(self, args) -> None:
        replace = parse_tag_replacement(args.tag_replacement)
        for i, (name, category) in enumerate(zip(self.names, self.categories)):
            if category == "Character" and args.character_tag_expand:
                name = expand_character(name, args.caption_separator)
            if args.remove_underscore:
                name = remove_underscore(name)
            self.names[i] = replace.get(name, name)


def read_selected_tags(path: str) -> TagSet:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}): download the tagger's selected_tags.csv again") from None
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise UserError(f"{path}: not a WD14 selected_tags.csv (header tag_id,name,category,count)")
    names, categories = [], []
    for row in rows[1:]:
        names.append(row[1])
        categories.append(CSV_CATEGORIES.get(row[2], "Other"))
    return TagSet(names, categories)


def read_tag_mapping(path: str) -> TagSet:
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
        items = sorted((int(k), v["tag"], v["category"]) for k, v in mapping.items())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a tag mapping {{id: {{tag, category}}}} ({e}); download it again") from None
    size = items[-1][0] + 1 if items else 0
    names, categories = [""] * size, ["Other"] * size
    for index, tag, category in items:
        if category not in CATEGORIES:
            raise UserError(f"{path}: unknown category {category!r} of tag {tag!r}")
        names[index], categories[index] = tag, category
    return TagSet(names, categories, logits=True, channels_first=True)


# ------------------------------------------------------------------ model
def locate_model(repo_id: str, model_dir: str) -> tuple[str, str, TagSet]:
    """(onnx path, folder, tags) of the tagger, from <model_dir>/<owner>_<name>[/sub] or the HF cache."""
    from .model_files import hub_cache_dir

    parts = repo_id.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    onnx_name, tags_name = (JSON_ONNX_FILE, JSON_FILE) if sub else (ONNX_FILE, CSV_FILE)
    folder = os.path.join(model_dir, repo.replace("/", "_"), *([sub] if sub else []))
    if not all(os.path.isfile(os.path.join(folder, n)) for n in (onnx_name, tags_name)):
        cached = hub_cache_dir(repo, (onnx_name, tags_name), sub) if len(parts) >= 2 else None
        if cached is None:
            raise UserError(f"WD14 tagger {repo_id!r} not found: put {onnx_name} and {tags_name} in {folder} (or "
                            f"`huggingface-cli download {repo}` into the Hugging Face cache); nothing is downloaded "
                            f"here")
        folder = cached
    tags_path = os.path.join(folder, tags_name)
    tags = read_tag_mapping(tags_path) if sub else read_selected_tags(tags_path)
    return os.path.join(folder, onnx_name), folder, tags


def open_session(onnx_path: str):
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available][:1] + \
        ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(onnx_path, providers=providers)
    except Exception as e:  # noqa: BLE001 - a broken or foreign file
        raise UserError(f"{onnx_path} cannot be loaded by onnxruntime ({str(e).splitlines()[0][:160]}): download "
                        f"the tagger again") from None


def input_layout(session, tags: TagSet) -> tuple[str, int, int | None]:
    """(input name, image size, fixed batch size or None) from the model's input shape."""
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    size = shape[2] if tags.channels_first else shape[1]
    if not isinstance(size, int) or size < 1:
        size = 448  # WD14's size when the graph does not say
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return inp.name, size, batch


def preprocess(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """float32 [size, size, 3] BGR 0..255: composited on white, padded to a square with white, resized."""
    try:
        with Image.open(path) as img:
            img.load()
            original = img.size
            has_alpha = img.mode in ("RGBA", "LA") or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"image {path} cannot be read ({e}): re-save it or remove it") from None
    if has_alpha:
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.split()[3])
        img = background
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    shrink = side >= size
    square = square.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy(), original


# ------------------------------------------------------------------ choosing tags
@dataclass
class Thresholds:
    general: float
    character: float
    other: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args) -> "Thresholds":
        pick = (lambda v: args.thresh if v is None else v)
        return cls(pick(args.general_threshold), pick(args.character_threshold),
                   {"Copyright": pick(args.copyright_threshold), "Meta": pick(args.meta_threshold),
                    "Model": pick(args.model_threshold), "Artist": pick(args.artist_threshold)})

    def of(self, category: str) -> float | None:
        if category == "General":
            return self.general
        if category == "Character":
            return self.character
        return self.other.get(category)


def choose_tags(probs: np.ndarray, tags: TagSet, args, thresholds: Thresholds, undesired: set[str]) -> dict:
    """{'tags': ordered list, 'by_category': {category: [tags]}} of one image's confidences."""
    if tags.logits:
        probs = 1.0 / (1.0 + np.exp(-probs))
    chosen: list[tuple[str, float, str]] = []
    best = {}  # Rating / Quality: the most confident one
    for i, p in enumerate(probs[: len(tags.names)]):
        name, category = tags.names[i], tags.categories[i]
        if not name or name in undesired:
            continue
        if category in ("Rating", "Quality"):
            if category not in best or p > best[category][1]:
                best[category] = (name, float(p))
            continue
        threshold = thresholds.of(category)
        if threshold is not None and p >= threshold:
            chosen.append((name, float(p), category))
    if tags.logits:  # tag_mapping models: most confident first, as sd-scripts orders them
        chosen.sort(key=lambda t: t[1], reverse=True)
    if args.character_tags_first:
        chosen = [t for t in chosen if t[2] == "Character"] + [t for t in chosen if t[2] != "Character"]
    ordered = [t[0] for t in chosen]
    by_category: dict[str, list[str]] = {}
    for name, _p, category in chosen:
        by_category.setdefault(category, []).append(name)
    for category, first, last in (("Quality", args.use_quality_tags, args.use_quality_tags_as_last_tag),
                                  ("Rating", args.use_rating_tags, args.use_rating_tags_as_last_tag)):
        if category in best:
            by_category[category] = [best[category][0]]
            if last:
                ordered.append(best[category][0])
            elif first:
                ordered.insert(0, best[category][0])
    if args.always_first_tags:
        sep = args.caption_separator.strip() or ","
        first_tags = [t.strip() for t in args.always_first_tags.split(sep) if t.strip()]
        present = [t for t in first_tags if t in ordered]
        ordered = present + [t for t in ordered if t not in present]
    return {"tags": ordered, "by_category": by_category}


def merge_existing(path: str, new_tags: list[str], separator: str) -> list[str]:
    """--append_tags: the caption file's tags followed by the new ones it does not have."""
    if not os.path.isfile(path):
        return new_tags
    with open(path, encoding="utf-8") as f:
        existing = [t.strip() for t in f.read().strip("\n").split(separator.strip() or ",") if t.strip()]
    return existing + [t for t in new_tags if t not in existing]


# ------------------------------------------------------------------ the run
def tag_images(args) -> dict[str, dict]:
    from ..tools.build_metadata import find_images

    if args.force_download:
        raise UserError("--force_download: models are never downloaded here; download the tagger with "
                        "`huggingface-cli download` or copy it into --model_dir, then run without --force_download")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, not {args.batch_size}")
    images = find_images(args.train_data_dir, args.recursive)
    if not images:
        raise UserError(f"no images (png, jpg, jpeg, webp, bmp) in {args.train_data_dir}")
    onnx_path, _folder, tags = locate_model(args.repo_id, args.model_dir)
    tags.process_names(args)
    session = open_session(onnx_path)
    input_name, size, fixed_batch = input_layout(session, tags)
    batch_size = fixed_batch or args.batch_size
    if fixed_batch and fixed_batch != args.batch_size:
        log.warning("the model takes batches of %d images: --batch_size %d is not used", fixed_batch, args.batch_size)
    thresholds = Thresholds.from_args(args)
    sep = args.caption_separator
    undesired = {t.strip() for t in args.undesired_tags.split(sep.strip() or ",") if t.strip()}
    frequency: Counter = Counter()
    results: dict[str, dict] = {}
    workers = args.max_data_loader_n_workers
    with ThreadPoolExecutor(max_workers=max(1, workers or 1)) as pool:
        loaded = pool.map(lambda p: preprocess(p, size), images) if workers else (preprocess(p, size) for p in images)
        batch: list[tuple[str, np.ndarray, tuple[int, int]]] = []
        for path, (pixels, original) in zip(images, loaded):
            batch.append((path, pixels, original))
            if len(batch) == batch_size or path == images[-1]:
                _run_batch(session, input_name, batch, batch_size if fixed_batch else len(batch), tags, args,
                           thresholds, undesired, frequency, results)
                batch = []
    if args.output_path:
        _write_output(args.output_path, results)
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, count in frequency.most_common():
            print(f"{tag}: {count}")
    return results


def _run_batch(session, input_name, batch, padded_size, tags: TagSet, args, thresholds, undesired, frequency,
               results) -> None:
    pixels = np.stack([b[1] for b in batch])
    if len(batch) < padded_size:  # a model with a fixed batch size: pad, then drop the padding's outputs
        pixels = np.concatenate([pixels, np.zeros((padded_size - len(batch), *pixels.shape[1:]), np.float32)])
    if tags.channels_first:
        pixels = pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0
    probs = session.run(None, {input_name: pixels.astype(np.float32)})[0][: len(batch)]
    for (path, _pixels, original), prob in zip(batch, probs):
        found = choose_tags(np.asarray(prob, dtype=np.float32), tags, args, thresholds, undesired)
        frequency.update(found["tags"])
        caption_path = os.path.splitext(path)[0] + args.caption_extension
        tag_list = merge_existing(caption_path, found["tags"], args.caption_separator) if args.append_tags \
            else found["tags"]
        text = args.caption_separator.join(tag_list)
        if args.output_path:
            results[path] = {"tags": text, "image_size": list(original)}
        else:
            write_text_atomic(caption_path, text + "\n")
            results[path] = {"tags": text, "image_size": list(original)}
        if args.debug:
            log.info("%s:", path)
            for category, names in found["by_category"].items():
                log.info("\t%s tags: %s", category, args.caption_separator.join(names))


def _write_output(path: str, results: dict[str, dict]) -> None:
    if path.endswith(".jsonl"):
        text = "".join(json.dumps({"image_path": p, "caption": e["tags"], "image_size": e["image_size"]},
                                  ensure_ascii=False) + "\n" for p, e in results.items())
    else:
        text = json.dumps(results, ensure_ascii=False, indent=4)
    write_text_atomic(path, text)
    log.info("captions saved to %s", path)


def run(args) -> None:
    results = tag_images(args)
    log.info("tagged %d images", len(results))


def main(argv: list[str] | None = None) -> int:
    return run_tool("python -m sd_scripts.finetune.tag_images_by_wd14_tagger",
                    "Tag images with a WD14 tagger (ONNX).", OPTIONS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
