"""Combine ``python -m spikegpt.spikify --sweep`` results into one Markdown summary and one plot.

    python benchmarks/spikify_report.py NAME=STEM.json [NAME=STEM.json ...] --out benchmarks/results/spikify_report

writes OUT.md (per sweep: the unconverted model, uniform 3 and 4 bits, every method at (b, p, a) =
(4, 0.1, 1), (3, 0.1, 1) and (3, 0.05, 1), and at how many of the 30 grid points each method beats
both uniform and random) and OUT.png (one row of panels per sweep).  Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from spikegpt.fileio import atomic_write_text
from spikegpt.spikify.encoding import SALIENCY_METHODS
from spikegpt.spikify.sweep import plot, summarize


def table(name: str, res: dict) -> list:
    base = res["unconverted_bpc"]
    summary = summarize(res["points"], base)
    uni = {q["bits"]: q["bpc"] for q in res["points"] if q["kind"] == "uniform"}
    pct = lambda y: f"{y:.4f} ({100 * (y / base - 1):+.2f}%)"
    lines = [f"**{name}** (`{res['encoding']}`, {res['eval_tokens']:,} val tokens, {res['calib_tokens']:,} "
             f"calibration tokens): unconverted {base:.4f}; uniform 3 bits {pct(uni[3])}, 4 bits {pct(uni[4])}.",
             "", "| b, p, a | avg bits | uniform (interp.) | " + " | ".join(SALIENCY_METHODS) + " |",
             "|---" * (3 + len(SALIENCY_METHODS)) + "|"]
    for key in ("b4_p0.1_a1", "b3_p0.1_a1", "b3_p0.05_a1"):
        s = summary[key]
        cells = [("**" + pct(s["by_method"][m]) + "**") if m == s["best"] else pct(s["by_method"][m])
                 for m in SALIENCY_METHODS]
        lines.append(f"| {key[1]}, {key.split('_')[1][1:]}, {key[-1]} | {s['avg_bits']:g} | "
                     f"{pct(s['uniform_interp'])} | " + " | ".join(cells) + " |")
    wins = summary["beats_uniform_and_random"]
    lines += ["", f"Grid points (of {wins['points']}: b in 2-4, p in 0.01-0.2, a in 1-2) where the method is below "
              "both uniform and random: " + ", ".join(f"{m} {n}" for m, n in wins["wins"].items() if m != "random"),
              ""]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", help="NAME=PATH of a sweep JSON")
    p.add_argument("--out", required=True, help="stem of OUT.md and OUT.png")
    args = p.parse_args(argv)
    runs = []
    for item in args.sweeps:
        name, _, path = item.partition("=")
        runs.append((name, json.loads(Path(path).read_text())))
    lines = []
    for name, res in runs:
        lines += table(name, res)
    atomic_write_text(f"{args.out}.md", "\n".join(lines))
    plot(runs, f"{args.out}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
