"""Prepared token datasets: writing them, opening them, and sampling training / evaluation windows.

Prepared dataset directory
==========================
A prepared dataset is a directory holding one raw token file per split plus ``meta.json``::

    DIR/
      meta.json      written last; a directory without it is not a (complete) dataset
      train.bin      raw little-endian array of ``meta["dtype"]``, one element per token
      val.bin
      test.bin       optional

``meta.json`` (``json``, ASCII-escaped)::

    {
      "format": "spikegpt-tokens",          # constant
      "version": 1,                         # 2 for datasets with sharded splits (see below)
      "vocab_kind": "byte" | "char" | "bpe",
      "vocab_size": int,
      "dtype": "uint8" | "uint16" | "uint32",   # smallest unsigned type that holds every id
      "tokenizer": {...},                   # Tokenizer.to_dict(): rebuilds the tokenizer, no other file
      "unk_id": int | null,                 # char vocab: the LAST id; characters of val/test (or of
                                            # later prompts) missing from the train split map to it
      "source": str,                        # free-form description of where the text came from
      "splits": {
        "train": {"file": "train.bin",
                  "tokens": n_tokens,
                  "bytes": n_utf8_bytes_of_the_split_text,     # for bits-per-byte
                  "chars": n_unicode_chars_of_the_split_text,
                  "unknown": n_tokens_equal_to_unk_id,          # 0 for byte vocab
                  "escaped_bytes": n_bytes_not_decodable_as_utf8,  # see "Split boundaries"
                  "byte_offset": offset_of_the_split_in_the_source},
        "val": {...},
        "test": {...}                       # only when a test split was requested
      },
      "split_rule": str,                    # how the split boundaries were chosen
      "data_sha256": str,                   # sha256 of the whole source byte string
      "fingerprint": str,                   # sha256 over data, vocab, tokenizer and boundaries
      "created_by": "spikegpt.data",
      ...                                   # extra keys from the caller (e.g. "corpus")
    }

Token files are memory-mapped (``np.memmap``) at training time and never read whole into RAM.

Sharded splits (format version 2)
---------------------------------
Large corpora (OpenWebText2, written by ``data/prepare_openwebtext2.py`` / :mod:`spikegpt.corpus`) store
a split as several shard files. Such a split entry has ``"files"`` instead of ``"file"``::

    "train": {"files": [{"file": "train-00000.bin", "tokens": n0},
                        {"file": "train-00001.bin", "tokens": n1}, ...],
              "tokens": n0 + n1 + ...,  "bytes": ..., "chars": ..., "documents": ..., ...}

and ``meta["version"]`` is 2 (datasets with only single-file splits are still written as version 1;
this module reads both). Shard dtype is ``uint16`` when the vocabulary fits, else ``uint32``.
:func:`open_split` returns a :class:`ShardedTokens` for such a split: it behaves like a 1-D token array
(``len``, ``tokens[a:b]`` across shard boundaries, ``np.asarray(tokens[a:b])``) over one read-only
memmap per shard. The split is ONE token stream, the concatenation of its shards in order: training
windows (:func:`sample_batch`) and evaluation windows may span a shard boundary. Shard boundaries carry
no meaning (a document may continue into the next shard); documents are delimited by the end-of-text
token that follows each of them.

Writing is crash-safe: every file is written to a hidden temporary name and moved into place with
``os.replace``; ``meta.json`` is written last (and, when overwriting, removed first), so an interrupted
run never leaves a directory that looks complete. Re-running a preparation with identical inputs is a
no-op; with different inputs it is refused unless ``overwrite=True`` (``--overwrite`` on the CLIs).

Splits and split boundaries
===========================
Splits are contiguous slices of the source bytes: train first, then val, then test (at the end).

* With fractions (``val_fraction``, ``test_fraction``), the boundaries are rounded to byte counts and
  then moved forward to the next UTF-8 character start, so the same file prepared with byte and char
  vocabularies yields the same split texts.
* With exact sizes (``split_sizes``, e.g. enwik8's 90M/5M/5M bytes), the boundaries are honoured to the
  byte. Text is decoded with Python's ``surrogateescape``: if a boundary cuts a multibyte character
  (or the data holds invalid UTF-8), each undecodable byte becomes one escape character (U+DC80 +
  byte) instead of being dropped or replaced, so no byte is lost and the char-level splits cover exactly
  the same bytes as the byte-level ones. Their number is ``escaped_bytes``.

Vocabularies
============
* ``byte``: ids are the UTF-8 bytes (vocab 256, uint8).
* ``char``: the vocabulary is the sorted set of Unicode characters of the TRAIN split only, plus one
  unknown id (the last id); val/test characters outside it map to the unknown id and are counted in
  ``unknown``. A prebuilt :class:`~spikegpt.tokenizer.CharTokenizer` may be passed instead (e.g. to
  reuse a pretraining vocabulary for fine-tuning).
* ``bpe``: a :class:`~spikegpt.tokenizer.BPETokenizer` (e.g. GPT-NeoX). Long texts are encoded in
  pieces cut after a newline that sits between two non-whitespace characters: for byte-level BPE this is
  always a pre-tokenisation boundary, so the result equals encoding the whole split at once.

Sampling
========
:func:`sample_batch` is stateless: the batch for ``(seed, rank, step, micro_step)`` is always the same,
whatever happened before (resuming needs no data-loader state). :func:`iter_eval_windows` walks a split
once in consecutive windows for evaluation with carried recurrent state.

Default corpus
==============
:func:`default_corpus_dir` builds (once, cached) a small real-English corpus from the docstrings of the
running interpreter's standard library, so that training works out of the box without downloads.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_dict
from .fileio import atomic_write, atomic_write_text, tmp_name

__all__ = [
    "DataError",
    "FORMAT",
    "FORMAT_VERSION",
    "SPLIT_NAMES",
    "dtype_for_vocab",
    "compute_split_bounds",
    "prepare_splits",
    "load_meta",
    "open_split",
    "check_dataset",
    "load_tokenizer",
    "TokenData",
    "ShardedTokens",
    "split_files",
    "sample_offsets",
    "sample_batch",
    "iter_eval_windows",
    "num_eval_windows",
    "format_summary",
    "extract_stdlib_docstrings",
    "default_corpus_dir",
    "DEFAULT_CORPUS_MAX_BYTES",
]

FORMAT = "spikegpt-tokens"
#: Newest format version this module reads (version 2 adds sharded splits, see the module docstring).
FORMAT_VERSION = 2
#: Version written for datasets whose splits are single files (``prepare_splits``); part of their
#: fingerprint, so it stays 1.
_SINGLE_FILE_VERSION = 1
META_FILE = "meta.json"
#: Split names in file order.
SPLIT_NAMES = ("train", "val", "test")
#: Bump when the bytes produced for the same inputs change (part of the fingerprint).
_ENCODER_VERSION = 1
#: Streaming granularity when decoding / encoding large inputs.
_CHUNK_BYTES = 1 << 23
_MAX_CODEPOINT = 0x110000


class DataError(Exception):
    """A dataset problem the user can fix; the message says how."""


# ==================================================================================================
# Small helpers
# ==================================================================================================
def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned little-endian dtype that holds ids ``0 .. vocab_size - 1``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt).newbyteorder("<")
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32")


def _np_dtype(name: str) -> np.dtype:
    if name not in ("uint8", "uint16", "uint32"):
        raise DataError(f"unsupported token dtype {name!r} in meta.json (expected uint8, uint16 or uint32); "
                        f"re-prepare the dataset with --overwrite")
    return np.dtype(name).newbyteorder("<")


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _meta_json(meta: Mapping[str, Any]) -> str:
    # ensure_ascii: char vocabularies may hold lone surrogates (escaped bytes), which only survive
    # JSON as \\uXXXX escapes.
    return json.dumps(meta, indent=1, ensure_ascii=True) + "\n"


def _sha256(data: bytes | memoryview) -> str:
    h = hashlib.sha256()
    mv = memoryview(data)
    for i in range(0, len(mv), _CHUNK_BYTES):
        h.update(mv[i:i + _CHUNK_BYTES])
    return h.hexdigest()


def _iter_text_chunks(data: memoryview, errors: str = "surrogateescape") -> Iterator[str]:
    """Decode ``data`` as UTF-8 in chunks; multibyte characters are never split between chunks."""
    dec = codecs.getincrementaldecoder("utf-8")(errors=errors)
    n = len(data)
    if n == 0:
        return
    for i in range(0, n, _CHUNK_BYTES):
        text = dec.decode(data[i:i + _CHUNK_BYTES], final=i + _CHUNK_BYTES >= n)
        if text:
            yield text


def _check_utf8(data: memoryview, what: str) -> None:
    """Raise DataError naming the byte offset of the first invalid UTF-8 sequence."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    n = len(data)
    for i in range(0, n, _CHUNK_BYTES):
        pending = len(dec.getstate()[0])
        try:
            dec.decode(data[i:i + _CHUNK_BYTES], final=i + _CHUNK_BYTES >= n)
        except UnicodeDecodeError as e:
            off = i - pending + e.start
            snippet = bytes(data[max(0, off - 8):off + 8])
            raise DataError(
                f"{what} is not valid UTF-8: {e.reason} at byte offset {off:,} (bytes around it: {snippet!r}); "
                f"convert it to UTF-8 first, or use --vocab byte, which accepts any bytes"
            ) from None


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _is_escape(cps: np.ndarray) -> np.ndarray:
    return (cps >= 0xDC80) & (cps <= 0xDCFF)


