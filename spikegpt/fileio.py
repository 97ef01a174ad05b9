"""Writing files so that a crash, a full disk or a second process never leaves half of one.

Every file the tools write goes through :func:`atomic_write` (or its text / JSON forms): the content
fills a temporary file in the same directory, which is fsynced and renamed over the target (then the
directory is fsynced), so a reader sees the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable


def tmp_name(final: Path) -> Path:
    """A hidden temporary sibling of ``final``, unique to this process and call."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None], mode: str = "wb") -> None:
    """Create or replace ``path`` atomically: ``write(f)`` fills a temporary file in the same
    directory, which is fsynced and renamed over ``path`` (then the directory is fsynced), so a crash
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fsync_path(path.parent)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "tmp_name", "fsync_path"]
