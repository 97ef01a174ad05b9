"""Text preparation: one byte string (a text file, enwik8, WikiText) -> a dataset of single-file splits.

The splits are contiguous slices of the source bytes: train, then val, then test (``docs/data.md``,
"Splits of a text"); the byte, char and BPE vocabularies are described in ``docs/data.md``,
"Vocabularies". Invalid UTF-8 is either refused (naming its offset) or kept byte for byte as escape
characters (``surrogateescape``). Writing follows the shared rules of :mod:`spikegpt.data.writer`.
"""
from __future__ import annotations

import codecs
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import tmp_name
from ..tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer
from .format import SINGLE_FILE_VERSION, SPLIT_NAMES, DataError, dtype_for_vocab
from .writer import assemble_meta, commit_meta, existing_dataset, fingerprint, load_bpe_tokenizer, retract_meta
from .writer import tokenizer_digest

__all__ = ["compute_split_bounds", "prepare_splits", "iter_text_chunks", "check_utf8", "codepoints",
           "is_escape"]

#: Bump when the bytes produced for the same inputs change (part of the fingerprint).
ENCODER_VERSION = 1
#: Streaming granularity when decoding / encoding large inputs.
CHUNK_BYTES = 1 << 23
_MAX_CODEPOINT = 0x110000


# ==================================================================================================
# UTF-8 helpers
# ==================================================================================================
def _sha256(data: bytes | memoryview) -> str:
    """sha256 of ``data``, read in chunks."""
    h = hashlib.sha256()
    mv = memoryview(data)
    for i in range(0, len(mv), CHUNK_BYTES):
        h.update(mv[i:i + CHUNK_BYTES])
    return h.hexdigest()


def iter_text_chunks(data: memoryview, errors: str = "surrogateescape") -> Iterator[str]:
    """Decode ``data`` as UTF-8 in chunks; multibyte characters are never split between chunks."""
    dec = codecs.getincrementaldecoder("utf-8")(errors=errors)
    n = len(data)
    if n == 0:
        return
    for i in range(0, n, CHUNK_BYTES):
        text = dec.decode(data[i:i + CHUNK_BYTES], final=i + CHUNK_BYTES >= n)
        if text:
            yield text


