"""Issue 13's experiment: multi-level GIF neurons against LIF, the quant control and the no-spike twin.

    python benchmarks/gif_sweep.py --threads 1                        # every arm, built-in corpus
    python benchmarks/gif_sweep.py --texts rt-polarity --rt-polarity rt-polarity.all
    python benchmarks/gif_sweep.py --arms lif,twin,gif-L2-bipolar-soft --max-iters 200
    python benchmarks/gif_sweep.py --plot gif_sweep.png               # BPC vs effective bits, from the results
    python benchmarks/gif_sweep.py --table                            # the results as a markdown table

Every arm trains the ``tiny`` preset (2000 iterations unless ``--max-iters``) with the same seed and
schedule through ``train.py`` (one subprocess per arm), then records, in one JSON line per (text, arm)
appended to ``benchmarks/results/gif_sweep.jsonl``:

* ``bpc``: the final validation bits per byte of train's ``metrics.jsonl`` (bits per character on a
  byte-level text);
* from a forward pass over the first ``--stat-tokens`` validation tokens (``--stat-streams``
  sequences) under ``record_spikes``: ``firing_rate`` (share of non-zero neuron outputs),
  ``mean_abs_s`` (mean ``|s|`` per neuron-token), ``effective_bits`` (entropy in bits of each
  branch's spike-count distribution, averaged over the 2 * n_layer branches: the information a
  neuron-token can carry at the measured level usage), ``level_histogram`` (counts per spike count,
  summed over branches), and ``synops_per_token``: spike-count-weighted synaptic operations,
  ``sum |s| x fan-out`` per token, i.e. the accumulates of the spike-driven projections and residual
  adds of ``spikegpt.energy``'s ``paper`` convention, which counts each spike count s as |s| events
  (``spikegpt.spikes.spike_summary`` and ``spikegpt.energy.synaptic_operations`` compute them all);
* ``seconds_per_step``: the median over train's log windows of (tokens per step / tokens per second).

Arms: ``lif``, ``twin`` (``--no-spike``), ``gif-L{L}-{polarity}-{reset}`` and ``quant-L{L}-{polarity}``
at the default threshold (``spikegpt.config.GIF_THRESHOLD`` for L > 1) with the ``atan`` surrogate; any
of those may end in ``-th<x>`` (``--v-threshold x``), ``-ste`` (``--surrogate ste``) and ``-learn``
(``--learn-threshold``, initialised at the threshold).  ``best-ste`` and ``best-learn`` are the best
default-threshold atan gif arm measured so far on that text, with ``-ste`` / ``-learn``.  The default
list puts the most informative arms first.  Arms already in the results file are skipped, so an
interrupted sweep continues where it stopped; each append is one atomic rewrite of the file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "gif_sweep.jsonl"
TEXTS = ("builtin", "rt-polarity")
LEVELS, POLARITIES, RESETS = (2, 4, 8), ("unipolar", "bipolar"), ("hard", "soft")
BEST = ("best-ste", "best-learn")  # the best default-threshold atan gif arm so far, with -ste / -learn

# Most informative first: the two ends of the gap, then GIF against its no-integration control.
FIRST = ["lif", "twin", "gif-L2-bipolar-soft", "gif-L4-bipolar-soft", "quant-L2-bipolar", "quant-L4-bipolar",
         "best-ste", "best-learn", "gif-L4-unipolar-soft", "gif-L2-bipolar-hard", "gif-L8-bipolar-soft",
         "quant-L8-bipolar", "gif-L2-unipolar-soft", "gif-L4-bipolar-hard"]
GRID = ([f"gif-L{L}-{p}-{r}" for L in LEVELS for p in POLARITIES for r in RESETS]
        + [f"quant-L{L}-{p}" for L in LEVELS for p in POLARITIES])
DEFAULT_ARMS = FIRST + [a for a in GRID if a not in FIRST]


def arm_flags(arm: str) -> list[str]:
    """train.py flags of an arm name (see the module docstring)."""
    if arm == "lif":
        return []
    if arm == "twin":
        return ["--no-spike"]
    parts, extra, surrogate = arm.split("-"), [], "atan"
    while parts and (parts[-1] in ("learn", "ste") or parts[-1].startswith("th")):
        tail = parts.pop()
        if tail == "learn":
            extra += ["--learn-threshold"]
        elif tail == "ste":
            surrogate = "ste"
        else:
            try:
                extra += ["--v-threshold", str(float(tail[2:]))]
            except ValueError:
                parts.append(tail)
                break
    try:
        if parts[0] == "gif" and len(parts) == 4 and parts[2] in POLARITIES and parts[3] in RESETS:
            flags = ["--neuron", "gif", "--levels", str(int(parts[1][1:])), "--polarity", parts[2],
                     "--reset", parts[3]]
        elif parts[0] == "quant" and len(parts) == 3 and parts[2] in POLARITIES:
            flags = ["--neuron", "quant", "--levels", str(int(parts[1][1:])), "--polarity", parts[2]]
        else:
            raise ValueError
    except (ValueError, IndexError):
        raise SystemExit(f"error: unknown arm {arm!r}: use lif, twin, gif-L<n>-<unipolar|bipolar>-<hard|soft>, "
                         "quant-L<n>-<unipolar|bipolar>, optionally followed by -th<threshold>, -ste and "
                         "-learn (in any order), or best-ste / best-learn") from None
    return flags + ["--surrogate", surrogate] + extra

def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict) -> None:
    """Append one record: an atomic rewrite under a lock, so that sweeps running side by side (with
    disjoint ``--arms``) never lose each other's records."""
    import fcntl

    from spikegpt.fileio import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = [json.dumps(r, sort_keys=True) for r in read_results(path)] + [json.dumps(record, sort_keys=True)]
        atomic_write_text(path, "\n".join(lines) + "\n")


