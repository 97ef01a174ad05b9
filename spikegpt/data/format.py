"""The prepared-dataset format: its name and versions, the token dtype rule, and reading ``meta.json``.

The format itself (``meta.json`` fields, token files, shards) is described in ``docs/data.md``
("The dataset directory" and "meta.json").
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

#: ``meta["format"]`` of every prepared dataset.
FORMAT = "spikegpt-tokens"
#: Datasets whose splits are single files (``prepare_splits``). Part of their fingerprint, so it stays 1.
SINGLE_FILE_VERSION = 1
#: Datasets with sharded splits (``prepare_documents``).
SHARDED_VERSION = 2
#: Newest format version this package reads.
FORMAT_VERSION = SHARDED_VERSION
META_FILE = "meta.json"
#: Split names in file order.
SPLIT_NAMES = ("train", "val", "test")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")


class DataError(UserError):
    """A dataset problem the user can fix; the message says how."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned little-endian dtype that holds ids ``0 .. vocab_size - 1`` (the one token dtype
    rule, for single-file and sharded splits alike)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for name in TOKEN_DTYPES:
        if vocab_size - 1 <= np.iinfo(name).max:
            return np.dtype(name).newbyteorder("<")
    raise DataError(f"vocab_size {vocab_size} does not fit uint32")


def token_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype of ``meta["dtype"]``; DataError for anything but the three token dtypes."""
    if name not in TOKEN_DTYPES:
        raise DataError(f"unsupported token dtype {name!r} in meta.json (expected uint8, uint16 or uint32); "
                        f"re-prepare the dataset with --overwrite")
    return np.dtype(name).newbyteorder("<")


def meta_json(meta: Mapping[str, Any]) -> str:
    """The text of ``meta.json``. ASCII-escaped: char vocabularies may hold lone surrogates (escaped
    bytes), which survive JSON only as ``\\uXXXX`` escapes."""
    return json.dumps(meta, indent=1, ensure_ascii=True) + "\n"


def prepare_hint(data_dir: Path) -> str:
    return (f"run `python data/prepare_text.py --input FILE --out {data_dir}` (or data/prepare_enwik8.py) "
            f"first, or omit the data directory to use the built-in default corpus")


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a prepared dataset directory.

    Raises:
        DataError: the directory or ``meta.json`` is missing, unreadable, or not this format/version.
    """
    d = Path(data_dir)
    if not d.exists():
        raise DataError(f"data directory {d} does not exist; {prepare_hint(d)}")
    if not d.is_dir():
        raise DataError(f"data directory {d} is not a directory; {prepare_hint(d)}")
    p = d / META_FILE
    if not p.is_file():
        raise DataError(f"{d} has no {META_FILE}, so it is not a prepared dataset (or its preparation was "
                        f"interrupted); {prepare_hint(d)}")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p} is unreadable or corrupt ({e}); re-run the preparation with --overwrite") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{p} is not a spikegpt dataset (format {fmt!r}, expected {FORMAT!r}); "
                        f"re-run the preparation with --overwrite")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise DataError(f"{p} has format version {meta.get('version')!r}; this spikegpt reads version "
                        f"{FORMAT_VERSION} -- upgrade spikegpt or re-prepare the dataset")
    for key in ("vocab_kind", "vocab_size", "dtype", "tokenizer", "splits"):
        if key not in meta:
            raise DataError(f"{p} lacks the key {key!r}; re-run the preparation with --overwrite")
    if not isinstance(meta["splits"], dict) or not meta["splits"]:
        raise DataError(f"{p} lists no splits; re-run the preparation with --overwrite")
    token_dtype(meta["dtype"])
    return meta


def split_files(meta: Mapping[str, Any]) -> list[str]:
    """File names of every split of ``meta`` (single-file and sharded splits), in split/shard order."""
    out: list[str] = []
    for entry in meta["splits"].values():
        if "files" in entry:
            out.extend(f["file"] for f in entry["files"])
        else:
            out.append(entry["file"])
    return out