# ==================================================================================================
# Preparation
# ==================================================================================================
def compute_split_bounds(
    data: bytes | memoryview,
    *,
    split_sizes: Mapping[str, int] | Sequence[int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
) -> list[tuple[str, int, int]]:
    """Return ``[(name, start, end), ...]`` byte ranges for train, val and (optionally) test.

    ``split_sizes`` (a mapping ``{"train": n, "val": n[, "test": n]}`` or a 2-/3-sequence in that order)
    gives exact byte sizes that must add up to ``len(data)``. Otherwise ``val_fraction`` and
    ``test_fraction`` of the bytes (rounded) go to val and test at the end, with boundaries moved forward
    to the next UTF-8 character start. Every split must hold at least 2 bytes.
    """
    n = len(data)
    if split_sizes is not None:
        if isinstance(split_sizes, Mapping):
            unknown = set(split_sizes) - set(SPLIT_NAMES)
            if unknown or "train" not in split_sizes or "val" not in split_sizes:
                raise DataError(f"split_sizes must have keys train, val[, test]; got {sorted(split_sizes)}")
            sizes = [(k, int(split_sizes[k])) for k in SPLIT_NAMES if k in split_sizes]
        else:
            if len(split_sizes) not in (2, 3):
                raise DataError(f"split_sizes needs 2 or 3 sizes (train, val[, test]), got {len(split_sizes)}")
            sizes = [(name, int(size)) for name, size in zip(SPLIT_NAMES, split_sizes, strict=False)]
        total = sum(s for _, s in sizes)
        if total != n:
            raise DataError(f"split sizes {dict(sizes)} add up to {total:,} bytes but the data has {n:,} bytes")
        bounds, start = [], 0
        for name, size in sizes:
            bounds.append((name, start, start + size))
            start += size
        rule = "exact byte sizes"
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"the val fraction (--val-fraction) must be in (0, 1), got {val_fraction}")
        if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise DataError(f"the test fraction (--test-fraction) must be in [0, 1) with val + test < 1, "
                            f"got val {val_fraction}, test {test_fraction}")
        mv = memoryview(data)

        def snap(b: int) -> int:  # move forward to a UTF-8 character start
            while b < n and (mv[b] & 0xC0) == 0x80:
                b += 1
            return b

        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        test_start = snap(n - n_test) if test_fraction > 0 else n
        val_start = snap(min(test_start, n - n_test - n_val))
        bounds = [("train", 0, val_start), ("val", val_start, test_start)]
        if test_fraction > 0:
            bounds.append(("test", test_start, n))
        rule = "fractions"
    for name, a, b in bounds:
        if b - a < 2:
            raise DataError(
                f"input too small to split: {n:,} bytes leave the {name} split {b - a} byte(s) "
                f"({rule}); at least 2 tokens per split are needed -- use a larger input"
                + (" or larger fractions" if split_sizes is None else "")
            )
    return bounds


