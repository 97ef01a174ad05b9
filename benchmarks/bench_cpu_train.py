"""Seconds per training iteration on a CPU, ours vs. the alternatives, measured side by side (issue 17).

    python benchmarks/bench_cpu_train.py                 # tiny: L4 C128 ctx 64 batch 12 vocab 65
    python benchmarks/bench_cpu_train.py --shape 45m     # L12 C512 ctx 1024 vocab 256, batch 1, a few steps
    python benchmarks/bench_cpu_train.py --threads 1     # on a busy machine (see profile_cpu_train.py)
    python benchmarks/bench_cpu_train.py --smoke         # a few iterations at tiny sizes, for CI

A training iteration is forward + backward + gradient clipping + AdamW step.  Variants, all on the
same batch:

* ``spikegpt``: this package as it trains on a CPU (``--kernels auto``: the fused C++ ops of
  ``spikegpt.cpu`` where they build);
* ``gif`` / ``quant``: the same with ``--neuron gif`` (the default GIF configuration of
  ``spikegpt.config.GIF_DEFAULTS``) or ``--neuron quant`` instead of the LIF (issue 13's budget: a GIF
  step at most 1.2x a LIF step);
* ``spikegpt-reference``: this package on its PyTorch references (``--kernels torch``);
* ``transformer``: a same-size GPT (pre-LN, 4 heads, causal attention, GELU MLP 4C), the yardstick
  (issue 17's goal: ``spikegpt`` at most 1.5x it at tiny);
* tiny only, on the references: ``wkv-sequential``, the textbook WKV (a Python loop over time with
  the running max, autograd through the loop), and ``lif-autograd``, the LIF loop differentiated by
  autograd: what a direct transcription costs;
* ``spikegpt-compiled`` (``--compile``): the references under ``torch.compile``.

The first five run round-robin (one iteration of each per round, each round starting one variant
later; medians over the rounds), so that a change in the machine's load hits them alike; the ratios
come from that one run.  Then a few iterations of ``spikegpt`` and of ``transformer`` run under
``torch.profiler`` and their time is split into matmul / neuron / WKV / other as ``step_profile.py``
describes (shares of the profiled step; the seconds are each share times the unprofiled median).  At
``45m`` only ``spikegpt`` and ``transformer`` run, at batch 1 (tokens/s).  Results go to
``benchmarks/results/cpu_train-SHAPE-THREADSt-<date>-<commit>.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, timeit, write_result  # noqa: E402
from step_profile import CATEGORIES, profile_steps  # noqa: E402

from spikegpt import ModelConfig, SpikeGPT, cpu, ops  # noqa: E402

SHAPES = {"tiny": dict(n_layer=4, n_embd=128, ctx_len=64, vocab_size=65, batch_size=12, iters=20, profiled=5),
          "45m": dict(n_layer=12, n_embd=512, ctx_len=1024, vocab_size=256, batch_size=1, iters=3, profiled=1),
          "smoke": dict(n_layer=2, n_embd=32, ctx_len=16, vocab_size=65, batch_size=2, iters=2, profiled=1)}
TARGETS = {"spikegpt / transformer": 1.5, "gif / spikegpt": 1.2}  # at tiny (issues 17 and 13)


def wkv_sequential(w, u, k, v, state=None):
    """The recurrence of docs/model.md §2 step by step (autograd through the loop)."""
    B, T, C = k.shape
    p, q, o = state if state is not None else ops.empty_wkv_state(B, C, k.device)
    k, v, ys = k.float(), v.float(), []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        m = torch.maximum(o, u + kt)
        a, b = torch.exp(o - m), torch.exp(u + kt - m)
        ys.append((a * p + b * vt) / (a * q + b))
        m2 = torch.maximum(w + o, kt)
        a, b = torch.exp(w + o - m2), torch.exp(kt - m2)
        p, q, o = a * p + b * vt, a * q + b, m2
    return torch.stack(ys, 1), (p, q, o)


def lif_autograd(x, v0=None, tau=2.0, v_threshold=1.0, alpha=2.0):
    v = torch.zeros_like(x[:, 0]) if v0 is None else v0
    out = []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / tau
        s = ops.spike(h - v_threshold, alpha)
        v = h * (1 - s)
        out.append(s)
    return torch.stack(out, 1), v


class Transformer(nn.Module):
    """A minimal same-size GPT (pre-LN, causal self-attention, GELU MLP, untied head)."""

    def __init__(self, V, C, L, T, heads=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(C), qkv=nn.Linear(C, 3 * C), proj=nn.Linear(C, C),
            ln2=nn.LayerNorm(C), fc=nn.Linear(C, 4 * C), out=nn.Linear(4 * C, C))) for _ in range(L))
        self.ln, self.head, self.heads = nn.LayerNorm(C), nn.Linear(C, V, bias=False), heads

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["proj"](a)
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x))))
        logits = self.head(self.ln(x))
        return logits, F.cross_entropy(logits.view(B * T, -1), targets.view(-1))


def train_step_fn(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=4e-9, weight_decay=0.0)

    def step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def interleaved(steps: dict, warmup: int, rounds: int) -> dict:
    """Median seconds per call of each of ``steps`` (CPU), calling them in turn, ``rounds`` times.

    Each round starts one variant later than the one before, so that every variant follows every
    other equally often (a step runs measurably slower or faster depending on which ran before it)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    names = list(steps)
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def on_backend(backend, fn):
    """``fn`` run with the kernel backend ``backend``."""
    def step():
        with ops.use_backend(backend):
            fn()
    return step


