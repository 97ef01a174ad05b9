"""The experiment grid: bits per channel x salient fraction x extra steps x saliency method, measured.

One calibration (with the Taylor gradients) serves every point; each point configures the encodings
and evaluates bits per token on the first ``eval_tokens`` of the validation split (state carried
across windows, as ``spikegpt.evaluate``).  Points:

* ``uniform``: ``p = 0`` at ``b`` in :data:`UNIFORM_BITS`;
* ``obs``: ``b`` in :data:`OBS_BITS` x ``p`` in :data:`FRACS` x ``a`` in :data:`EXTRA` per method;
* ``fp-salient``: the salient channels kept real-valued (the upper bound of a method at ``b``, ``p``).

Average bits per activation ``b + p a`` (``fp-salient``: ``b`` for the encoded channels only), average
spike steps ``1 + p (2^a - 1)``.  The report (:func:`markdown`, :func:`plot`) compares the methods at
equal average bits; uniform quantization between integer bit widths is interpolated linearly.
"""
from __future__ import annotations

import math
import time

from .convert import clear, configure
from .encoding import SALIENCY_METHODS, SpikifyConfig
from .saliency import linear_layers, variation

UNIFORM_BITS = (2, 3, 4, 5, 6, 8)
OBS_BITS = (2, 3, 4)
FRACS = (0.01, 0.02, 0.05, 0.1, 0.2)
EXTRA = (1, 2)

_Y_CLIP = 0.12  # the plots show BPC up to 12% above the unconverted model (b = 2 lies above; see the table)

__all__ = ["grid", "run_sweep", "markdown", "plot", "UNIFORM_BITS", "OBS_BITS", "FRACS", "EXTRA"]


def grid(encoding: str, methods=SALIENCY_METHODS) -> list:
    """``[(kind, SpikifyConfig)]`` of every point."""
    points = [("uniform", SpikifyConfig(bits=b, salient_frac=0.0, extra_steps=0, encoding=encoding))
              for b in UNIFORM_BITS]
    for m in methods:
        for b in OBS_BITS:
            for p in FRACS:
                points += [("obs", SpikifyConfig(bits=b, salient_frac=p, extra_steps=a, saliency=m, encoding=encoding))
                           for a in EXTRA]
                points.append(("fp-salient", SpikifyConfig(bits=b, salient_frac=p, extra_steps=0, saliency=m,
                                                           encoding=encoding, salient_full_precision=True)))
    return points


def run_sweep(model, stats: dict, evaluate, encoding: str, methods=SALIENCY_METHODS, log=print) -> dict:
    """Evaluate every point of :func:`grid`; ``evaluate(model) -> bits per token``.  ``stats``: the
    calibration (:func:`.saliency.calibrate` with ``taylor=True``).  Returns the JSON-able results."""
    clear(model)
    t0 = time.perf_counter()
    baseline = evaluate(model)
    log(f"unconverted: {baseline:.4f} bits/token")
    results = []
    for i, (kind, cfg) in enumerate(grid(encoding, methods)):
        configure(model, stats, cfg)
        bpt = evaluate(model)
        clear(model)
        results.append({"kind": kind, "method": "uniform" if kind == "uniform" else cfg.saliency, "bits": cfg.bits,
                        "salient_frac": cfg.salient_frac, "extra_steps": cfg.extra_steps,
                        "avg_bits": cfg.avg_bits, "avg_steps": cfg.avg_steps if kind != "fp-salient" else 1.0,
                        "bpc": bpt, "rel_to_unconverted": bpt / baseline - 1})
        log(f"[{i + 1}] {kind:10s} {results[-1]['method']:8s} b={cfg.bits} p={cfg.salient_frac:<4} "
            f"a={cfg.extra_steps}: {bpt:.4f} ({100 * (bpt / baseline - 1):+.2f}%)  {time.perf_counter() - t0:.0f}s")
    fig2 = [{"layer": name, **variation(stats[name])} for name, _ in linear_layers(model)]
    return {"encoding": encoding, "unconverted_bpc": baseline, "points": results, "saliency_variation": fig2,
            "summary": summarize(results, baseline)}


def _uniform_at(points, bits: float) -> float:
    """Uniform quantization's BPC at ``bits``, interpolated linearly between measured bit widths."""
    u = sorted((p["bits"], p["bpc"]) for p in points if p["kind"] == "uniform")
    for (b0, y0), (b1, y1) in zip(u, u[1:]):
        if b0 <= bits <= b1:
            return y0 + (y1 - y0) * (bits - b0) / (b1 - b0)
    return math.nan


def _at(points, method, b, p, a):
    for q in points:
        if q["kind"] == "obs" and q["method"] == method and (q["bits"], q["salient_frac"],
                                                             q["extra_steps"]) == (b, p, a):
            return q["bpc"]
    return math.nan