class _SplitWriter:
    """Streams token ids into a temporary file next to ``final``; counts them."""

    def __init__(self, final: Path, dtype: np.dtype):
        self.final = final
        self.tmp = tmp_name(final)
        self.dtype = dtype
        self.tokens = 0
        self._f = open(self.tmp, "wb")

    def write(self, ids: np.ndarray | bytes | memoryview) -> None:
        if isinstance(ids, (bytes, bytearray, memoryview)):
            self._f.write(ids)
            self.tokens += len(ids)
        else:
            arr = np.ascontiguousarray(ids, dtype=self.dtype)
            self._f.write(memoryview(arr).cast("B"))
            self.tokens += arr.size

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self.tmp.exists():
            self.tmp.unlink()


# Byte-level BPE: a "\n" between two non-whitespace characters is always a pre-token boundary.
_BPE_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_BPE_PIECE_CHARS = 1 << 16


def _bpe_pieces(text: str, target: int) -> tuple[list[str], str]:
    """Cut ``text`` into ~``target``-char pieces at safe boundaries; return (pieces, remainder)."""
    pieces, start = [], 0
    while len(text) - start > target:
        m = _BPE_SAFE_CUT.search(text, start + target)
        if m is None:
            break
        pieces.append(text[start:m.end()])
        start = m.end()
    return pieces, text[start:]


def _encode_split(
    data: memoryview, vocab: str, tok: Tokenizer, writer: _SplitWriter
) -> dict[str, int]:
    """Encode one split's bytes into ``writer``; return the split statistics."""
    stats = {"chars": 0, "unknown": 0, "escaped_bytes": 0}
    if vocab == "byte":
        for text in _iter_text_chunks(data):
            cps = _codepoints(text)
            stats["chars"] += len(cps)
            stats["escaped_bytes"] += int(_is_escape(cps).sum())
        for i in range(0, len(data), _CHUNK_BYTES):
            writer.write(data[i:i + _CHUNK_BYTES])
    elif vocab == "char":
        assert isinstance(tok, CharTokenizer)
        table = tok._lookup_table()
        for text in _iter_text_chunks(data):
            cps = _codepoints(text)
            stats["chars"] += len(cps)
            stats["escaped_bytes"] += int(_is_escape(cps).sum())
            ids = table[np.minimum(cps, len(table) - 1)]
            missing = ids < 0
            n_missing = int(missing.sum())
            if n_missing:
                if tok.unk_id is None:
                    bad = "".join(chr(int(c)) for c in np.unique(cps[missing])[:8])
                    raise DataError(f"characters {bad!r} are not in the char vocabulary and it has no unknown id; "
                                    f"use a vocabulary with an unknown id (CharTokenizer(..., unk='\\ufffd'))")
                ids[missing] = tok.unk_id
                stats["unknown"] += n_missing
            writer.write(ids)
    elif vocab == "bpe":
        assert isinstance(tok, BPETokenizer)
        def emit(ids: list[int]) -> None:
            arr = np.asarray(ids, dtype=np.int64)
            if tok.unk_id is not None:
                stats["unknown"] += int((arr == tok.unk_id).sum())
            writer.write(arr)

        carry = ""
        for text in _iter_text_chunks(data, errors="strict"):
            stats["chars"] += len(text)
            pieces, carry = _bpe_pieces(carry + text, _BPE_PIECE_CHARS)
            if pieces:
                for ids in tok.encode_batch(pieces):
                    emit(ids)
        if carry:
            emit(tok.encode(carry))
    else:  # pragma: no cover - validated by the caller
        raise ValueError(vocab)
    return stats


def _char_vocab_from(data: memoryview) -> CharTokenizer:
    counts = np.zeros(_MAX_CODEPOINT, dtype=np.int64)
    for text in _iter_text_chunks(data):
        counts += np.bincount(_codepoints(text), minlength=_MAX_CODEPOINT)
    return CharTokenizer.from_codepoint_counts(counts, add_unk=True)


def _existing_state(out_dir: Path) -> dict[str, Any] | None:
    """Meta of a complete, intact dataset in ``out_dir``; ``{}`` if there is an unreadable/corrupt one."""
    if not (out_dir / META_FILE).exists():
        return None
    try:
        return check_dataset(out_dir)
    except DataError:
        return {}


