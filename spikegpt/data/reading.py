"""Opening prepared datasets: memory-mapped splits (single files or shards), validation, the tokenizer.

Token files are memory-mapped read-only and never read whole into RAM; a sharded split behaves like
one 1-D array (``docs/data.md``, "Shards"). Opening a split checks its file sizes against
``meta.json`` and its largest token id against the vocabulary (``docs/data.md``, "Checks on opening").
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import Tokenizer, tokenizer_from_dict
from .format import META_FILE, DataError, load_meta, token_dtype

__all__ = ["ShardedTokens", "open_split", "check_dataset", "load_tokenizer", "format_summary"]


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


def _check_token_ids(d: Path, entry: Mapping[str, Any], arrays: Sequence[np.ndarray],
                     files: Sequence[str], vocab_size: int) -> None:
    """Every id of the split must be below ``vocab_size``: checked against ``entry["max_id"]`` (stored at
    preparation time), or, for datasets prepared before it was stored, by a vectorised max over the files."""
    if np.iinfo(arrays[0].dtype).max < vocab_size:  # the dtype cannot hold an id beyond the vocabulary
        return
    max_id = entry.get("max_id")
    if isinstance(max_id, bool) or not isinstance(max_id, int):
        max_id = max(int(a.max()) for a in arrays)
    if max_id < vocab_size:
        return
    bad = next((f for a, f in zip(arrays, files) if int(a.max()) >= vocab_size), files[0])
    raise DataError(f"split file {d / bad} holds token id {max_id:,} (or larger), beyond the vocabulary of "
                    f"{d / META_FILE} ({vocab_size:,} ids): the tokens were not prepared with this meta.json's "
                    f"tokenizer; re-run the preparation with --overwrite")


def open_split(data_dir: str | os.PathLike[str], split: str,
               meta: Mapping[str, Any] | None = None, vocab_size: int | None = None) -> np.memmap | ShardedTokens:
    """Memory-map one split's tokens (read-only, 1-D, dtype from meta).

    Returns an ``np.memmap`` for a single-file split and a :class:`ShardedTokens` (same array-like
    interface: ``len``, slicing, ``np.asarray`` of a slice) for a sharded split.

    Raises:
        DataError: unknown split, split file missing, file size not matching meta (truncated/corrupt),
            empty split, a token id beyond meta's vocabulary, or a vocabulary other than ``vocab_size``
            (that of the model to be fed).
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
    dtype = token_dtype(meta["dtype"])
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
        names = [f["file"] for f in files]
        _check_token_ids(d, entry, shards, names, int(meta["vocab_size"]))
        return ShardedTokens(shards, names)
    tokens = _open_token_file(d, entry.get("file", ""), n, dtype, split)
    _check_token_ids(d, entry, [tokens], [entry["file"]], int(meta["vocab_size"]))
    return tokens


def check_dataset(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate ``meta.json`` and every split file (sizes, token ids); return the meta. Raises DataError."""
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