def check_utf8(data: memoryview, what: str) -> None:
    """Raise DataError naming the byte offset of the first invalid UTF-8 sequence."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    n = len(data)
    for i in range(0, n, CHUNK_BYTES):
        pending = len(dec.getstate()[0])
        try:
            dec.decode(data[i:i + CHUNK_BYTES], final=i + CHUNK_BYTES >= n)
        except UnicodeDecodeError as e:
            off = i - pending + e.start
            snippet = bytes(data[max(0, off - 8):off + 8])
            raise DataError(
                f"{what} is not valid UTF-8: {e.reason} at byte offset {off:,} (bytes around it: {snippet!r}); "
                f"convert it to UTF-8 first, or use --vocab byte, which accepts any bytes"
            ) from None


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def is_escape(cps: np.ndarray) -> np.ndarray:
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
    """Streams token ids into a temporary file next to ``final``; counts them and keeps their maximum."""

    def __init__(self, final: Path, dtype: np.dtype):
        self.final = final
        self.tmp = tmp_name(final)
        self.dtype = dtype
        self.tokens = 0
        self.max_id = -1
        self._f = open(self.tmp, "wb")

    def write(self, ids: np.ndarray | bytes | memoryview) -> None:
        """Append token ids (raw bytes: one uint8 id per byte)."""
        if isinstance(ids, (bytes, bytearray, memoryview)):
            ids = np.frombuffer(ids, dtype=np.uint8)
        arr = np.ascontiguousarray(ids, dtype=self.dtype)
        if arr.size:
            self._f.write(memoryview(arr).cast("B"))
            self.tokens += arr.size
            self.max_id = max(self.max_id, int(arr.max()))

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
        for text in iter_text_chunks(data):
            cps = codepoints(text)
            stats["chars"] += len(cps)
            stats["escaped_bytes"] += int(is_escape(cps).sum())
        for i in range(0, len(data), CHUNK_BYTES):
            writer.write(data[i:i + CHUNK_BYTES])
    elif vocab == "char":
        assert isinstance(tok, CharTokenizer)
        table = tok._lookup_table()
        for text in iter_text_chunks(data):
            cps = codepoints(text)
            stats["chars"] += len(cps)
            stats["escaped_bytes"] += int(is_escape(cps).sum())
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
        for text in iter_text_chunks(data, errors="strict"):
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
    for text in iter_text_chunks(data):
        counts += np.bincount(codepoints(text), minlength=_MAX_CODEPOINT)
    return CharTokenizer.from_codepoint_counts(counts, add_unk=True)


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
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Tokenise ``data`` into a prepared dataset directory (``docs/data.md``, "meta.json").

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
        inputs: the files ``data`` was read from; none of them is ever replaced by an output.

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

    tok = _tokenizer_for(vocab, tokenizer, utf8_errors)  # None: char vocab, built from the train split
    bounds = compute_split_bounds(mv, split_sizes=split_sizes, val_fraction=val_fraction,
                                  test_fraction=test_fraction)
    if vocab != "byte" and utf8_errors == "strict":
        check_utf8(mv, "the input")
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
    fp = fingerprint({
        "format_version": SINGLE_FILE_VERSION,
        "encoder_version": ENCODER_VERSION,
        "vocab": vocab,
        "tokenizer": None if tok is None else tokenizer_digest(tok.to_dict()),
        "bounds": bounds,
        "data_sha256": data_sha,
        "utf8_errors": utf8_errors,
    })
    existing = existing_dataset(out_dir, fp, overwrite=overwrite, log=log, inputs=inputs,
                                will_write=[f"{name}.bin" for name, _, _ in bounds])
    if existing is not None:
        return existing

    # ---- encode every split into temporary files, then commit ---------------------------------------
    if tok is None:
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
                            "byte_offset": a, "max_id": w.max_id}
            for k, v in ((split_extra or {}).get(name) or {}).items():
                if k in splits[name]:
                    raise ValueError(f"split_extra may not override the key {k!r}")
                splits[name][k] = v
        meta = assemble_meta(tok, dtype, version=SINGLE_FILE_VERSION, fingerprint=fp, created_by="spikegpt.data",
                             extra_meta=extra_meta,
                             fields={"source": source, "splits": splits, "split_rule": split_rule,
                                     "data_sha256": data_sha})
        stale = retract_meta(out_dir)  # meta.json goes first (out) and last (in)
        for w in writers:
            os.replace(w.tmp, w.final)
        return commit_meta(out_dir, meta, stale)
    finally:
        for w in writers:
            w.discard()


def _tokenizer_for(vocab: str, tokenizer: Tokenizer | str | os.PathLike[str] | None,
                   utf8_errors: str) -> Tokenizer | None:
    """The tokenizer of ``vocab`` from :func:`prepare_splits`' argument (``None``: a char vocab to build)."""
    if vocab == "byte":
        if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
            raise DataError("vocab 'byte' takes no tokenizer")
        return ByteTokenizer()
    if vocab == "char":
        if tokenizer is not None and not isinstance(tokenizer, CharTokenizer):
            raise DataError(f"vocab 'char' needs a CharTokenizer, got {type(tokenizer).__name__}")
        return tokenizer
    if tokenizer is None:
        raise DataError("vocab 'bpe' needs a tokenizer: pass --tokenizer PATH/tokenizer.json")
    tok = load_bpe_tokenizer(tokenizer)
    if not isinstance(tok, BPETokenizer):
        raise DataError(f"vocab 'bpe' needs a BPETokenizer, got {type(tok).__name__}")
    if utf8_errors != "strict":
        raise DataError("vocab 'bpe' needs valid UTF-8 text (utf8_errors='strict')")
    return tok