def step_breakdown(step, steps: int, seconds: float) -> dict:
    """:func:`step_profile.profile_steps` of ``step``, with each category's share of ``seconds``."""
    b = profile_steps(step, steps)
    for v in b["categories"].values():
        v["seconds"] = v["share"] * seconds
    return b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("tiny", "45m"), default="tiny")
    p.add_argument("--iters", type=int, help="timed rounds (medians reported); default 20 at tiny, 3 at 45m")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS or all cores)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the model (tiny)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few iterations, for CI; writes no result file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "smoke" if args.smoke else args.shape
    shape = dict(SHAPES[name])
    batch, iters, profiled = shape.pop("batch_size"), shape.pop("iters"), shape.pop("profiled")
    iters = args.iters or iters
    full = name != "45m"  # every variant at tiny (and smoke); spikegpt and the GPT at 45m

    device = torch.device("cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(**shape)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len))
    warmup = 1 if name != "tiny" else 3

    def spikegpt_step(config=cfg):
        torch.manual_seed(0)
        return train_step_fn(SpikeGPT(config).train(), x, y)

    torch.manual_seed(0)
    gpt_step = train_step_fn(Transformer(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.ctx_len), x, y)
    fused_step = on_backend("auto", spikegpt_step())
    steps = {"spikegpt": fused_step}
    if full:
        for n in ("gif", "quant"):
            steps[n] = on_backend("auto", spikegpt_step(dataclasses.replace(cfg, neuron=n)))
        steps["spikegpt-reference"] = on_backend("torch", spikegpt_step())
    steps["transformer"] = gpt_step
    load_before = os.getloadavg()
    rows = interleaved(steps, warmup, iters)
    if full:
        with ops.use_backend("torch"):
            real_wkv, real_lif = ops.wkv_torch, ops.lif_torch
            try:
                ops.wkv_torch = wkv_sequential
                rows["wkv-sequential"] = timeit(spikegpt_step(), device, warmup, max(2, iters // 4))
                ops.wkv_torch, ops.lif_torch = real_wkv, lif_autograd
                rows["lif-autograd"] = timeit(spikegpt_step(), device, warmup, max(2, iters // 4))
            finally:
                ops.wkv_torch, ops.lif_torch = real_wkv, real_lif
            if args.compile:
                torch.manual_seed(0)
                compiled = torch.compile(SpikeGPT(cfg).train())
                rows["spikegpt-compiled"] = timeit(train_step_fn(compiled, x, y), device, warmup, iters)
    breakdown = {"spikegpt": step_breakdown(fused_step, profiled, rows["spikegpt"]),
                 "transformer": step_breakdown(gpt_step, profiled, rows["transformer"])}
    load_after = os.getloadavg()

    tokens = batch * cfg.ctx_len
    ratios = {"spikegpt / transformer": rows["spikegpt"] / rows["transformer"]}
    if full:
        ratios.update({"gif / spikegpt": rows["gif"] / rows["spikegpt"],
                       "quant / spikegpt": rows["quant"] / rows["spikegpt"],
                       "spikegpt-reference / transformer": rows["spikegpt-reference"] / rows["transformer"]})
    result = {**header(device), "shape": {**shape, "batch_size": batch, "name": name},
              "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "fused_cpu_ops": cpu.available(), "rounds": iters, "seconds_per_iter": rows,
              "tokens_per_second": {k: tokens / s for k, s in rows.items()}, "ratios": ratios,
              "targets": TARGETS if full else {}, "profiled_steps": profiled,
              "breakdown": breakdown, "load_average_1min": [load_before[0], load_after[0]],
              "note": "wall times on a machine shared with other processes: see load_average_1min "
                      f"(1-minute load before and after, on {os.cpu_count()} cores); the ratios are "
                      "medians of one round-robin run"}
    base, gpt = rows["spikegpt"], rows["transformer"]
    fused = "yes" if result["fused_cpu_ops"] else f"no ({cpu.failure()})"
    lines = [f"CPU training step, {name}: L{cfg.n_layer} C{cfg.n_embd} ctx {cfg.ctx_len} batch {batch} vocab "
             f"{cfg.vocab_size} — {result['device']}, torch {result['torch']}, commit {result['commit']}, "
             f"{result['date']}; fused CPU ops: {fused}; 1-minute load average {load_before[0]:.1f} before, "
             f"{load_after[0]:.1f} after ({os.cpu_count()} cores, shared)", "",
             "| variant | s/iter | tokens/s | vs spikegpt | vs transformer |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {sec:.4f} | {tokens / sec:.0f} | {sec / base:.2f}x | {sec / gpt:.2f}x |"
              for n, sec in rows.items()]
    side = ", ".join(f"{k} {v:.2f}x" + (f" (target <= {TARGETS[k]})" if k in result["targets"] else "")
                     for k, v in ratios.items())
    lines += ["", f"Side by side (medians of one round-robin run of {iters} rounds): {side}.", "",
              f"Where a step goes (torch.profiler, {profiled} step{'s' if profiled > 1 else ''}; share of the "
              "profiled step, seconds = share x the unprofiled median):", "",
              "| category | spikegpt s | share | transformer s | share |", "|---|---:|---:|---:|---:|"]
    cats = {m: breakdown[m]["categories"] for m in breakdown}
    lines += [f"| {c} | {cats['spikegpt'][c]['seconds']:.4f} | {100 * cats['spikegpt'][c]['share']:.1f}% | "
              f"{cats['transformer'][c]['seconds']:.4f} | {100 * cats['transformer'][c]['share']:.1f}% |"
              for c in CATEGORIES]
    lines += ["", "Largest ops in spikegpt's `other`: " + ", ".join(
        f"{o['op']} {100 * o['share']:.1f}% ({o['calls_per_step']} calls/step)"
        for o in breakdown["spikegpt"]["top_other_ops"])]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.smoke:
        print(f"\nwritten to {write_result(f'cpu_train-{name}-{torch.get_num_threads()}t', result, markdown)}")
    assert all(math.isfinite(v) for v in rows.values())
    return result


if __name__ == "__main__":
    main()
