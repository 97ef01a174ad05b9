"""Document corpora (OpenWebText2 and the like) -> sharded token datasets, in parallel and resumably.

Inputs are ``.jsonl.zst``/``.jsonl`` files (one JSON document per line, its ``"text"``) and ``.txt``
files (one document each); every document is followed by the end-of-text token and goes to val by a
hash of its text (``docs/data.md``, "Document corpora"). Tokenizing runs in ``workers`` processes
with a bounded number of batches in flight, so memory stays bounded whatever the corpus size. Shards
are written in place with a commit point after every input file, so an interrupted run resumes to
the same bytes (``docs/data.md``, "Resuming a preparation"); the rest of writing is
:mod:`spikegpt.data.writer`'s.
"""

from __future__ import annotations

import io
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

from ..tokenizer import EOT_TOKEN, BPETokenizer, Tokenizer, tokenizer_from_dict
from .format import SHARDED_VERSION, DataError, dtype_for_vocab
from .inputs import find_inputs, input_kind, is_val_document, open_lines, parse_line, read_txt
from .writer import (PROGRESS_FILE, assemble_meta, commit_meta, existing_dataset, fingerprint, load_bpe_tokenizer,
                     read_progress, remove_files, retract_meta, tokenizer_digest, write_progress)

__all__ = ["prepare_documents"]
#: Bump when the tokens produced for the same inputs change (part of the fingerprint).
PIPELINE_VERSION = 1
_SHARD_RE = re.compile(r"^(train|val)-(\d{5,})\.bin$")
_SPLITS = ("train", "val")


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
        text = item if kind == "text" else parse_line(item, f"{name} line {first_line + k}")  # type: ignore[arg-type]
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
                      "chars": sum(len(d) for d in docs), "max_id": int(arr.max())}
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
    return {"tokens": 0, "documents": 0, "bytes": 0, "chars": 0, "max_id": -1}


def _batches(path: Path, name: str, batch_docs: int, batch_bytes: int
             ) -> Iterator[tuple[str, str, int, list[Any], int]]:
    """``(kind, name, first_line, items, raw_bytes)`` jobs for one input file, streamed."""
    if input_kind(path) == ".txt":
        text = read_txt(path)
        yield "text", name, 1, [text], len(text.encode("utf-8", "surrogatepass"))
        return
    items: list[bytes] = []
    first, size = 1, 0
    for i, line in enumerate(open_lines(path), 1):
        if not items:
            first = i
        items.append(line)
        size += len(line)
        if len(items) >= batch_docs or size >= batch_bytes:
            yield "lines", name, first, items, size
            items, size = [], 0
    if items:
        yield "lines", name, first, items, size


def _shard_names(out_dir: Path) -> list[str]:
    """Names of the shard-like files in ``out_dir`` (none when it is not a directory)."""
    return sorted(f.name for f in out_dir.iterdir() if _SHARD_RE.match(f.name)) if out_dir.is_dir() else []


