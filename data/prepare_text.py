#!/usr/bin/env python
"""Prepare any UTF-8 text file as a spikegpt token dataset.

    python data/prepare_text.py --input corpus.txt --out data/corpus-byte
    python data/prepare_text.py --input corpus.txt --out data/corpus-char --vocab char --test-fraction 0.05
    python data/prepare_text.py --input wiki.txt --out data/wiki-neox --vocab bpe --tokenizer 20B_tokenizer.json

The splits are contiguous: train first, then val (``--val-fraction`` of the bytes), then test
(``--test-fraction``, default none) at the end; boundaries are moved to UTF-8 character starts. ``byte``
accepts any file; ``char`` and ``bpe`` need valid UTF-8. With ``char`` the vocabulary is the characters of
the train split plus one unknown id (the last id) for val/test characters missing from it. See
``docs/data.md`` for the output format.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import spikegpt  # noqa: F401
except ImportError:  # running from a checkout: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spikegpt.data import DataError, format_summary, prepare_splits  # noqa: E402
from spikegpt.cli import fraction, new_parser, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        "data/prepare_text.py",
        "Tokenise a UTF-8 text file into a spikegpt dataset directory (train/val[/test] + meta.json).")
    p.add_argument("--input", required=True, help="text file to prepare")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--vocab", choices=("byte", "char", "bpe"), default="byte",
                   help="byte: 256 UTF-8 byte ids (default); char: Unicode characters of the train split "
                        "+ an unknown id; bpe: a tokenizers JSON given with --tokenizer")
    p.add_argument("--tokenizer", help="tokenizer.json for --vocab bpe (e.g. the GPT-NeoX 20B_tokenizer.json)")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="fraction of the bytes for val (default 0.1)")
    p.add_argument("--test-fraction", type=fraction, default=0.0,
                   help="fraction of the bytes for a test split at the end (default 0: no test split)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset in --out that was prepared from different inputs")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), prepare, argv)


def prepare(args: argparse.Namespace) -> int:
    if args.tokenizer and args.vocab != "bpe":
        raise DataError("--tokenizer is only used with --vocab bpe")
    path = Path(args.input)
    if not path.is_file():
        raise DataError(f"input file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    data = path.read_bytes()
    if not data:
        raise DataError(f"input file {path} is empty")
    meta = prepare_splits(
        data, args.out, args.vocab,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        source=f"text file {path.name} ({len(data):,} bytes)",
        overwrite=args.overwrite,
        extra_meta={"input_name": path.name},
        log=print,
        inputs=[path],
    )
    print(format_summary(meta, os.fspath(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
