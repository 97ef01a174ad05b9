"""Seconds per training iteration on a CPU, ours vs. the alternatives, measured side by side.

    python benchmarks/bench_cpu_train.py            # the issue's shape: L4 C128 ctx 64 batch 12 vocab 65
    python benchmarks/bench_cpu_train.py --smoke    # a few iterations, for CI

A training iteration is forward + backward + AdamW step.  Variants, all on the same batch:

* ``spikegpt``: this package (chunked WKV with autograd, LIF with a hand-written backward);
* ``wkv-sequential``: the same model with the textbook WKV (a Python loop over time with the running
  max, autograd through the loop) — what a direct transcription of the recurrence costs;
* ``lif-autograd``: the same model with the LIF loop differentiated by autograd;
* ``gif`` / ``quant``: this package with ``--neuron gif`` (the default GIF configuration of
  ``spikegpt.config.GIF_DEFAULTS``) or ``--neuron quant`` instead of the LIF (issue 13's budget: a GIF
  step at most 1.2x a LIF step);
* ``transformer``: a same-size GPT (pre-LN, 4 heads, causal attention, GELU MLP 4C), the usual yardstick;
* ``spikegpt-compiled`` (``--compile``): this package under ``torch.compile``.

Results go to ``benchmarks/results/cpu_train-<date>-<commit>.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, timeit, write_result  # noqa: E402

from spikegpt import ModelConfig, SpikeGPT, ops  # noqa: E402


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
    """Median seconds per call of each of ``steps`` (CPU), calling them in turn, ``rounds`` times."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per variant (median reported)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the model")
    p.add_argument("--smoke", action="store_true", help="tiny and fast, for CI; writes no result file")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_layer, args.n_embd, args.ctx_len, args.batch_size, args.iters = 2, 32, 16, 2, 2

    device = torch.device("cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, ctx_len=args.ctx_len)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.ctx_len))
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.ctx_len))
    warmup = 1 if args.smoke else 3

    def spikegpt_step(config=cfg):
        torch.manual_seed(0)
        return train_step_fn(SpikeGPT(config).train(), x, y)

    rows = {}
    with ops.use_backend("torch"):
        # The neurons are compared round-robin (one step of each per round, medians over rounds), so
        # that a change in the machine's load hits the three alike.
        steps = {"spikegpt": spikegpt_step(), **{n: spikegpt_step(dataclasses.replace(cfg, neuron=n))
                                                 for n in ("gif", "quant")}}
        rows.update(interleaved(steps, warmup, args.iters))
        real_wkv, real_lif = ops.wkv_torch, ops.lif_torch
        try:
            ops.wkv_torch = wkv_sequential
            rows["wkv-sequential"] = timeit(spikegpt_step(), device, warmup, max(2, args.iters // 4))
            ops.wkv_torch, ops.lif_torch = real_wkv, lif_autograd
            rows["lif-autograd"] = timeit(spikegpt_step(), device, warmup, max(2, args.iters // 4))
        finally:
            ops.wkv_torch, ops.lif_torch = real_wkv, real_lif
        if args.compile:
            torch.manual_seed(0)
            compiled = torch.compile(SpikeGPT(cfg).train())
            rows["spikegpt-compiled"] = timeit(train_step_fn(compiled, x, y), device, warmup, args.iters)
    torch.manual_seed(0)
    rows["transformer"] = timeit(train_step_fn(Transformer(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.ctx_len), x, y),
                                 device, warmup, args.iters)

    result = {**header(device), "shape": dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, ctx_len=cfg.ctx_len,
                                              batch_size=args.batch_size, vocab_size=cfg.vocab_size),
              "seconds_per_iter": rows, "target_seconds_per_iter": 0.14}
    base = rows["spikegpt"]
    lines = [f"CPU training step, L{cfg.n_layer} C{cfg.n_embd} ctx {cfg.ctx_len} batch {args.batch_size} "
             f"vocab {cfg.vocab_size} — {result['device']}, torch {result['torch']}, commit {result['commit']}, "
             f"{result['date']}", "", "| variant | s/iter | vs spikegpt |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.4f} | {sec / base:.2f}x |" for name, sec in rows.items()]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.smoke:
        print(f"\nwritten to {write_result('cpu_train', result, markdown)}")
    assert all(math.isfinite(v) for v in rows.values())
    return result


if __name__ == "__main__":
    main()