def _start_or_resume(out_dir: Path, fp: str, n_files: int, dtype: np.dtype, overwrite: bool,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """The progress state to continue from: the marker of an unfinished run with this fingerprint (its
    shards checked, anything written after its last commit removed), else a fresh one."""
    state = read_progress(out_dir, fp, overwrite=overwrite)
    if state is None:
        state = {"fingerprint": fp, "done": [], "empty": 0,
                 "streams": {s: {"closed": [], "open_tokens": 0} for s in _SPLITS},
                 "stats": {s: _empty_stats() for s in _SPLITS}, "inputs": []}
        remove_files(out_dir, _shard_names(out_dir))
        write_progress(out_dir, state)
        return state
    keep = set()
    for s in _SPLITS:
        st = state["streams"][s]
        keep.update(c["file"] for c in st["closed"])
        if st["open_tokens"]:
            keep.add(f"{s}-{len(st['closed']):05d}.bin")
        for c in st["closed"]:
            f = out_dir / c["file"]
            if not f.is_file() or f.stat().st_size != c["tokens"] * dtype.itemsize:
                raise DataError(f"cannot resume in {out_dir}: shard {c['file']} is missing or has the wrong "
                                f"size; pass --overwrite to start over")
        state["stats"][s].setdefault("max_id", None)  # begun before max_id was recorded: open_split computes it
    remove_files(out_dir, set(_shard_names(out_dir)) - keep)
    say(f"resuming: {len(state['done'])} of {n_files} input file(s) already done "
        f"({state['stats']['train']['tokens'] + state['stats']['val']['tokens']:,} tokens)")
    return state


class _Run:
    """Encodes the input files not yet done into the shard streams, committing after each file."""

    def __init__(self, out_dir: Path, state: dict[str, Any], streams: dict[str, _ShardStream], progress: bool):
        self.out_dir, self.state, self.streams = out_dir, state, streams
        self.stats = {s: dict(state["stats"][s]) for s in _SPLITS}
        self.done: list[str] = list(state["done"])
        self.inputs: list[dict[str, Any]] = list(state["inputs"])
        self.empty = int(state["empty"])
        self.text_bytes = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(unit=" docs", unit_scale=True, desc="tokenizing", dynamic_ncols=True, file=sys.stderr,
                            initial=self.stats["train"]["documents"] + self.stats["val"]["documents"])

    def consume(self, res: dict[str, Any], fstats: dict[str, Any]) -> None:
        """Append one encoded batch to the streams and count it."""
        self.empty += res["empty"]
        for s in _SPLITS:
            r = res.get(s)
            if not r:
                continue
            self.streams[s].write(r["tokens"])
            st = self.stats[s]
            for key, value in (("tokens", r["n_tokens"]), ("documents", r["documents"]), ("bytes", r["bytes"]),
                               ("chars", r["chars"])):
                st[key] += value
            if st["max_id"] is not None:
                st["max_id"] = max(st["max_id"], r["max_id"])
            fstats["documents"] += r["documents"]
            fstats["tokens"] += r["n_tokens"]
            fstats["bytes"] += r["bytes"]
            self.text_bytes += r["bytes"]
        if self.bar is not None:
            el = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"tokens {self.stats['train']['tokens'] + self.stats['val']['tokens']:,}  "
                                     f"text {self.text_bytes / el / 1e6:.1f} MB/s", refresh=False)
            self.bar.update(sum(res[s]["documents"] for s in _SPLITS if res.get(s)))

    def commit(self, fstats: dict[str, Any]) -> None:
        """A commit point: the shards are synced, then the progress marker records the finished file."""
        for s in _SPLITS:
            self.streams[s].sync()
        self.done.append(fstats["name"])
        self.inputs.append(fstats)
        self.state = {"fingerprint": self.state["fingerprint"], "done": self.done, "empty": self.empty,
                      "streams": {s: self.streams[s].state() for s in _SPLITS}, "stats": self.stats,
                      "inputs": self.inputs}
        write_progress(self.out_dir, self.state)

    def encode(self, files: list[tuple[Path, str]], pool: Any, workers: int, batch_docs: int, batch_bytes: int,
               on_file_done: Callable[[str], None] | None) -> None:
        done = set(self.done)
        for i_file, (path, name) in enumerate(files):
            if name in done:
                continue
            fstats = {"name": name, "documents": 0, "tokens": 0, "bytes": 0}
            if self.bar is not None:
                self.bar.set_description(f"file {i_file + 1}/{len(files)}", refresh=False)
            jobs = _batches(path, name, batch_docs, batch_bytes)
            if pool is None:
                for job in jobs:
                    self.consume(_encode_batch(job[:4]), fstats)
            else:
                pending: deque = deque()
                for job in jobs:
                    pending.append(pool.apply_async(_encode_batch, (job[:4],)))
                    if len(pending) >= 2 * workers + 2:
                        self.consume(pending.popleft().get(), fstats)
                while pending:
                    self.consume(pending.popleft().get(), fstats)
            self.commit(fstats)
            if on_file_done is not None:
                on_file_done(name)


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
        overwrite: replace a different dataset (or a different unfinished preparation, or shard files of
            another origin) in ``out_dir``.
        progress: show a tqdm progress bar (documents, tokens, MB/s).
        log: one-line notes (resuming, nothing to do, empty split); ``None`` for silence.
        on_file_done: called with an input's name after its progress has been committed (tests use it to
            simulate an interruption).

    Returns:
        The meta dict written (or already present).
    """
    out_dir = Path(out_dir)
    say = log or (lambda _m: None)
    tok = load_bpe_tokenizer(tokenizer)
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
    dtype = dtype_for_vocab(tok.vocab_size)
    tok_dict = tok.to_dict()
    fp = fingerprint({
        "pipeline": PIPELINE_VERSION,
        "tokenizer": tokenizer_digest(tok_dict),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "inputs": [{"name": n, "bytes": p.stat().st_size} for p, n in files],
    })
    resumable = (out_dir / PROGRESS_FILE).exists()
    existing = existing_dataset(out_dir, fp, overwrite=overwrite, log=log,
                                will_write=[] if resumable else _shard_names(out_dir))
    if existing is not None:
        return existing
    stale = retract_meta(out_dir)  # shards are written in place: the directory must not look complete
    state = _start_or_resume(out_dir, fp, len(files), dtype, overwrite, say)

    streams = {s: _ShardStream(out_dir, s, dtype, shard_tokens, state["streams"][s]["closed"],
                               state["streams"][s]["open_tokens"]) for s in _SPLITS}
    run = _Run(out_dir, state, streams, progress)
    pool = None
    prev_par = os.environ.get("TOKENIZERS_PARALLELISM")
    init_args = (tok_dict, eot, val_fraction, dtype.str)
    if workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=init_args)
    else:
        _worker_init(*init_args)
    try:
        run.encode(files, pool, workers, batch_docs, batch_bytes, on_file_done)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        elif prev_par is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = prev_par
        if run.bar is not None:
            run.bar.close()
        for s in _SPLITS:
            streams[s].close()
    elapsed = time.perf_counter() - run.t0

    # ---- finish: meta.json last ----------------------------------------------------------------------
    splits: dict[str, Any] = {}
    for s in _SPLITS:
        shards = streams[s].finish()
        st = run.stats[s]
        if st["tokens"] == 0:
            say(f"warning: the {s} split received no documents and is left out"
                + (" (raise --val-fraction)" if s == "val" else ""))
            continue
        splits[s] = {"files": shards, "tokens": st["tokens"], "bytes": st["bytes"], "chars": st["chars"],
                     "documents": st["documents"], "unknown": 0, "escaped_bytes": 0}
        if st["max_id"] is not None:
            splits[s]["max_id"] = st["max_id"]
    if "train" not in splits:
        raise DataError("no documents found in the inputs (all empty?)")
    meta = assemble_meta(tok, dtype, version=SHARDED_VERSION, fingerprint=fp, created_by="spikegpt.data.documents",
                         extra_meta=extra_meta, fields={
                             "eot_id": eot,
                             "source": source,
                             "splits": splits,
                             "split_rule": (f"document hash: blake2b(utf-8 text, digest_size=8) as a big-endian "
                                            f"integer / 2**64 < {val_fraction} -> val, else train; {EOT_TOKEN} "
                                            f"(id {eot}) after every document"),
                             "shard_tokens": shard_tokens,
                             "inputs": run.inputs,
                             "documents_skipped_empty": run.empty,
                         })
    meta = commit_meta(out_dir, meta, stale | set(_shard_names(out_dir)))
    meta["_elapsed_s"] = elapsed  # not stored; for the CLI's throughput line
    meta["_text_bytes_this_run"] = run.text_bytes
    return meta
