"""Inputs of document-corpus preparation and tokenizer training: ``.jsonl.zst`` / ``.jsonl`` files
(one JSON object per line, the document is its ``"text"``) and ``.txt`` files (one document each),
and the rule that sends a document to the val split (``docs/data.md``, "Document corpora").
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .format import DataError

__all__ = ["INPUT_SUFFIXES", "input_kind", "find_inputs", "open_lines", "parse_line", "iter_documents", "read_txt",
           "val_hash_fraction", "is_val_document"]

INPUT_SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suf in INPUT_SUFFIXES:
        if name.endswith(suf):
            return suf
    return None


def find_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """Expand files/directories into ``[(file, display_name), ...]``, deterministically ordered.

    Directories are searched recursively for ``.jsonl.zst``, ``.jsonl`` and ``.txt`` files, sorted by
    their path relative to the directory; explicitly named files keep the order given. ``display_name``
    (relative path for directory members, the file name otherwise) identifies the file in the progress
    record and in meta -- no absolute paths are stored.
    """
    out: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and input_kind(f)),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise DataError(f"input directory {p} holds no {', '.join(INPUT_SUFFIXES)} files")
            out.extend((f, f"{p.name}/{f.relative_to(p).as_posix()}") for f in found)
        elif p.is_file():
            if not input_kind(p):
                raise DataError(f"input file {p} is not one of {', '.join(INPUT_SUFFIXES)}")
            out.append((p, p.name))
        else:
            raise DataError(f"input {p} not found")
    names = [n for _, n in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"inputs named twice (or two inputs with the same name): {dup[:5]}")
    return out


def open_lines(path: Path) -> Iterator[bytes]:
    """Lines (bytes, newline stripped) of a .jsonl or .jsonl.zst file, streamed."""
    if input_kind(path) == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path.name} is zstd-compressed: install zstandard "
                            f"(pip install zstandard, or pip install spikegpt[zstd])") from None
        with open(path, "rb") as raw:
            reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), buffer_size=1 << 20)
            for line in reader:
                yield line.rstrip(b"\r\n")
    else:
        with open(path, "rb", buffering=1 << 20) as f:
            for line in f:
                yield line.rstrip(b"\r\n")


def parse_line(line: bytes, where: str) -> str | None:
    """The ``text`` of one JSONL line (``None`` for a blank line)."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e}); each line must be a JSON object with a 'text' field")
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{where}: expected a JSON object with a string 'text' field")
    return obj["text"]


def iter_documents(path: str | os.PathLike[str]) -> Iterator[str]:
    """The document texts of one input file (blank JSONL lines skipped; a .txt file is one document)."""
    path = Path(path)
    if input_kind(path) == ".txt":
        yield read_txt(path)
        return
    for i, line in enumerate(open_lines(path), 1):
        text = parse_line(line, f"{path.name} line {i}")
        if text is not None:
            yield text


def read_txt(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name} is not valid UTF-8 ({e.reason} at byte {e.start:,})") from None


# ==================================================================================================
# Split rule and dtype
# ==================================================================================================
def val_hash_fraction(text: str) -> float:
    """``blake2b-64(utf8(text)) / 2**64`` in [0, 1): the document's position for the val split rule."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def is_val_document(text: str, val_fraction: float) -> bool:
    """True when the document goes to the val split (``docs/data.md``, "Document corpora")."""
    return val_hash_fraction(text) < val_fraction
