"""The one writer behind every preparation (text files and document corpora alike).

It owns the rules that make preparation safe to repeat and to interrupt (``docs/data.md``,
"Fingerprints", "Writing a dataset" and "Resuming a preparation"):

* the fingerprint: a sha256 over everything that determines the bytes written;
* the existing-output policy: an identical dataset is left alone, anything else in the way (a
  different dataset, a corrupt one, files of another origin) is replaced only with ``--overwrite``;
* meta assembly and its atomic commit: ``meta.json`` is written last, so a directory without it is
  never taken for a dataset;
* the progress marker of resumable preparations.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_text
from ..tokenizer import BPETokenizer, Tokenizer
from .format import FORMAT, META_FILE, DataError, meta_json, split_files
from .reading import check_dataset

__all__ = ["PROGRESS_FILE", "tokenizer_digest", "fingerprint", "load_bpe_tokenizer", "check_output_file",
           "existing_dataset",
           "retract_meta", "assemble_meta", "commit_meta", "remove_files", "read_progress", "write_progress"]

#: Progress marker of an unfinished, resumable preparation (removed when ``meta.json`` is committed).
PROGRESS_FILE = ".prepare-progress.json"


def tokenizer_digest(tok_dict: Mapping[str, Any]) -> str:
    """sha256 of a tokenizer's ``to_dict()`` (key order does not matter)."""
    return hashlib.sha256(json.dumps(tok_dict, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(recipe: Mapping[str, Any]) -> str:
    """sha256 of a preparation's recipe: every input and setting that determines the bytes written."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def load_bpe_tokenizer(source: Tokenizer | str | os.PathLike[str]) -> Tokenizer:
    """A preparation's tokenizer argument: a tokenizer, or the path of a ``tokenizer.json``."""
    if isinstance(source, (str, os.PathLike)):
        try:
            return BPETokenizer(os.fspath(source))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot load the BPE tokenizer: {e}") from e
    return source


def remove_files(out_dir: Path, names: Iterable[str]) -> None:
    """Delete the named plain files of ``out_dir`` (names with a path separator are ignored)."""
    for name in names:
        path = out_dir / name
        if "/" not in name and os.sep not in name and path.is_file():
            path.unlink()


def _is_one_of(path: Path, inputs: Iterable[str | os.PathLike[str]]) -> bool:
    return path.exists() and any(os.path.exists(i) and os.path.samefile(path, i) for i in inputs)


def check_output_file(path: Path, *, inputs: Iterable[str | os.PathLike[str]], overwrite: bool) -> None:
    """The existing-output policy for a tool that writes one file (e.g. a trained tokenizer): never an
    input, never a directory, and an existing file only with ``overwrite``."""
    if path.is_dir():
        raise DataError(f"--out {path} is a directory; name the file to write")
    if _is_one_of(path, inputs):
        raise DataError(f"--out {path} is one of the inputs, which are never replaced; choose another --out")
    if path.exists() and not overwrite:
        raise DataError(f"--out {path} already exists; pass --overwrite to replace it, or choose another --out")


def existing_dataset(out_dir: Path, fingerprint: str, *, overwrite: bool, will_write: Iterable[str] = (),
                     inputs: Iterable[str | os.PathLike[str]] = (),
                     log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Apply the existing-output policy to ``out_dir`` before a preparation writes into it.

    Returns the meta of the dataset already there when it has this ``fingerprint`` (nothing to do).
    Otherwise returns ``None`` with ``out_dir`` created: it is empty of anything in the way, or
    ``overwrite`` allows replacing it.

    Raises:
        DataError: ``out_dir`` is not a directory; a file ``will_write`` names is one of the ``inputs``
            (never replaced); or, without ``overwrite``, ``out_dir`` holds a different or corrupt
            dataset, or (without ``meta.json``) one of the files ``will_write`` names.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a directory")
    will_write = list(will_write)
    inputs = list(inputs)
    for name in will_write:
        if _is_one_of(out_dir / name, inputs):
            raise DataError(f"the input {out_dir / name} would be replaced by this preparation's output; "
                            f"choose another --out")
    if (out_dir / META_FILE).exists():
        try:
            existing = check_dataset(out_dir)
        except DataError:
            existing = {}
        if existing.get("fingerprint") == fingerprint:
            (out_dir / PROGRESS_FILE).unlink(missing_ok=True)  # left by a crash just after meta.json was written
            if log is not None:
                log(f"{out_dir} already holds this dataset (identical inputs and settings); nothing to do")
            return existing
        if not overwrite:
            what = "a dataset prepared from different inputs or settings" if existing else "a corrupt dataset"
            raise DataError(f"{out_dir} already holds {what}; pass --overwrite (overwrite=True) to replace it, "
                            f"or choose another --out")
    elif not overwrite:
        foreign = sorted(n for n in will_write if (out_dir / n).exists())
        if foreign:
            raise DataError(f"{out_dir} is not a prepared dataset but holds {', '.join(foreign[:5])}, which this "
                            f"preparation would replace; pass --overwrite to replace them, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def retract_meta(out_dir: Path) -> set[str]:
    """Remove ``meta.json`` (so the directory no longer looks complete); return the files it listed."""
    path = out_dir / META_FILE
    if not path.exists():
        return set()
    try:
        listed = set(split_files(json.loads(path.read_text("utf-8"))))
    except (ValueError, KeyError, TypeError, AttributeError):
        listed = set()
    path.unlink()
    return listed


def assemble_meta(tok: Tokenizer, dtype: np.dtype, *, version: int, fields: Mapping[str, Any], fingerprint: str,
                  created_by: str, extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``meta.json`` of a dataset: the common head (format, version, vocabulary, dtype, tokenizer), the
    preparation's own ``fields`` (source, splits, split rule, ...), the fingerprint, then ``extra_meta``
    (which may not override a key)."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "vocab_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "tokenizer": tok.to_dict(),
        "unk_id": getattr(tok, "unk_id", None),
        **fields,
        "fingerprint": fingerprint,
        "created_by": created_by,
    }
    for k, v in (extra_meta or {}).items():
        if k in meta:
            raise ValueError(f"extra_meta may not override the key {k!r}")
        meta[k] = v
    return meta


def commit_meta(out_dir: Path, meta: Mapping[str, Any], stale: Iterable[str] = ()) -> dict[str, Any]:
    """Write ``meta.json`` atomically (the last file of a preparation), then delete the ``stale`` files
    (of an earlier dataset, not listed in ``meta``) and the progress marker. Returns the meta as stored."""
    text = meta_json(meta)
    atomic_write_text(out_dir / META_FILE, text)
    remove_files(out_dir, set(stale) - set(split_files(meta)))
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    return json.loads(text)


def read_progress(out_dir: Path, fingerprint: str, *, overwrite: bool) -> dict[str, Any] | None:
    """The progress marker of an unfinished preparation with this ``fingerprint`` (``None``: start afresh).

    Raises:
        DataError: the marker belongs to a preparation with another configuration and ``overwrite`` is false.
    """
    path = out_dir / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
        return state
    if not overwrite:
        raise DataError(f"{out_dir} holds an unfinished preparation with a different configuration (inputs, "
                        f"tokenizer or settings); re-run it with the same arguments to resume, or pass "
                        f"--overwrite to start over")
    return None


def write_progress(out_dir: Path, state: Mapping[str, Any]) -> None:
    """Replace the progress marker atomically (a commit point of a resumable preparation)."""
    atomic_write_text(out_dir / PROGRESS_FILE, json.dumps(state))
