"""Document corpora (OpenWebText2 and the like) -> sharded token datasets, in parallel and resumably.

Input
=====
:func:`find_inputs` expands files and directories (recursively, sorted by path) into input files of
three kinds:

* ``.jsonl.zst`` (the OpenWebText2 / Pile release format; needs ``pip install zstandard``) and
  ``.jsonl``: one JSON object per line, the document is its ``"text"`` field (other fields such as
  ``"meta"`` are ignored; blank lines are skipped);
* ``.txt``: the whole file is ONE document (UTF-8).

Documents with empty text are skipped (counted in ``meta["documents_skipped_empty"]``).

Output
======
A prepared dataset in the format of :mod:`spikegpt.data` (``meta.json`` version 2, sharded splits):
``train-00000.bin, train-00001.bin, ...`` and ``val-00000.bin, ...``, each ``shard_tokens`` tokens
except the last of a split. Each document is encoded on its own (``add_special_tokens=False``) and
followed by the end-of-text token (``<|endoftext|>``; id 0 for GPT-NeoX), so a split is the stream
``doc, EOT, doc, EOT, ...`` in input order (files sorted, lines in file order), independent of the
number of workers. A document may continue from one shard into the next.

Split rule: a document goes to val iff ``int.from_bytes(blake2b(utf8(text), digest_size=8), "big") /
2**64 < val_fraction`` -- a deterministic function of its text alone (exact duplicates always land in
the same split). Per split, meta records ``tokens`` (EOT tokens included), ``documents``, ``bytes``
(UTF-8 bytes of the document texts; EOT adds none) and ``chars`` (Unicode characters), so that bits per
byte = total NLL in bits / bytes. A split that receives no document is left out of meta with a warning.

Parallelism and memory
======================
The main process streams each input file (decompressing on the fly) and sends batches of raw lines to
``workers`` tokenizer processes (a ``multiprocessing`` pool; at most ``2 * workers + 2`` batches in
flight, so memory stays bounded whatever the corpus size); results are consumed in submission order.
``workers=1`` tokenizes in the main process. Within each process ``tokenizers``' own thread pool is
disabled (``TOKENIZERS_PARALLELISM=false``) so that ``workers`` is the number of busy cores.

Resuming
========
Shards are written in place in the output directory; after every completed input file the shards are
fsynced and a progress file ``.prepare-progress.json`` is replaced atomically. It records the run's
configuration fingerprint, the completed input files, every split's closed shards and the committed
length of its open shard, and the statistics so far. A re-run with the same configuration truncates
the open shards to their committed lengths, deletes shards written after the last commit, skips the
completed files and carries on: the result is byte-identical to an uninterrupted run. ``meta.json`` is
written last (and the progress file removed), so an interrupted directory never looks complete. A
re-run of a finished preparation with the same configuration is a no-op; a different configuration is
refused unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import FORMAT, META_FILE, DataError, _atomic_write_text, _meta_json, check_dataset, split_files
from .tokenizer import EOT_TOKEN, BPETokenizer, Tokenizer, tokenizer_from_dict

__all__ = [
    "INPUT_SUFFIXES",
    "SHARDED_VERSION",
    "find_inputs",
    "iter_documents",
    "val_hash_fraction",
    "is_val_document",
    "shard_dtype",
    "prepare_documents",
]

INPUT_SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")
SHARDED_VERSION = 2
PROGRESS_FILE = ".prepare-progress.json"
#: Bump when the tokens produced for the same inputs change (part of the fingerprint).
_PIPELINE_VERSION = 1
_SHARD_RE = re.compile(r"^(train|val)-(\d{5,})\.bin$")
_SPLITS = ("train", "val")


# ==================================================================================================
# Inputs
# ==================================================================================================
def _input_kind(path: Path) -> str | None:
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
            found = sorted((f for f in p.rglob("*") if f.is_file() and _input_kind(f)),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise DataError(f"input directory {p} holds no {', '.join(INPUT_SUFFIXES)} files")
            out.extend((f, f"{p.name}/{f.relative_to(p).as_posix()}") for f in found)
        elif p.is_file():
            if not _input_kind(p):
                raise DataError(f"input file {p} is not one of {', '.join(INPUT_SUFFIXES)}")
            out.append((p, p.name))
        else:
            raise DataError(f"input {p} not found")
    names = [n for _, n in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"inputs named twice (or two inputs with the same name): {dup[:5]}")
    return out


def _open_lines(path: Path) -> Iterator[bytes]:
    """Lines (bytes, newline stripped) of a .jsonl or .jsonl.zst file, streamed."""
    if _input_kind(path) == ".jsonl.zst":
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


def _parse_line(line: bytes, where: str) -> str | None:
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
    if _input_kind(path) == ".txt":
        yield _read_txt(path)
        return
    for i, line in enumerate(_open_lines(path), 1):
        text = _parse_line(line, f"{path.name} line {i}")
        if text is not None:
            yield text


def _read_txt(path: Path) -> str:
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
    """True when the document goes to the val split (see the module docstring)."""
    return val_hash_fraction(text) < val_fraction


def shard_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32`` (little-endian)."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise DataError(f"vocab_size {vocab_size} does not fit uint32")


# ==================================================================================================
# Worker side
# ==================================================================================================
_W: dict[str, Any] = {}


def _worker_init(tok_dict: dict[str, Any], eot_id: int, val_fraction: float, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(tok=tokenizer_from_dict(tok_dict), eot=eot_id, val_fraction=val_fraction, dtype=np.dtype(dtype))


def _encode_batch(job: tuple[str, str, int, list[bytes] | list[str]]) -> dict[str, Any]:
    """Encode one batch of documents; returns per-split token bytes and counts (in document order)."""
    kind, name, first_line, items = job
    tok: Tokenizer = _W["tok"]
    texts: list[str] = []
    for k, item in enumerate(items):
        text = item if kind == "text" else _parse_line(item, f"{name} line {first_line + k}")  # type: ignore[arg-type]
        if text is None:
            continue
        texts.append(text)
    res: dict[str, Any] = {"empty": 0}
    per_split: dict[str, list[str]] = {"train": [], "val": []}
    for t in texts:
        if not t:
            res["empty"] += 1
            continue
        per_split["val" if is_val_document(t, _W["val_fraction"]) else "train"].append(t)
    eot = _W["eot"]
    for split, docs in per_split.items():
        if not docs:
            res[split] = None
            continue
        if isinstance(tok, BPETokenizer):
            encoded = tok.encode_batch(docs)
        else:
            encoded = [tok.encode(d) for d in docs]
        n_tok = sum(len(e) for e in encoded) + len(encoded)
        arr = np.empty(n_tok, dtype=_W["dtype"])
        pos = 0
        for e in encoded:
            arr[pos:pos + len(e)] = e
            pos += len(e)
            arr[pos] = eot
            pos += 1
        n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
        res[split] = {"tokens": arr.tobytes(), "n_tokens": n_tok, "documents": len(docs), "bytes": n_bytes,
                      "chars": sum(len(d) for d in docs)}
    return res


# ==================================================================================================
# Main side: shard writing with commit points
# ==================================================================================================
class _ShardStream:
    """Appends a split's tokens into fixed-size shard files ``{split}-{k:05d}.bin``."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 closed: list[dict[str, Any]], open_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.closed = [dict(c) for c in closed]
        self.open_tokens = open_tokens
        self._f: io.BufferedWriter | None = None
        path = self._open_path()
        if open_tokens:  # resume: cut what was written after the last commit
            try:
                with open(path, "r+b") as f:
                    if os.fstat(f.fileno()).st_size < open_tokens * dtype.itemsize:
                        raise DataError(f"shard {path.name} is shorter than its committed length")
                    f.truncate(open_tokens * dtype.itemsize)
            except (OSError, DataError) as e:
                raise DataError(f"cannot resume in {out_dir}: {e}; pass --overwrite to start over") from None

    def _open_path(self) -> Path:
        return self.out_dir / f"{self.split}-{len(self.closed):05d}.bin"

    def _file(self) -> io.BufferedWriter:
        if self._f is None:
            self._f = open(self._open_path(), "ab")
        return self._f

    def write(self, data: bytes) -> None:
        item = self.dtype.itemsize
        mv = memoryview(data)
        while len(mv):
            room = (self.shard_tokens - self.open_tokens) * item
            chunk = mv[:room]
            self._file().write(chunk)
            self.open_tokens += len(chunk) // item
            mv = mv[len(chunk):]
            if self.open_tokens == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        f = self._file()
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._f = None
        self.closed.append({"file": self._open_path().name, "tokens": self.open_tokens})
        self.open_tokens = 0

    def sync(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def finish(self) -> list[dict[str, Any]]:
        if self.open_tokens:
            self._close_shard()
        elif self._f is not None:
            self._f.close()
            self._f = None
        return self.closed

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def state(self) -> dict[str, Any]:
        return {"closed": self.closed, "open_tokens": self.open_tokens}


def _empty_stats() -> dict[str, int]:
    return {"tokens": 0, "documents": 0, "bytes": 0, "chars": 0}


def _batches(path: Path, name: str, batch_docs: int, batch_bytes: int
             ) -> Iterator[tuple[str, str, int, list[Any], int]]:
    """``(kind, name, first_line, items, raw_bytes)`` jobs for one input file, streamed."""
    if _input_kind(path) == ".txt":
        text = _read_txt(path)
        yield "text", name, 1, [text], len(text.encode("utf-8", "surrogatepass"))
        return
    items: list[bytes] = []
    first, size = 1, 0
    for i, line in enumerate(_open_lines(path), 1):
        if not items:
            first = i
        items.append(line)
        size += len(line)
        if len(items) >= batch_docs or size >= batch_bytes:
            yield "lines", name, first, items, size
            items, size = [], 0
    if items:
        yield "lines", name, first, items, size


def _remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    for f in out_dir.iterdir():
        if _SHARD_RE.match(f.name) and f.name not in keep:
            f.unlink()


def prepare_documents(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    tokenizer: Tokenizer | str | os.PathLike[str],
    *,
    val_fraction: float = 0.005,
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    batch_docs: int = 512,
    batch_bytes: int = 4 << 20,
    source: str = "",
    overwrite: bool = False,
    progress: bool = True,
    extra_meta: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
    on_file_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenise document corpora into a sharded dataset directory; resumable (see the module docstring).

    Args:
        inputs: files and/or directories (see :func:`find_inputs`).
        out_dir: output dataset directory (created if needed).
        tokenizer: a tokenizer with an end-of-text id (normally a :class:`BPETokenizer`), or the path of
            a ``tokenizer.json``.
        val_fraction: expected fraction of documents in val (hash rule), in ``[0, 1)``.
        shard_tokens: tokens per shard file.
        workers: tokenizer processes (1: tokenize in this process).
        batch_docs, batch_bytes: a batch sent to a worker ends after this many lines or raw bytes.
        source: free-form description stored in ``meta["source"]``.
        overwrite: replace a different dataset (or a different unfinished preparation) in ``out_dir``.
        progress: show a tqdm progress bar (documents, tokens, MB/s).
        log: one-line notes (resuming, nothing to do, empty split); ``None`` for silence.
        on_file_done: called with an input's name after its progress has been committed (tests use it to
            simulate an interruption).

    Returns:
        The meta dict written (or already present).
    """
    out_dir = Path(out_dir)
    say = log or (lambda _m: None)
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            tokenizer = BPETokenizer(os.fspath(tokenizer))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot load the tokenizer: {e}") from e
    tok: Tokenizer = tokenizer
    eot = tok.eot_id
    if eot is None:
        raise DataError(f"the tokenizer has no {EOT_TOKEN} token, which is appended after every document; "
                        f"use a tokenizer that has it (data/train_tokenizer.py adds it as id 0)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    files = find_inputs(inputs)
    dtype = shard_dtype(tok.vocab_size)
    tok_dict = tok.to_dict()
    file_records = [{"name": n, "bytes": p.stat().st_size} for p, n in files]
    fingerprint = hashlib.sha256(json.dumps({
        "pipeline": _PIPELINE_VERSION,
        "tokenizer": hashlib.sha256(json.dumps(tok_dict, sort_keys=True).encode("utf-8", "surrogatepass"))
        .hexdigest(),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "inputs": file_records,
    }, sort_keys=True).encode()).hexdigest()

    # ---- existing output -------------------------------------------------------------------------
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_path = out_dir / PROGRESS_FILE
    if (out_dir / META_FILE).exists():
        try:
            existing: dict[str, Any] = check_dataset(out_dir)
        except DataError:
            existing = {}
        if existing.get("fingerprint") == fingerprint:
            progress_path.unlink(missing_ok=True)  # left by a crash just after meta.json was written
            say(f"{out_dir} already holds this dataset (identical configuration); nothing to do")
            return existing
        if not overwrite:
            raise DataError(f"{out_dir} already holds {'a different dataset' if existing else 'a corrupt dataset'}; "
                            f"pass --overwrite to replace it, or choose another --out")
        (out_dir / META_FILE).unlink()
    state: dict[str, Any] | None = None
    if progress_path.exists():
        try:
            state = json.loads(progress_path.read_text("utf-8"))
        except (OSError, ValueError):
            state = None
        if state is not None and state.get("fingerprint") != fingerprint:
            if not overwrite:
                raise DataError(f"{out_dir} holds an unfinished preparation with a different configuration "
                                f"(inputs, tokenizer, --val-fraction or --shard-tokens); re-run it with the same "
                                f"arguments to resume, or pass --overwrite to start over")
            state = None
    if state is None:
        state = {"fingerprint": fingerprint, "done": [], "empty": 0,
                 "streams": {s: {"closed": [], "open_tokens": 0} for s in _SPLITS},
                 "stats": {s: _empty_stats() for s in _SPLITS}, "inputs": []}
        _remove_stale_shards(out_dir, set())
        _atomic_write_text(progress_path, json.dumps(state))
    else:
        keep = set()
        for s in _SPLITS:
            st = state["streams"][s]
            keep.update(c["file"] for c in st["closed"])
            if st["open_tokens"]:
                keep.add(f"{s}-{len(st['closed']):05d}.bin")
        _remove_stale_shards(out_dir, keep)
        for s in _SPLITS:
            for c in state["streams"][s]["closed"]:
                f = out_dir / c["file"]
                if not f.is_file() or f.stat().st_size != c["tokens"] * dtype.itemsize:
                    raise DataError(f"cannot resume in {out_dir}: shard {c['file']} is missing or has the wrong "
                                    f"size; pass --overwrite to start over")
        say(f"resuming: {len(state['done'])} of {len(files)} input file(s) already done "
            f"({state['stats']['train']['tokens'] + state['stats']['val']['tokens']:,} tokens)")

    streams = {s: _ShardStream(out_dir, s, dtype, shard_tokens, state["streams"][s]["closed"],
                               state["streams"][s]["open_tokens"]) for s in _SPLITS}
    stats = {s: dict(state["stats"][s]) for s in _SPLITS}
    done: list[str] = list(state["done"])
    input_stats: list[dict[str, Any]] = list(state["inputs"])
    empty = int(state["empty"])

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit=" docs", unit_scale=True, desc="tokenizing", dynamic_ncols=True, file=sys.stderr,
                   initial=stats["train"]["documents"] + stats["val"]["documents"])
    pool = None
    prev_par = os.environ.get("TOKENIZERS_PARALLELISM")
    init_args = (tok_dict, eot, val_fraction, dtype.str)
    if workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=init_args)
    else:
        _worker_init(*init_args)
    t0 = time.perf_counter()
    text_bytes = 0
    try:
        done_set = set(done)
        for i_file, (path, name) in enumerate(files):
            if name in done_set:
                continue
            fstats = {"name": name, "documents": 0, "tokens": 0, "bytes": 0}
            if bar is not None:
                bar.set_description(f"file {i_file + 1}/{len(files)}", refresh=False)

            def consume(res: dict[str, Any]) -> None:
                nonlocal empty, text_bytes
                empty += res["empty"]
                for s in _SPLITS:
                    r = res.get(s)
                    if not r:
                        continue
                    streams[s].write(r["tokens"])
                    st = stats[s]
                    st["tokens"] += r["n_tokens"]
                    st["documents"] += r["documents"]
                    st["bytes"] += r["bytes"]
                    st["chars"] += r["chars"]
                    fstats["documents"] += r["documents"]
                    fstats["tokens"] += r["n_tokens"]
                    fstats["bytes"] += r["bytes"]
                    text_bytes += r["bytes"]
                if bar is not None:
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"tokens {stats['train']['tokens'] + stats['val']['tokens']:,}  "
                                        f"text {text_bytes / el / 1e6:.1f} MB/s", refresh=False)
                    bar.update(sum(res[s]["documents"] for s in _SPLITS if res.get(s)))

            jobs = _batches(path, name, batch_docs, batch_bytes)
            if pool is None:
                for job in jobs:
                    consume(_encode_batch(job[:4]))
            else:
                pending: deque = deque()
                max_pending = 2 * workers + 2
                for job in jobs:
                    pending.append(pool.apply_async(_encode_batch, (job[:4],)))
                    if len(pending) >= max_pending:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
            # ---- commit this input file ----
            for s in _SPLITS:
                streams[s].sync()
            done.append(name)
            done_set.add(name)
            input_stats.append(fstats)
            state = {"fingerprint": fingerprint, "done": done, "empty": empty,
                     "streams": {s: streams[s].state() for s in _SPLITS}, "stats": stats, "inputs": input_stats}
            _atomic_write_text(progress_path, json.dumps(state))
            if on_file_done is not None:
                on_file_done(name)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        elif prev_par is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = prev_par
        if bar is not None:
            bar.close()
        for s in _SPLITS:
            streams[s].close()
    elapsed = time.perf_counter() - t0

    # ---- finish: meta.json last ----------------------------------------------------------------------
    splits: dict[str, Any] = {}
    for s in _SPLITS:
        shards = streams[s].finish()
        if stats[s]["tokens"] == 0:
            say(f"warning: the {s} split received no documents and is left out"
                + (" (raise --val-fraction)" if s == "val" else ""))
            continue
        splits[s] = {"files": shards, "tokens": stats[s]["tokens"], "bytes": stats[s]["bytes"],
                     "chars": stats[s]["chars"], "documents": stats[s]["documents"],
                     "unknown": 0, "escaped_bytes": 0}
    if "train" not in splits:
        raise DataError("no documents found in the inputs (all empty?)")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": SHARDED_VERSION,
        "vocab_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "tokenizer": tok_dict,
        "unk_id": getattr(tok, "unk_id", None),
        "eot_id": eot,
        "source": source,
        "splits": splits,
        "split_rule": (f"document hash: blake2b(utf-8 text, digest_size=8) as a big-endian integer / 2**64 "
                       f"< {val_fraction} -> val, else train; {EOT_TOKEN} (id {eot}) after every document"),
        "shard_tokens": shard_tokens,
        "inputs": input_stats,
        "documents_skipped_empty": empty,
        "fingerprint": fingerprint,
        "created_by": "spikegpt.corpus",
    }
    for k, v in (extra_meta or {}).items():
        if k in meta:
            raise ValueError(f"extra_meta may not override the key {k!r}")
        meta[k] = v
    text = _meta_json(meta)
    _atomic_write_text(out_dir / META_FILE, text)
    _remove_stale_shards(out_dir, set(split_files(meta)))
    progress_path.unlink(missing_ok=True)
    meta = json.loads(text)
    meta["_elapsed_s"] = elapsed  # not stored; for the CLI's throughput line
    meta["_text_bytes_this_run"] = text_bytes
    return meta