def summarize(points, baseline) -> dict:
    """The goals: the best ranking method (random excluded) at (4, 0.1, 1), (3, 0.1, 1) and (3, 0.05, 1)
    against the unconverted model, uniform quantization (interpolated) and random selection; and at
    how many grid points each method beats both uniform and random."""
    methods = sorted({q["method"] for q in points if q["kind"] == "obs"})
    out = {}
    for b, p, a in ((4, 0.1, 1), (3, 0.1, 1), (3, 0.05, 1)):
        by = {m: _at(points, m, b, p, a) for m in methods}
        ranked = [m for m in methods if m != "random"]
        best = min(ranked, key=lambda m: by[m]) if ranked else None
        uniform = _uniform_at(points, b + p * a)
        out[f"b{b}_p{p}_a{a}"] = {"avg_bits": b + p * a, "by_method": by, "best": best,
                                 "best_rel": by[best] / baseline - 1 if best else None, "uniform_interp": uniform,
                                 "best_below_uniform_and_random": bool(best) and by[best] < min(
                                     by.get("random", math.inf), uniform)}
    obs = [q for q in points if q["kind"] == "obs"]
    keys = sorted({(q["bits"], q["salient_frac"], q["extra_steps"]) for q in obs})
    wins = {m: 0 for m in methods}
    for k in keys:
        bar = min(_at(points, "random", *k), _uniform_at(points, k[0] + k[1] * k[2]))
        for m in methods:
            if m != "random" and _at(points, m, *k) < bar:
                wins[m] += 1
    out["beats_uniform_and_random"] = {"points": len(keys), "wins": wins}
    return out


def markdown(res: dict) -> str:
    """A Markdown report: uniform bits, then per (b, a) a table of p x method (BPC, % vs unconverted)."""
    base = res["unconverted_bpc"]
    pts = res["points"]
    methods = [m for m in SALIENCY_METHODS if any(q["method"] == m for q in pts)]
    pct = lambda y: f"{y:.4f} ({100 * (y / base - 1):+.1f}%)"
    lines = [f"Encoding `{res['encoding']}`; unconverted model: **{base:.4f}** bits/token.", "",
             "| uniform b | " + " | ".join(str(q["bits"]) for q in pts if q["kind"] == "uniform") + " |",
             "|---" * (1 + sum(q["kind"] == "uniform" for q in pts)) + "|",
             "| BPC | " + " | ".join(pct(q["bpc"]) for q in pts if q["kind"] == "uniform") + " |", ""]
    for b in OBS_BITS:
        for kind, a in [("obs", a) for a in EXTRA] + [("fp-salient", 0)]:
            title = f"b = {b}, a = {a}" if kind == "obs" else f"b = {b}, salient channels in full precision"
            lines += [f"**{title}**", "", "| p | avg bits | " + " | ".join(methods) + " |",
                      "|---" * (2 + len(methods)) + "|"]
            for p in FRACS:
                row = {q["method"]: q["bpc"] for q in pts if q["kind"] == kind and q["bits"] == b
                       and q["salient_frac"] == p and q["extra_steps"] == a}
                best = min(row.values())
                cells = [("**" + pct(row[m]) + "**") if row[m] == best else pct(row[m]) for m in methods]
                lines.append(f"| {p} | {b + p * a:g} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["SpikeLLM Fig. 2 for RWKV: coefficient of variation of the element saliency |x (W^T W x)|",
              "", "| layer input | across channels | across tokens |", "|---|---|---|"]
    lines += [f"| {v['layer']} | {v['cov_channels']:.2f} | {v['cov_tokens']:.2f} |" for v in res["saliency_variation"]]
    return "\n".join(lines) + "\n"


def plot(results: list, path) -> None:
    """BPC against average bits and against average steps (one curve per method, its Pareto front;
    uniform quantization), and the Fig. 2 variation per layer, for each entry of ``results`` (one
    row of panels per model / encoding: ``(title, sweep result)``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write

    fig, axes = plt.subplots(len(results), 3, figsize=(19, 5 * len(results)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.4]})
    colors = {m: f"C{i}" for i, m in enumerate(("uniform",) + SALIENCY_METHODS)}
    for row, (title, res) in zip(axes, results):
        base, pts = res["unconverted_bpc"], res["points"]
        for ax, xkey, xlabel in ((row[0], "avg_bits", "average bits per activation (b + p a)"),
                                 (row[1], "avg_steps", "average spike steps per activation (1 + p (2^a - 1))")):
            u = sorted((q[xkey], q["bpc"]) for q in pts if q["kind"] == "uniform")
            ax.plot(*zip(*u), "s-", color=colors["uniform"], label="uniform (p = 0)")
            for m in SALIENCY_METHODS:
                mine = sorted((q[xkey], q["bpc"]) for q in pts if q["kind"] == "obs" and q["method"] == m)
                if not mine:
                    continue
                ax.scatter(*zip(*mine), s=12, color=colors[m], alpha=0.5)
                front, best = [], math.inf
                for x, y in mine:
                    if y < best:
                        front.append((x, y))
                        best = y
                ax.plot(*zip(*front), "-", color=colors[m], label=f"OBS {m}")
            ax.axhline(base, color="k", linestyle="--", linewidth=1, label=f"unconverted ({base:.3f})")
            ax.set_ylim(base * 0.99, base * (1 + _Y_CLIP))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("bits per character (val)")
            ax.set_title(f"{title}: BPC vs {'bits' if xkey == 'avg_bits' else 'steps'} (y clipped at "
                         f"+{_Y_CLIP:.0%})", fontsize=10)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
        var = res["saliency_variation"]
        x = range(len(var))
        row[2].bar([i - 0.2 for i in x], [v["cov_channels"] for v in var], 0.4, label="across channels")
        row[2].bar([i + 0.2 for i in x], [v["cov_tokens"] for v in var], 0.4, label="across tokens")
        row[2].set_xticks(list(x))
        row[2].set_xticklabels([v["layer"].replace("blocks.", "") for v in var], rotation=90, fontsize=6)
        row[2].set_ylabel("coefficient of variation of |x (W^T W x)|")
        row[2].set_title(f"{title}: saliency variation (SpikeLLM Fig. 2)", fontsize=10)
        row[2].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