def prepare_splits(
    data: bytes | bytearray | memoryview | str,
    out_dir: str | os.PathLike[str],
    vocab: str = "byte",
    *,
    tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    split_sizes: Mapping[str, int] | Sequence[int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    source: str = "",
    utf8_errors: str = "strict",
    overwrite: bool = False,
    extra_meta: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    split_extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Tokenise ``data`` into a prepared dataset directory (format in the module docstring).

    Args:
        data: the whole source text as UTF-8 bytes (a ``str`` is UTF-8 encoded first).
        out_dir: target directory (created if needed).
        vocab: ``"byte"``, ``"char"`` or ``"bpe"``.
        tokenizer: for ``"bpe"``, a :class:`BPETokenizer` or a path to a ``tokenizer.json`` (required);
            for ``"char"``, an optional prebuilt :class:`CharTokenizer` (default: built from the train
            split, with an unknown id).
        split_sizes: exact byte sizes of train, val[, test] (must add up to ``len(data)``); or ``None`` to
            use ``val_fraction`` / ``test_fraction`` (see :func:`compute_split_bounds`).
        source: free-form description stored in ``meta["source"]`` (do not put private paths here).
        utf8_errors: ``"strict"``: char/bpe vocabularies require the whole input to be valid UTF-8
            (``DataError`` naming the offset otherwise); ``"surrogateescape"``: invalid bytes become
            escape characters (char vocab; used for enwik8). Byte vocab accepts any bytes.
        overwrite: replace an existing dataset in ``out_dir`` that was prepared from different inputs.
        extra_meta: additional JSON-serialisable keys for ``meta.json``.
        split_extra: per split name, additional JSON-serialisable keys for that split's entry in
            ``meta["splits"]`` (e.g. WikiText word counts); they may not override the standard keys.
        log: called with a one-line note when ``out_dir`` already holds this exact dataset.

    Returns:
        The ``meta`` dict that was written (or that was already there when the dataset in ``out_dir`` was
        prepared from identical inputs, in which case nothing is rewritten).

    Raises:
        DataError: invalid arguments, invalid UTF-8, input too small to split, or ``out_dir`` holding a
            different dataset while ``overwrite`` is false.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    mv = memoryview(data).cast("B")
    out_dir = Path(out_dir)
    if vocab not in ("byte", "char", "bpe"):
        raise DataError(f"unknown vocab {vocab!r}: expected 'byte', 'char' or 'bpe'")
    if utf8_errors not in ("strict", "surrogateescape"):
        raise ValueError(f"utf8_errors must be 'strict' or 'surrogateescape', got {utf8_errors!r}")

    # ---- tokenizer argument -----------------------------------------------------------------------
    tok: Tokenizer | None
    if vocab == "byte":
        if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
            raise DataError("vocab 'byte' takes no tokenizer")
        tok = ByteTokenizer()
    elif vocab == "char":
        if tokenizer is not None and not isinstance(tokenizer, CharTokenizer):
            raise DataError(f"vocab 'char' needs a CharTokenizer, got {type(tokenizer).__name__}")
        tok = tokenizer  # None: built from the train split below
    else:
        if tokenizer is None:
            raise DataError("vocab 'bpe' needs a tokenizer: pass --tokenizer PATH/tokenizer.json")
        if isinstance(tokenizer, (str, os.PathLike)):
            try:
                tokenizer = BPETokenizer(os.fspath(tokenizer))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot load the BPE tokenizer: {e}") from e
        if not isinstance(tokenizer, BPETokenizer):
            raise DataError(f"vocab 'bpe' needs a BPETokenizer, got {type(tokenizer).__name__}")
        tok = tokenizer
        if utf8_errors != "strict":
            raise DataError("vocab 'bpe' needs valid UTF-8 text (utf8_errors='strict')")

    bounds = compute_split_bounds(mv, split_sizes=split_sizes, val_fraction=val_fraction,
                                  test_fraction=test_fraction)
    if vocab != "byte" and utf8_errors == "strict":
        _check_utf8(mv, "the input")
        if vocab == "bpe":  # split texts must decode on their own
            for name, a, _ in bounds:
                if 0 < a < len(mv) and (mv[a] & 0xC0) == 0x80:
                    raise DataError(f"the {name} split starts at byte {a:,}, inside a UTF-8 character; "
                                    f"BPE needs character-aligned split sizes")

    data_sha = _sha256(mv)
    if split_sizes is not None:
        split_rule = "exact byte sizes " + ", ".join(f"{n}={b - a}" for n, a, b in bounds)
    else:
        split_rule = (f"fractions val={val_fraction} test={test_fraction} of the bytes, boundaries moved "
                      f"forward to UTF-8 character starts")
    fingerprint = hashlib.sha256(json.dumps({
        "format_version": _SINGLE_FILE_VERSION,
        "encoder_version": _ENCODER_VERSION,
        "vocab": vocab,
        "tokenizer": None if tok is None else hashlib.sha256(
            json.dumps(tok.to_dict(), sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest(),
        "bounds": bounds,
        "data_sha256": data_sha,
        "utf8_errors": utf8_errors,
    }, sort_keys=True).encode()).hexdigest()

    # ---- existing output ----------------------------------------------------------------------------
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a directory")
    existing = _existing_state(out_dir)
    if existing:
        if existing.get("fingerprint") == fingerprint:
            if log is not None:
                log(f"{out_dir} already holds this dataset (identical inputs); nothing to do")
            return existing
    if existing is not None and not overwrite:
        what = ("a prepared dataset from different inputs" if existing
                else "an unreadable or corrupt dataset")
        raise DataError(f"{out_dir} already holds {what}; pass --overwrite (overwrite=True) to replace it, "
                        f"or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- encode every split into temporary files ---------------------------------------------------
    if tok is None:  # char vocab from the train split only
        _, a, b = bounds[0]
        tok = _char_vocab_from(mv[a:b])
    dtype = dtype_for_vocab(tok.vocab_size)
    writers: list[_SplitWriter] = []
    splits: dict[str, dict[str, Any]] = {}
    try:
        for name, a, b in bounds:
            w = _SplitWriter(out_dir / f"{name}.bin", dtype)
            writers.append(w)
            stats = _encode_split(mv[a:b], vocab, tok, w)
            w.close()
            if w.tokens < 2:
                raise DataError(f"the {name} split has only {w.tokens} token(s); use a larger input")
            splits[name] = {"file": w.final.name, "tokens": w.tokens, "bytes": b - a, "chars": stats["chars"],
                            "unknown": stats["unknown"], "escaped_bytes": stats["escaped_bytes"],
                            "byte_offset": a}
            for k, v in ((split_extra or {}).get(name) or {}).items():
                if k in splits[name]:
                    raise ValueError(f"split_extra may not override the key {k!r}")
                splits[name][k] = v
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": _SINGLE_FILE_VERSION,
            "vocab_kind": vocab,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "tokenizer": tok.to_dict(),
            "unk_id": getattr(tok, "unk_id", None),
            "source": source,
            "splits": splits,
            "split_rule": split_rule,
            "data_sha256": data_sha,
            "fingerprint": fingerprint,
            "created_by": "spikegpt.data",
        }
        for k, v in (extra_meta or {}).items():
            if k in meta:
                raise ValueError(f"extra_meta may not override the key {k!r}")
            meta[k] = v
        meta_text = _meta_json(meta)

        # ---- commit: meta.json goes first (out) and last (in) ---------------------------------------
        old_meta = out_dir / META_FILE
        old_files: set[str] = set()
        if old_meta.exists():
            try:
                old_files = set(split_files(json.loads(old_meta.read_text("utf-8"))))
            except (ValueError, KeyError, TypeError, AttributeError):
                old_files = set()
            old_meta.unlink()
        for w in writers:
            os.replace(w.tmp, w.final)
        for f in old_files - {w.final.name for w in writers}:
            stale = out_dir / f
            if "/" not in f and os.sep not in f and stale.is_file():
                stale.unlink()
        _atomic_write_text(out_dir / META_FILE, meta_text)
    finally:
        for w in writers:
            w.discard()
    return json.loads(meta_text)


# ==================================================================================================
# Loading
# ==================================================================================================
def _prepare_hint(data_dir: Path) -> str:
    return (f"run `python data/prepare_text.py --input FILE --out {data_dir}` (or data/prepare_enwik8.py) "
            f"first, or omit the data directory to use the built-in default corpus")


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a prepared dataset directory.

    Raises:
        DataError: the directory or ``meta.json`` is missing, unreadable, or not this format/version.
    """
    d = Path(data_dir)
    if not d.exists():
        raise DataError(f"data directory {d} does not exist; {_prepare_hint(d)}")
    if not d.is_dir():
        raise DataError(f"data directory {d} is not a directory; {_prepare_hint(d)}")
    p = d / META_FILE
    if not p.is_file():
        raise DataError(f"{d} has no {META_FILE}, so it is not a prepared dataset (or its preparation was "
                        f"interrupted); {_prepare_hint(d)}")
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
    _np_dtype(meta["dtype"])
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


class ShardedTokens:
    """A split stored as several shard files, behaving like one read-only 1-D token array.

    Supports ``len()``, ``shape``/``size``/``ndim``/``dtype``, integer indexing, slicing with step 1
    (``tokens[a:b]``, also across shard boundaries) and ``np.asarray(tokens[a:b])``. A slice inside one
    shard is a view of that shard's memmap; a slice across shards is a fresh array (only the requested
    tokens are read). Negative indices count from the end, as for numpy arrays.

    Args:
        shards: 1-D arrays (normally read-only ``np.memmap``) of one dtype, in stream order.
        files: optional file names of the shards (for messages / inspection).
    """

    ndim = 1

    def __init__(self, shards: Sequence[np.ndarray], files: Sequence[str] | None = None):
        if not shards:
            raise ValueError("ShardedTokens needs at least one shard")
        dtypes = {np.dtype(sh.dtype) for sh in shards}
        if len(dtypes) != 1:
            raise ValueError(f"shards have different dtypes: {sorted(map(str, dtypes))}")
        self.shards: list[np.ndarray] = list(shards)
        self.files: list[str] = list(files) if files is not None else []
        self.dtype: np.dtype = dtypes.pop()
        lengths = np.array([len(sh) for sh in self.shards], dtype=np.int64)
        #: ``offsets[i]`` = index of the first token of shard ``i``; ``offsets[-1]`` = total length.
        self.offsets: np.ndarray = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._n = int(self.offsets[-1])

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int]:
        return (self._n,)

    @property
    def size(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._n * self.dtype.itemsize

    def _shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.offsets, i, side="right")) - 1

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step != 1:
                raise IndexError("ShardedTokens supports only slices with step 1")
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            first, last = self._shard_of(start), self._shard_of(stop - 1)
            if first == last:
                o = int(self.offsets[first])
                return self.shards[first][start - o:stop - o]
            out = np.empty(stop - start, dtype=self.dtype)
            pos = 0
            for k in range(first, last + 1):
                o = int(self.offsets[k])
                a, b = max(start, o) - o, min(stop, int(self.offsets[k + 1])) - o
                out[pos:pos + b - a] = self.shards[k][a:b]
                pos += b - a
            return out
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key)
            if i < 0:
                i += self._n
            if not 0 <= i < self._n:
                raise IndexError(f"index {int(key)} is out of bounds for {self._n} tokens")
            k = self._shard_of(i)
            return self.shards[k][i - int(self.offsets[k])]
        raise TypeError(f"ShardedTokens indices must be integers or step-1 slices, got {type(key).__name__}")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole split as one array (reads every shard: use slices for large splits)."""
        arr = self[0:self._n]
        return np.asarray(arr, dtype=dtype) if dtype is not None else np.asarray(arr)

    def __iter__(self) -> Iterator[Any]:
        for sh in self.shards:
            yield from sh

    def __repr__(self) -> str:
        return f"ShardedTokens({self._n:,} tokens in {len(self.shards)} shard(s), dtype={self.dtype.name})"


def _open_token_file(d: Path, fname: Any, n: int, dtype: np.dtype, split: str) -> np.memmap:
    if not isinstance(fname, str) or not fname or Path(fname).name != fname:
        raise DataError(f"{d}/{META_FILE} names an invalid file for split {split!r}: {fname!r}; "
                        f"re-run the preparation with --overwrite")
    path = d / fname
    if not path.is_file():
        raise DataError(f"split file {path} is missing; re-run the preparation with --overwrite")
    size = path.stat().st_size
    if n <= 0 or size != n * dtype.itemsize:
        raise DataError(f"split file {path} is truncated or corrupt: {size:,} bytes, but meta.json says "
                        f"{n:,} tokens x {dtype.itemsize} byte(s) = {max(n, 0) * dtype.itemsize:,}; "
                        f"re-run the preparation with --overwrite")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def open_split(data_dir: str | os.PathLike[str], split: str,
               meta: Mapping[str, Any] | None = None, vocab_size: int | None = None) -> np.memmap | ShardedTokens:
    """Memory-map one split's tokens (read-only, 1-D, dtype from meta).

    Returns an ``np.memmap`` for a single-file split and a :class:`ShardedTokens` (same array-like
    interface: ``len``, slicing, ``np.asarray`` of a slice) for a sharded split.

    Raises:
        DataError: unknown split, split file missing, file size not matching meta (truncated/corrupt),
            empty split, or a vocabulary other than ``vocab_size`` (that of the model to be fed).
    """
    d = Path(data_dir)
    if meta is None:
        meta = load_meta(d)
    if vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise DataError(f"vocabulary mismatch: the model has {vocab_size} tokens but {d} was prepared with "
                        f"{meta['vocab_size']}; prepare the data with the model's tokenizer")
    splits = meta["splits"]
    if split not in splits:
        hint = " (prepare with --test-fraction to get a test split)" if split == "test" else ""
        raise DataError(f"{d} has no {split!r} split; it has {sorted(splits)}{hint}")
    entry = splits[split]
    dtype = _np_dtype(meta["dtype"])
    if not isinstance(entry, dict):
        raise DataError(f"{d}/{META_FILE}: invalid entry for split {split!r}; re-run the preparation with --overwrite")
    n = int(entry.get("tokens", -1))
    if n == 0:
        raise DataError(f"the {split!r} split of {d} is empty (0 tokens); prepare it from a larger input")
    if "files" in entry:
        files = entry["files"]
        if not isinstance(files, list) or not files or not all(isinstance(f, dict) for f in files):
            raise DataError(f"{d}/{META_FILE}: invalid shard list for split {split!r}; "
                            f"re-run the preparation with --overwrite")
        counts = [int(f.get("tokens", -1)) for f in files]
        if sum(counts) != n:
            raise DataError(f"{d}/{META_FILE}: the shards of split {split!r} hold {sum(counts):,} tokens but the "
                            f"split says {n:,}; re-run the preparation with --overwrite")
        shards = [_open_token_file(d, f.get("file"), c, dtype, split) for f, c in zip(files, counts)]
        return ShardedTokens(shards, [f["file"] for f in files])
    return _open_token_file(d, entry.get("file", ""), n, dtype, split)


def check_dataset(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate ``meta.json`` and every split file (sizes); return the meta. Raises DataError."""
    meta = load_meta(data_dir)
    for name in meta["splits"]:
        open_split(data_dir, name, meta)
    return meta


def load_tokenizer(data_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a prepared dataset was encoded with."""
    meta = load_meta(data_dir)
    try:
        return tokenizer_from_dict(meta["tokenizer"])
    except ValueError as e:
        raise DataError(f"{Path(data_dir) / META_FILE}: {e}; re-run the preparation with --overwrite") from None


class TokenData:
    """One split of a prepared dataset: ``tokens`` (a read-only memmap or :class:`ShardedTokens`) plus its metadata.

    Attributes: ``data_dir``, ``split``, ``meta`` (whole meta.json), ``info`` (this split's entry),
    ``tokens``, ``vocab_size``, ``vocab_kind``, ``num_tokens`` (= ``len(self)``), ``num_bytes``,
    ``bytes_per_token``; ``tokenizer`` is built on first access.
    """

    def __init__(self, data_dir: str | os.PathLike[str], split: str = "train"):
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(self.data_dir)
        self.tokens: np.memmap | ShardedTokens = open_split(self.data_dir, split, self.meta)
        self.info: dict[str, Any] = dict(self.meta["splits"][split])
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.vocab_kind: str = self.meta["vocab_kind"]
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.data_dir)
        return self._tokenizer

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_bytes(self) -> int:
        return int(self.info["bytes"])

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of source text per token (to convert bits/token to bits/byte)."""
        return self.num_bytes / self.num_tokens

    def __len__(self) -> int:
        return self.num_tokens

    def sample_batch(self, batch_size: int, ctx_len: int, seed: int, step: int, micro_step: int = 0,
                     rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sample_batch` on this split."""
        return sample_batch(self.tokens, batch_size, ctx_len, seed, step, micro_step, rank)

    def iter_eval_windows(self, ctx_len: int, max_tokens: int | None = None
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`iter_eval_windows` on this split."""
        return iter_eval_windows(self.tokens, ctx_len, max_tokens)

    def __repr__(self) -> str:
        return (f"TokenData({str(self.data_dir)!r}, split={self.split!r}, tokens={self.num_tokens:,}, "
                f"vocab={self.vocab_kind}/{self.vocab_size})")


# ==================================================================================================
# Sampling
# ==================================================================================================
def _as_tokens(tokens: Any) -> np.ndarray:
    if isinstance(tokens, TokenData):
        return tokens.tokens
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return tokens


def _check_nonneg_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


def sample_offsets(n_tokens: int, batch_size: int, ctx_len: int, seed: int, step: int, micro_step: int = 0,
                   rank: int = 0) -> np.ndarray:
    """Window start offsets used by :func:`sample_batch` (int64, shape ``(batch_size,)``).

    Offsets are drawn from ``np.random.default_rng([seed, rank, step, micro_step])`` uniformly in
    ``[0, n_tokens - ctx_len - 1]`` (inclusive), so every window of ``ctx_len + 1`` tokens fits.
    """
    seed, step = _check_nonneg_int("seed", seed), _check_nonneg_int("step", step)
    micro_step, rank = _check_nonneg_int("micro_step", micro_step), _check_nonneg_int("rank", rank)
    if _check_nonneg_int("batch_size", batch_size) < 1 or _check_nonneg_int("ctx_len", ctx_len) < 1:
        raise ValueError(f"batch_size and ctx_len must be >= 1, got {batch_size} and {ctx_len}")
    if n_tokens < ctx_len + 1:
        raise DataError(
            f"the split has {n_tokens:,} tokens, fewer than ctx_len + 1 = {ctx_len + 1:,} needed for one "
            f"training window; use a smaller --ctx-len (at most {max(n_tokens - 1, 0):,}) or more data"
        )
    rng = np.random.default_rng([seed, rank, step, micro_step])
    return rng.integers(0, n_tokens - ctx_len - 1, size=batch_size, endpoint=True, dtype=np.int64)


def sample_batch(tokens: Any, batch_size: int, ctx_len: int, seed: int, step: int, micro_step: int = 0,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible random training batch ``(x, y)``: int64 CPU tensors of shape ``(batch_size, ctx_len)``.

    Stateless: the result depends only on the arguments (and the data). Row ``i`` is
    ``x[i] = tokens[o_i : o_i + ctx_len]``, ``y[i] = tokens[o_i + 1 : o_i + ctx_len + 1]`` with the
    offsets of :func:`sample_offsets`. Different ``rank``/``step``/``micro_step`` give independent
    offsets. Only the windows are read from the memmap.

    Args:
        tokens: a 1-D token array / memmap (or a :class:`TokenData`).

    Raises:
        DataError: the split has fewer than ``ctx_len + 1`` tokens.
    """
    tokens = _as_tokens(tokens)
    offsets = sample_offsets(len(tokens), batch_size, ctx_len, seed, step, micro_step, rank)
    buf = np.empty((batch_size, ctx_len + 1), dtype=np.int64)
    for i, o in enumerate(offsets.tolist()):
        buf[i] = tokens[o:o + ctx_len + 1]
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def num_eval_windows(n_tokens: int, ctx_len: int, max_tokens: int | None = None) -> int:
    """Number of windows :func:`iter_eval_windows` yields."""
    targets = max(n_tokens - 1, 0) if max_tokens is None else min(max(n_tokens - 1, 0), max_tokens)
    return -(-targets // ctx_len)


def iter_eval_windows(tokens: Any, ctx_len: int, max_tokens: int | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive, non-overlapping evaluation windows over a split, batch size 1.

    Yields ``(x, y)`` int64 tensors of shape ``(1, t)`` with ``t <= ctx_len`` (only the last window may be
    shorter) where ``y`` is ``x`` shifted by one token. Over all windows, every token except the first
    is a target exactly once and every token except the last is an input exactly once, in order -- the
    evaluator carries the recurrent state from one window into the next. ``max_tokens`` limits the
    number of targets (the first ``max_tokens`` predictions).

    Raises:
        DataError: the split has fewer than 2 tokens.
    """
    tokens = _as_tokens(tokens)
    if _check_nonneg_int("ctx_len", ctx_len) < 1:
        raise ValueError(f"ctx_len must be >= 1, got {ctx_len}")
    if max_tokens is not None and _check_nonneg_int("max_tokens", max_tokens) < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    n = len(tokens)
    if n < 2:
        raise DataError(f"the split has {n} token(s); evaluation needs at least 2")
    targets = n - 1 if max_tokens is None else min(n - 1, max_tokens)
    for start in range(0, targets, ctx_len):
        end = min(start + ctx_len, targets)
        w = torch.from_numpy(np.asarray(tokens[start:end + 1], dtype=np.int64))
        yield w[:-1].unsqueeze(0), w[1:].unsqueeze(0)


# ==================================================================================================
# Reporting
# ==================================================================================================
def format_summary(meta: Mapping[str, Any], data_dir: str | os.PathLike[str] | None = None) -> str:
    """Multi-line human-readable summary of a prepared dataset's meta."""
    kind = meta["vocab_kind"]
    vocab = f"vocab {kind}, {meta['vocab_size']:,} ids"
    if meta.get("unk_id") is not None:
        vocab += f" (unknown id {meta['unk_id']})"
    lines = [f"dataset{' ' + str(data_dir) if data_dir is not None else ''}: {vocab}, dtype {meta['dtype']}"]
    if meta.get("source"):
        lines.append(f"  source: {meta['source']}")
    for name, s in meta["splits"].items():
        line = f"  {name:<5} {s['tokens']:>13,} tokens  {s['bytes']:>13,} bytes  {s.get('chars', 0):>13,} chars"
        if "documents" in s:
            line += f"  {s['documents']:,} documents"
        if "words" in s:
            line += f"  {s['words']:,} words"
        if "files" in s:
            line += f"  {len(s['files'])} shard(s)"
        line += f"  unknown {s.get('unknown', 0):,}"
        if s.get("escaped_bytes"):
            line += f"  escaped bytes {s['escaped_bytes']:,}"
        lines.append(line)
    return "\n".join(lines)


# ==================================================================================================
# Default corpus: docstrings of the Python standard library
# ==================================================================================================
#: Cap on the default corpus text, in UTF-8 bytes. (CPython 3.11's docstrings give about 1.2 MB.)
DEFAULT_CORPUS_MAX_BYTES = 4_000_000
#: Prose rule: at least this many characters ...
DOCSTRING_MIN_CHARS = 200
#: ... of which at least this fraction are letters (str.isalpha) or whitespace.
DOCSTRING_MIN_PROSE_FRACTION = 0.8
#: Directories of the standard library that are skipped (tests, third-party packages, caches).
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
#: Bump when the extraction rule changes (cached corpora with another version are rebuilt).
_CORPUS_BUILDER_VERSION = 1
_CORPUS_NAME = "python-stdlib-docstrings"


_STMT_CONTAINERS = (ast.stmt, ast.excepthandler, ast.match_case)


def _docstrings_in_order(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order (depth-first)."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    # Docstring holders are statements, nested only in statement lists (bodies, else/finally blocks,
    # except handlers, match cases): no need to visit expressions.
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, _STMT_CONTAINERS):
            yield from _docstrings_in_order(child)


def _looks_like_prose(doc: str) -> bool:
    if len(doc) < DOCSTRING_MIN_CHARS:
        return False
    prose = sum(1 for c in doc if c.isalpha() or c.isspace())
    return prose >= DOCSTRING_MIN_PROSE_FRACTION * len(doc)


def extract_stdlib_docstrings(stdlib_dir: str | os.PathLike[str] | None = None,
                              max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> tuple[str, int]:
    """Deterministically collect English prose from the standard library's docstrings.

    Rule: walk ``stdlib_dir`` (default ``sysconfig.get_paths()["stdlib"]``) in sorted order, skipping
    directories named ``test``, ``tests``, ``idle_test``, ``site-packages``, ``dist-packages`` and
    ``__pycache__`` and files named ``test_*.py``; parse each ``.py`` file with :mod:`ast` (files that
    fail to parse are skipped); take module, class and function docstrings in source order
    (``ast.get_docstring(clean=True)``); keep those with at least :data:`DOCSTRING_MIN_CHARS` characters
    of which at least :data:`DOCSTRING_MIN_PROSE_FRACTION` are letters or whitespace; drop exact
    duplicates (first kept); join with blank lines, ending with a newline; stop before the docstring
    that would take the text over ``max_bytes`` UTF-8 bytes.

    Returns:
        ``(text, number_of_docstrings)``.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"Python standard library directory {root} not found; pass a prepared --data-dir instead")
    seen: set[str] = set()
    docs: list[str] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("test_"):
                continue
            try:
                source = (Path(dirpath) / fn).read_bytes()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source)
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
                continue
            for doc in _docstrings_in_order(tree):
                if doc in seen or not _looks_like_prose(doc):
                    continue
                n = len(doc.encode("utf-8", "surrogateescape")) + 2
                if size + n > max_bytes:
                    return "\n\n".join(docs) + "\n", len(docs)
                seen.add(doc)
                docs.append(doc)
                size += n
    return "\n\n".join(docs) + "\n" if docs else "", len(docs)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SPIKEGPT_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "spikegpt"


def _valid_default_corpus(d: Path) -> bool:
    try:
        meta = check_dataset(d)
    except DataError:
        return False
    corpus = meta.get("corpus", {})
    return (meta.get("source") == _CORPUS_NAME and isinstance(corpus, dict)
            and corpus.get("builder_version") == _CORPUS_BUILDER_VERSION)


def default_corpus_dir(cache_dir: str | os.PathLike[str] | None = None, *,
                       log: Callable[[str], None] | None = None) -> Path:
    """Path of the built-in default corpus (a prepared byte-vocab dataset), building it on first use.

    The corpus is the text of :func:`extract_stdlib_docstrings` for the running interpreter, prepared
    with the byte vocabulary, the last 10% (by bytes) as the val split, no test split. It lives in
    ``CACHE/default-corpus-py{major}{minor}`` where ``CACHE`` is ``cache_dir``, else ``$SPIKEGPT_CACHE``,
    else ``~/.cache/spikegpt``. It is built in a temporary sibling directory and renamed into place, so
    concurrent or interrupted runs are safe. A one-line message is printed (``log``, default stderr)
    when it is built.
    """
    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    root = _cache_root(cache_dir)
    target = root / f"default-corpus-py{sys.version_info.major}{sys.version_info.minor}"
    if _valid_default_corpus(target):
        return target
    root.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    text, n_docs = extract_stdlib_docstrings()
    data = text.encode("utf-8", "surrogateescape")
    if len(data) < 10_000:
        raise DataError(f"the Python standard library yielded only {len(data):,} bytes of docstrings; "
                        f"prepare a dataset with data/prepare_text.py and pass its directory instead")
    version = ".".join(map(str, sys.version_info[:3]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        meta = prepare_splits(
            data, tmp, "byte", val_fraction=0.1, source=_CORPUS_NAME,
            extra_meta={"corpus": {
                "name": _CORPUS_NAME,
                "python_version": version,
                "docstrings": n_docs,
                "text_sha256": hashlib.sha256(data).hexdigest(),
                "rule": (f"module/class/function docstrings of the stdlib (tests and site-packages skipped), "
                         f">= {DOCSTRING_MIN_CHARS} chars, >= {DOCSTRING_MIN_PROSE_FRACTION:.0%} letters or "
                         f"whitespace, exact duplicates dropped, capped at {DEFAULT_CORPUS_MAX_BYTES:,} bytes"),
                "builder_version": _CORPUS_BUILDER_VERSION,
            }},
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists), or an invalid old version is in the way.
            if _valid_default_corpus(target):
                return target
            trash = root / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    dt = time.perf_counter() - t0
    s = meta["splits"]
    log(f"spikegpt: prepared the default corpus (Python {version} stdlib docstrings: {n_docs:,} docstrings, "
        f"{len(data) / 1e6:.2f} MB; train {s['train']['tokens']:,} / val {s['val']['tokens']:,} byte tokens) "
        f"in {dt:.1f} s at {target}")
    return target