def prepare_rt_polarity(source: Path, work: Path) -> Path:
    """The sentences of rt-polarity.all (``<label> <sentence>`` lines, Latin-1) as a plain UTF-8 text,
    prepared byte-level with data/prepare_text.py; returns the dataset directory."""
    out = work / "data" / "rt-polarity-byte"
    if (out / "meta.json").exists():
        return out
    lines = source.read_bytes().decode("latin-1").splitlines()
    text = "\n".join(line.split(" ", 1)[1].strip() if " " in line else line.strip() for line in lines) + "\n"
    plain = work / "data" / "rt-polarity.txt"
    plain.parent.mkdir(parents=True, exist_ok=True)
    from spikegpt.fileio import atomic_write_text
    atomic_write_text(plain, text)
    subprocess.run([sys.executable, str(REPO / "data" / "prepare_text.py"), "--input", str(plain), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def spike_statistics(run_dir: Path, data_dir: str, n_tokens: int, streams: int) -> dict:
    """Level usage and synaptic operations of the trained model (module docstring), from
    ``spikegpt.spikes.spike_summary`` and ``spikegpt.energy.synaptic_operations``."""
    import numpy as np
    import torch

    import spikegpt
    from spikegpt.data import open_split
    from spikegpt.energy import count_rwkv, synaptic_operations
    from spikegpt.spikes import SpikeRates, record_spikes, spike_summary

    model = spikegpt.load(run_dir)
    if not model.config.spiking:
        return {"firing_rate": None, "mean_abs_s": None, "effective_bits": None, "level_histogram": None,
                "synops_per_token": None}
    tokens = np.asarray(open_split(data_dir, "val")[:n_tokens], dtype=np.int64)
    T = len(tokens) // streams
    idx = torch.from_numpy(tokens[:streams * T].reshape(streams, T))
    with torch.no_grad(), record_spikes(model) as m:
        m(idx)
    summary = spike_summary(m)
    rows = count_rwkv(m.config, SpikeRates.from_model(m), "paper")
    return {"firing_rate": summary["firing_rate"], "mean_abs_s": summary["mean_abs_s"],
            "effective_bits": summary["effective_bits"],
            "level_histogram": {str(v): c for v, c in zip(summary["levels"], summary["level_counts"])},
            "synops_per_token": synaptic_operations(rows)}


def train_metrics(run_dir: Path) -> tuple[float, float]:
    """(final val bits per byte, median seconds per step) from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r.get("final_eval") == "val"]
    if not final:
        raise SystemExit(f"error: {run_dir} has no final validation record; delete it and rerun the arm")
    logs = [r for r in records if "tokens_per_s" in r and r["step"] > 0]
    per_step = [r["tokens_seen"] / r["step"] / r["tokens_per_s"] for r in logs]
    return final[-1]["bits_per_byte"], statistics.median(per_step)


def run_arm(arm: str, text: str, data_dir: str | None, args, done: list[dict]) -> dict:
    if arm in BEST:
        gif = [r for r in done if r["text"] == text and r["arm"].startswith("gif-") and "-th" not in r["arm"]
               and not r["arm"].endswith(("-learn", "-ste"))]
        if not gif:
            raise SystemExit(f"error: {arm} needs a measured gif arm on this text first; run some gif arms")
        arm = min(gif, key=lambda r: r["bpc"])["arm"] + arm[len("best"):]
        if any(r["text"] == text and r["arm"] == arm for r in done):
            return {}
    run_dir = Path(args.work_dir) / "runs" / text / arm
    cmd = [sys.executable, str(REPO / "train.py"), "--preset", "tiny", "--out-dir", str(run_dir),
           "--seed", str(args.seed), "--sample-tokens", "0", "--device", "cpu"] + arm_flags(arm)
    cmd += ["--max-iters", str(args.max_iters)] if args.max_iters else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--data-dir", data_dir] if data_dir else []
    print(f"[{time.strftime('%H:%M:%S')}] {text} {arm}: {' '.join(cmd[2:])}", flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{arm}.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    bpc, sec = train_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    stats = spike_statistics(run_dir, config["data_dir"], args.stat_tokens, args.stat_streams)
    record = {"text": text, "arm": arm, "flags": arm_flags(arm), "bpc": bpc, "seconds_per_step": sec,
              "max_iters": config["train_config"]["max_iters"], "seed": args.seed,
              "model_config": config["model_config"], **stats}
    print(f"    bpc {bpc:.4f}  rate {stats['firing_rate']}  bits {stats['effective_bits']}  "
          f"synops {stats['synops_per_token']}  {sec:.3f} s/step", flush=True)
    return record


def table(records: list[dict]) -> str:
    """The results as a markdown table: per text, the twin and lif first, then by bits per byte."""
    lines = ["| text | arm | val bits/byte | gap closed | firing rate | mean abs s | effective bits | "
             "synaptic ops/token | s/step |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for text in TEXTS:
        rs = [r for r in records if r["text"] == text]
        ends = {r["arm"]: r["bpc"] for r in rs if r["arm"] in ("lif", "twin")}
        rank = {"twin": 0, "lif": 1}
        for r in sorted(rs, key=lambda r: (rank.get(r["arm"], 2), r["bpc"])):
            gap = (f"{100 * (ends['lif'] - r['bpc']) / (ends['lif'] - ends['twin']):.1f}%"
                   if len(ends) == 2 else "–")
            num = (lambda v, f: "–" if v is None else format(v, f))
            synops = "–" if r.get("synops_per_token") is None else f"{r['synops_per_token'] / 1e3:.0f}k"
            lines.append(f"| {text} | `{r['arm']}` | {r['bpc']:.4f} | {gap} | {num(r.get('firing_rate'), '.3f')} | "
                         f"{num(r.get('mean_abs_s'), '.3f')} | {num(r.get('effective_bits'), '.2f')} | {synops} | "
                         f"{r['seconds_per_step']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], out: str) -> None:
    """BPC against effective bits per neuron-token, one panel per text, the twin as a line."""
    import matplotlib  # optional (the `plot` extra), imported only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = [t for t in TEXTS if any(r["text"] == t for r in records)]
    fig, axes = plt.subplots(1, len(texts), figsize=(7 * len(texts), 5.5), squeeze=False)
    style = {"lif": ("s", "black", "lif"), "bipolar": ("o", "tab:blue", "gif, bipolar"),
             "unipolar": ("^", "tab:green", "gif, unipolar"), "quant": ("x", "tab:red", "quant (no membrane)")}
    for ax, text in zip(axes[0], texts):
        rs = [r for r in records if r["text"] == text]
        ends = {r["arm"]: r["bpc"] for r in rs if r["arm"] in ("lif", "twin")}
        if "twin" in ends:
            ax.axhline(ends["twin"], color="gray", linestyle="--", label="no-spike twin")
        if len(ends) == 2:
            ax.axhline(ends["lif"] - 0.75 * (ends["lif"] - ends["twin"]), color="gray", linestyle=":",
                       label="75% of the gap closed")
        ax.axvline(2.0, color="silver", linestyle=":", label="2 effective bits")
        seen = set()
        for r in rs:
            if r["arm"] == "twin":
                continue
            parts = r["arm"].split("-")
            key = parts[0] if parts[0] in ("lif", "quant") else parts[2]
            marker, color, label = style[key]
            ax.scatter(r["effective_bits"], r["bpc"], marker=marker, color=color,
                       label=None if key in seen else label)
            seen.add(key)
            ax.annotate(r["arm"], (r["effective_bits"], r["bpc"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xlabel("effective bits per neuron-token (entropy of the spike counts)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"{text}: tiny, {rs[0]['max_iters']} iterations")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    from spikegpt.fileio import atomic_write
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=None, help="comma-separated arm names (default: all, most informative first)")
    p.add_argument("--texts", default="builtin", help=f"comma-separated, of {', '.join(TEXTS)}")
    p.add_argument("--rt-polarity", default=None, help="rt-polarity.all, the source of the rt-polarity text")
    p.add_argument("--max-iters", type=int, default=None, help="override the preset's 2000 iterations")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each training run")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "spikegpt-gif-sweep"),
                   help="run directories and prepared data")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines results file")
    p.add_argument("--stat-tokens", type=int, default=8192, help="validation tokens of the spike statistics")
    p.add_argument("--stat-streams", type=int, default=16, help="sequences those tokens are cut into")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="only plot the results file to OUT.png")
    p.add_argument("--table", action="store_true", help="only print the results file as a markdown table")
    args = p.parse_args(argv)
    results = Path(args.results)
    if args.plot or args.table:
        if args.table:
            print(table(read_results(results)), end="")
        return plot(read_results(results), args.plot) if args.plot else None
    arms = args.arms.split(",") if args.arms else DEFAULT_ARMS
    for arm in arms:
        if arm not in BEST:
            arm_flags(arm)  # unknown names fail before anything runs
    texts = args.texts.split(",")
    for text in texts:
        if text not in TEXTS:
            raise SystemExit(f"error: unknown text {text!r}; use one of {', '.join(TEXTS)}")
        if text == "rt-polarity" and not args.rt_polarity:
            raise SystemExit("error: the rt-polarity text needs --rt-polarity PATH (rt-polarity.all)")
    for text in texts:
        data_dir = str(prepare_rt_polarity(Path(args.rt_polarity), Path(args.work_dir))) if text == "rt-polarity" else None
        for arm in arms:
            done = read_results(results)
            if any(r["text"] == text and r["arm"] == arm for r in done):
                continue
            record = run_arm(arm, text, data_dir, args, done)
            if record:
                append_result(results, record)


if __name__ == "__main__":
    main()
