"""A run directory (``--out-dir``): owned by one run at a time, and nothing in it lost.

It holds ``ckpt-{step:08d}.pt`` (the last ``--keep-checkpoints``), ``metrics.jsonl`` (one JSON record per
log line and evaluation), ``config.json`` (the run's settings) and ``.lock``.

* :class:`RunLock`: an OS-level exclusive lock on ``.lock`` (``flock``; a killed process releases it),
  holding the owner's pid and host, so a second process on the same directory is refused with the
  holder's name instead of overwriting the first one's checkpoints.
* :class:`MetricsLog`: ``metrics.jsonl``, appended line by line.  On resume the records after the
  resumed step (and an earlier final evaluation, which the resumed run repeats) are dropped; a torn
  last line (power loss, full disk) is dropped with a warning.  A fresh run in a directory whose
  log came from a run that never wrote a checkpoint moves that log aside (``metrics.jsonl.1``, ...).
* :func:`write_config`: ``config.json``, atomically, refusing to replace a file that is not ours.
* :class:`Wandb`: the optional Weights & Biases mirror of the log (``--wandb-mode``).
"""
from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

from .errors import UserError
from .fileio import atomic_write_json, atomic_write_text

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class RunDirError(UserError):
    """A run directory that cannot be used as asked."""


def prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"--out-dir {out_dir} is a file, not a directory: pass a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create --out-dir {out_dir}: {e.strerror or e}; pass a writable directory") from None


class RunLock:
    """Exclusive ownership of a run directory for the life of this object (a context manager)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self.file = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks to take
            return self
        try:
            self.file = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise RunDirError(f"cannot open {self.path}: {e.strerror or e}; pass a writable --out-dir") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise RunDirError(f"{self.path.parent} is in use by {holder}: wait for that run to finish (or stop "
                              "it), or pass another --out-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock
            self.file = None


def read_records(path: Path) -> list[dict]:
    """The complete records of a ``metrics.jsonl``; a torn or unreadable tail is dropped with a warning."""
    records = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a record")
        except ValueError:
            dropped = sum(1 for rest in lines[i:] if rest.strip())
            warnings.warn(f"{path}: line {i + 1} is torn or corrupt (an interrupted write?); it and the "
                          f"{dropped - 1} line(s) after it are dropped", stacklevel=2)
            break
        records.append(record)
    return records


class MetricsLog:
    """Append-only ``metrics.jsonl`` of a run (see the module docstring)."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / METRICS_FILE
        if self.path.exists():
            if resume_step is None:
                aside = _free_name(self.path)
                self.path.rename(aside)
                warnings.warn(f"{self.path} came from an earlier run that left no checkpoint; moved to "
                              f"{aside.name}", stacklevel=2)
            else:
                keep = [r for r in read_records(self.path)
                        if r.get("step", 0) <= resume_step and "final_eval" not in r]
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def _free_name(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{n}")


class Wandb:
    def __init__(self, mode: str, project: str, out_dir: Path, config: dict, run_id: str):
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise RunDirError("--wandb-mode needs the wandb package: pip install wandb "
                                "(or pip install -e '.[wandb]')") from None
        self.run = wandb.init(project=project, mode=mode, dir=str(out_dir), config=config, id=run_id,
                              resume="allow")

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def write_config(out_dir: Path, run_info: dict) -> None:
    """Write ``config.json``, refusing to replace one that another program wrote."""
    path = out_dir / CONFIG_FILE
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            existing = None
        if not (isinstance(existing, dict) and "model_config" in existing and "train_config" in existing):
            raise RunDirError(f"{path} exists and is not a spikegpt run's config: --out-dir {out_dir} is not a "
                              "run directory; pass another --out-dir")
    atomic_write_json(path, run_info)


__all__ = ["RunLock", "MetricsLog", "Wandb", "RunDirError", "prepare_dir", "read_records", "write_config",
           "METRICS_FILE", "CONFIG_FILE", "LOCK_FILE"]
