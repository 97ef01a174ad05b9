#!/usr/bin/env python
"""Prepare WikiText-2 / WikiText-103 (raw release) as a spikegpt dataset with word and byte counts.

    python data/prepare_wikitext.py --input wikitext-103-raw/ --out data/wt103-neox --tokenizer 20B_tokenizer.json
    python data/prepare_wikitext.py --input wikitext-2-raw/ --out data/wt2-byte --vocab byte

``--input`` is the directory of the raw release: ``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``
(also accepted: ``train``/``valid``/``test`` with ``.raw`` or ``.txt``, and ``val`` for valid). The
splits are written as ``train``/``val``/``test`` (single files, format version 1), each file's bytes
exactly. ``--tokenizer`` gives a BPE ``tokenizer.json`` (e.g. the GPT-NeoX one the paper uses);
``--vocab byte`` or ``--vocab char`` (characters of the train file + an unknown id) need none.

Every split entry in meta.json also has ``words`` (runs of non-whitespace, splitting on ASCII whitespace:
Python ``bytes.split()`` of the raw file -- the word-level release's tokens without ``<eos>``) and
``lines`` (so ``words + lines`` is the ``<eos>``-inclusive count), next to ``bytes`` and ``chars``. With
them :func:`spikegpt.metrics.unit_metrics` reports word-level perplexity ``exp(total NLL / words)`` and
bits per byte alongside the token-level perplexity.
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
from spikegpt.cli import new_parser, run_cli  # noqa: E402
from spikegpt.metrics import count_lines, count_words  # noqa: E402

#: Accepted file names per split, in order of preference.
_NAMES = {
    "train": ["wiki.train.raw", "train.raw", "train.txt"],
    "val": ["wiki.valid.raw", "valid.raw", "valid.txt", "val.raw", "val.txt"],
    "test": ["wiki.test.raw", "test.raw", "test.txt"],
}


def find_split_files(input_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``{"train": path, "val": path, "test": path}`` from a WikiText directory; DataError if one is missing."""
    d = Path(input_dir)
    if not d.is_dir():
        raise DataError(f"--input {d} is not a directory (expected the WikiText raw release directory)")
    out: dict[str, Path] = {}
    for split, names in _NAMES.items():
        for n in names:
            if (d / n).is_file():
                out[split] = d / n
                break
        else:
            raise DataError(f"{d} has no {split} file (looked for {', '.join(names)})")
    return out


def prepare_wikitext(input_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                     vocab: str = "bpe", tokenizer: str | os.PathLike[str] | None = None,
                     overwrite: bool = False, log=print) -> dict:
    """Prepare the three WikiText files into ``out_dir``; returns the meta (see the module docstring)."""
    files = find_split_files(input_dir)
    blobs = {s: p.read_bytes() for s, p in files.items()}
    for s, b in blobs.items():
        if len(b) < 2:
            raise DataError(f"{files[s].name} is too small ({len(b)} bytes)")
    split_extra = {s: {"words": count_words(b), "lines": count_lines(b), "source_file": files[s].name}
                   for s, b in blobs.items()}
    data = b"".join(blobs[s] for s in ("train", "val", "test"))
    sizes = {s: len(blobs[s]) for s in ("train", "val", "test")}
    del blobs
    return prepare_splits(
        data, out_dir, vocab, tokenizer=tokenizer, split_sizes=sizes,
        source=f"WikiText raw release ({', '.join(p.name for p in files.values())})",
        overwrite=overwrite, log=log, split_extra=split_extra, inputs=list(files.values()),
        extra_meta={"word_rule": "words = len(raw_bytes.split()) (runs of non-whitespace, ASCII whitespace); "
                                 "lines = newline count (+1 for an unterminated last line); "
                                 "words + lines = the <eos>-inclusive word-level count"},
    )


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("data/prepare_wikitext.py", "Tokenise WikiText-2/103 (raw) into a spikegpt dataset with word counts.")
    p.add_argument("--input", required=True, help="directory with wiki.train.raw, wiki.valid.raw, wiki.test.raw")
    p.add_argument("--out", required=True, help="output dataset directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", help="BPE tokenizer.json (e.g. the GPT-NeoX 20B_tokenizer.json)")
    g.add_argument("--vocab", choices=("byte", "char"), help="byte (256 ids) or char (train characters + unknown id)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset in --out prepared from other inputs")
    return p


def prepare(args: argparse.Namespace) -> int:
    meta = prepare_wikitext(args.input, args.out, vocab=args.vocab or "bpe", tokenizer=args.tokenizer,
                            overwrite=args.overwrite)
    print(format_summary(meta, os.fspath(args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), prepare, argv)


if __name__ == "__main__":
    raise SystemExit(main())
