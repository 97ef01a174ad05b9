#!/usr/bin/env python
"""Train a byte-level BPE tokenizer (GPT-2 / GPT-NeoX style) on your own corpus.

    python data/train_tokenizer.py --input corpus/ --vocab-size 32000 --out tokenizer.json
    python data/train_tokenizer.py --input a.txt b.jsonl.zst --vocab-size 8192 --out tok.json --min-frequency 5

Inputs: ``.txt`` (each file one document), ``.jsonl`` and ``.jsonl.zst`` (one JSON object per line with a
``text`` field); directories are searched recursively in sorted order. The result is a ``tokenizers``
``tokenizer.json``: 256 byte symbols (no unknown token), GPT-2's byte-level pre-tokenizer, no normaliser,
and the special tokens first -- ``<|endoftext|>`` is id 0. ``--vocab-size`` counts special tokens, bytes
and merges. The same inputs give the same file (training is deterministic). Use it with
``data/prepare_openwebtext2.py --tokenizer tokenizer.json`` or ``data/prepare_text.py --vocab bpe``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import spikegpt  # noqa: F401
except ImportError:  # running from a checkout: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spikegpt.data import DataError, find_inputs, iter_documents  # noqa: E402
from spikegpt.cli import nonneg_int, positive_int, new_parser, run_cli  # noqa: E402
from spikegpt.data.writer import check_output_file  # noqa: E402
from spikegpt.fileio import atomic_write_text  # noqa: E402
from spikegpt.tokenizer import EOT_TOKEN, train_bpe  # noqa: E402

#: Long documents (whole .txt files) are fed to the trainer in pieces of about this many characters,
#: cut after a newline (pre-tokens never span a newline between words, so counts are unchanged).
_PIECE_CHARS = 1 << 20


def iter_training_texts(files: list[tuple[Path, str]]) -> Iterator[str]:
    """The texts the trainer sees (``files`` from :func:`find_inputs`), in a deterministic order (long
    documents in newline-cut pieces)."""
    for path, _name in files:
        for doc in iter_documents(path):
            start = 0
            while len(doc) - start > _PIECE_CHARS:
                cut = doc.find("\n", start + _PIECE_CHARS)
                if cut < 0:
                    break
                yield doc[start:cut + 1]
                start = cut + 1
            if start < len(doc):
                yield doc[start:]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("data/train_tokenizer.py", "Train a byte-level BPE tokenizer.json on .txt/.jsonl/.jsonl.zst files.")
    p.add_argument("--input", nargs="+", required=True, help="input files and/or directories")
    p.add_argument("--vocab-size", type=positive_int, required=True,
                   help="total vocabulary size (special tokens + 256 bytes + merges)")
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never an input)")
    p.add_argument("--min-frequency", type=nonneg_int, default=2, help="minimum pair count for a merge (default 2)")
    p.add_argument("--special", action="append", default=None,
                   help=f"special token (repeatable; default {EOT_TOKEN}); the first gets id 0. "
                        f"{EOT_TOKEN} is always included, since the data scripts append it after documents")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), train, argv)


def train(args: argparse.Namespace) -> int:
    special = args.special or [EOT_TOKEN]
    if EOT_TOKEN not in special:
        special = special + [EOT_TOKEN]
    files = find_inputs(args.input)
    out = Path(args.out)
    check_output_file(out, inputs=[p for p, _ in files], overwrite=args.overwrite)
    try:
        tok = train_bpe(iter_training_texts(files), args.vocab_size, min_frequency=args.min_frequency,
                        special_tokens=special)
    except ValueError as e:
        raise DataError(str(e)) from None
    atomic_write_text(out, tok.json_str)
    print(f"wrote {os.fspath(out)}: vocab {tok.vocab_size:,} ids, {EOT_TOKEN} = id {tok.eot_id}, "
          f"sha256 {tok.sha256[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
