"""Rebuild the bundled CLIP tokenizer files from the BPE list inside the open_clip_torch wheel.

Run once (the output is committed under sd_scripts/models/configs/tokenizer/):

    python -m sd_scripts.tools.build_tokenizer --wheel /tmp/wheels/open_clip_torch-*.whl

The vocabulary follows from the merge list: the 256 byte characters, the same with '</w>', every merge joined, then
the two special tokens (49408 ids). merges.txt gets a '#version: 0.2' header because CLIPTokenizer skips line 1.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import tempfile
import zipfile

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "configs",
                           "tokenizer")


def byte_characters() -> list[str]:
    """GPT-2/CLIP byte-to-unicode characters in vocabulary order: printable bytes as themselves, then the other
    bytes mapped to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def read_bpe_lines(wheel: str) -> list[str]:
    """The lines of the gzip BPE list inside the wheel (or a .txt.gz / .txt path)."""
    if wheel.endswith((".whl", ".zip")):
        with zipfile.ZipFile(wheel) as z:
            data = gzip.decompress(z.read(BPE_MEMBER))
    elif wheel.endswith(".gz"):
        with gzip.open(wheel, "rb") as f:
            data = f.read()
    else:
        with open(wheel, "rb") as f:
            data = f.read()
    return data.decode("utf-8").split("\n")


def build_files(lines: list[str]) -> dict[str, str]:
    """File name -> text of the four tokenizer files."""
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = byte_characters()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"the BPE list gives {len(vocab)} tokens instead of {VOCAB_SIZE}: wrong file?")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    config = dict(special, add_prefix_space=False, clean_up_tokenization_spaces=True, do_lower_case=True,
                  errors="replace", model_max_length=MAX_LENGTH, tokenizer_class="CLIPTokenizer")
    return {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


def write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_scripts.tools.build_tokenizer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", required=True, help="open_clip_torch wheel (a glob is accepted) or the .txt.gz")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: the bundled tokenizer folder)")
    args = parser.parse_args(argv)
    found = sorted(glob.glob(args.wheel))
    if not found:
        print(f"error: {args.wheel}: no such file; pass the open_clip_torch wheel with --wheel", file=sys.stderr)
        return 1
    try:
        files = build_files(read_bpe_lines(found[-1]))
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
        print(f"error: {found[-1]}: cannot read the BPE list ({e}); pass an open_clip_torch wheel", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for name, text in files.items():
        write_atomic(os.path.join(args.out, name), text)
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
