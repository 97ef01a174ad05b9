"""Helpers shared by the benchmarks: timing, machine description, result files."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from spikegpt.fileio import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
# The commit of a checkout without git metadata (a copied working tree), as its runner names it.
COMMIT_ENV = "SPIKEGPT_COMMIT"


def git_commit(short: bool = True) -> str:
    """The checkout's HEAD (abbreviated unless ``short=False``); outside git, ``$SPIKEGPT_COMMIT``
    (abbreviated likewise), else ``"unknown"``."""
    try:
        return subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        named = os.environ.get(COMMIT_ENV, "").strip()
        return (named[:7] if short else named) or "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def header(device: torch.device) -> dict:
    return {"commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_description(device), "torch": str(torch.__version__),
            "python": platform.python_version()}


def timeit(fn, device: torch.device, warmup: int = 3, iters: int = 10, min_seconds: float = 0.0) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def write_json_md(path: str | os.PathLike[str], result: dict, markdown: str) -> Path:
    """``result`` as JSON at ``path`` and ``markdown`` beside it (same stem, ``.md``), atomically."""
    path = Path(path)
    atomic_write_json(path, result)
    atomic_write_text(path.with_suffix(".md"), markdown + "\n")
    return path


def write_result(name: str, result: dict, markdown: str) -> Path:
    """``benchmarks/results/NAME-DATE-COMMIT.{json,md}``."""
    return write_json_md(RESULTS / f"{name}-{result['date'][:10]}-{result['commit']}.json", result, markdown)
