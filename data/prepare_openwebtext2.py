#!/usr/bin/env python
"""Prepare OpenWebText2 (or any document corpus) as a sharded BPE token dataset, in parallel, resumably.

    python data/prepare_openwebtext2.py --input openwebtext2/ --out data/owt2-neox \\
        --tokenizer 20B_tokenizer.json --workers 8
    python data/prepare_openwebtext2.py --input a.jsonl b.jsonl.zst notes.txt --out data/mine \\
        --tokenizer my_tokenizer.json --val-fraction 0.01

Inputs: the OpenWebText2 release (a directory of ``.jsonl.zst`` files, one JSON document per line with a
``text`` field; needs ``pip install zstandard``), plain ``.jsonl``, and ``.txt`` (one document per file);
directories are searched recursively in sorted order. Each document is followed by ``<|endoftext|>``;
a document goes to val by a deterministic hash of its text (``--val-fraction`` of the documents on
average). Output: shard files ``train-00000.bin ...``/``val-00000.bin ...`` of ``--shard-tokens``
tokens (uint16; uint32 for vocabularies over 65,536) plus ``meta.json`` with the tokenizer embedded and
per-split token / document / byte / char counts. See ``docs/data.md`` for the details.

Interrupted? Run the same command again: finished input files are skipped and the output is identical
to an uninterrupted run. The tokenizer defaults to the GPT-NeoX 20B file ``20B_tokenizer.json`` when one
is found in the current directory or in ``data/``.
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

from spikegpt.data import DataError, format_summary, prepare_documents  # noqa: E402
from spikegpt.cli import fraction, positive_int, new_parser, run_cli  # noqa: E402

DEFAULT_TOKENIZER_NAME = "20B_tokenizer.json"


def _default_tokenizer() -> str | None:
    for d in (Path.cwd(), Path(__file__).resolve().parent):
        if (d / DEFAULT_TOKENIZER_NAME).is_file():
            return os.fspath(d / DEFAULT_TOKENIZER_NAME)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("data/prepare_openwebtext2.py", "Tokenise a document corpus (OpenWebText2 .jsonl.zst, .jsonl, .txt) "
                                            "into a sharded spikegpt dataset.")
    p.add_argument("--input", nargs="+", required=True, help="input files and/or directories")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--tokenizer", help=f"tokenizer.json (default: {DEFAULT_TOKENIZER_NAME}, the GPT-NeoX 20B "
                                       f"tokenizer, from the current directory or data/)")
    p.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1)),
                   help="tokenizer processes (default: the number of CPUs)")
    p.add_argument("--val-fraction", type=fraction, default=0.005,
                   help="fraction of documents for val, chosen by a hash of each text (default 0.005)")
    p.add_argument("--shard-tokens", type=positive_int, default=100_000_000,
                   help="tokens per shard (default 100_000_000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different dataset or a different unfinished preparation in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), prepare, argv, interrupted="interrupted: run the same command again to resume")


def prepare(args: argparse.Namespace) -> int:
    tokenizer = args.tokenizer or _default_tokenizer()
    if tokenizer is None:
        raise DataError(f"no --tokenizer given and no {DEFAULT_TOKENIZER_NAME} in the current directory or "
                        f"data/; pass --tokenizer PATH/tokenizer.json (or train one with data/train_tokenizer.py)")
    meta = prepare_documents(
        args.input, args.out, tokenizer,
        val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers,
        source="document corpus: " + ", ".join(Path(i).name for i in args.input),
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(format_summary(meta, os.fspath(args.out)))
    if meta.get("_elapsed_s"):
        mb = meta["_text_bytes_this_run"] / 1e6
        print(f"tokenized {mb:,.1f} MB of text in {meta['_elapsed_s']:.1f} s "
              f"({mb / meta['_elapsed_s']:.2f} MB/s, {args.workers} worker(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
