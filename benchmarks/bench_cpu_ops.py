"""The fused CPU ops (spikegpt.cpu) against the PyTorch references, per op and in a training step.

    python benchmarks/bench_cpu_ops.py            # tiny and 45m shapes
    python benchmarks/bench_cpu_ops.py --smoke    # tiny sizes, a few iterations, writes nothing

Per op: forward + backward of one WKV call, one LIF call and five token-shift mixes of one input
(``mix5``: the model's ``z * mu + zs * (1 - mu)``; a layer has five, on two inputs) at each shape's
(batch, ctx, n_embd), median ms, reference (``--kernels torch``) vs fused.  Training step (forward +
backward + AdamW, the step of ``bench_cpu_train.py``), side by side in one run: SpikeGPT on the references, SpikeGPT on
the fused ops, and the same-size GPT of ``bench_cpu_train.py``; ``tiny`` at its batch (s/iter),
``45m`` at batch 1 (tokens/s, a few steps).  The neuron and WKV shares of the fused step are
estimated from the per-op timings (8 LIF and n_layer WKV calls per step).

Results go to ``benchmarks/results/cpu_fused-<date>-<commit>.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_train import Transformer, train_step_fn  # noqa: E402
from common import RESULTS, header, timeit  # noqa: E402

from spikegpt import ModelConfig, SpikeGPT, cpu, ops  # noqa: E402
from spikegpt.config import PRESETS  # noqa: E402
from spikegpt.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from spikegpt.model import token_shift  # noqa: E402


def op_times(B, T, C, iters):
    """Median ms of forward + backward: {op: {"reference": ms, "fused": ms}}."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, T, C, generator=g).requires_grad_()
    v = torch.randn(B, T, C, generator=g).requires_grad_()
    decay = torch.randn(C, generator=g).requires_grad_()
    u = torch.randn(C, generator=g).requires_grad_()
    x = (torch.randn(B, T, C, generator=g) * 2).requires_grad_()
    gy = torch.randn(B, T, C, generator=g)
    last = torch.randn(B, C, generator=g)
    mus = torch.rand(5, 1, 1, C, generator=g).requires_grad_()

    def mix_reference():
        zs = token_shift(k, last)
        return torch.stack([k * mu + zs * (1 - mu) for mu in mus])

    impls = {"reference": (ops.wkv_torch, ops.lif_torch, mix_reference),
             "fused": (cpu.wkv, cpu.lif, lambda: cpu.token_shift_mix(k, last, mus))}
    out = {"wkv": {}, "lif": {}, "mix5": {}}
    for name, (wkv, lif, mix) in impls.items():
        def wkv_step():
            y, _ = wkv(-torch.exp(decay), u, k, v)
            y.backward(gy)

        def lif_step():
            s, _ = lif(x)
            s.backward(gy)
        def mix_step():
            mix().backward(gy.expand(5, B, T, C))
        out["wkv"][name] = 1e3 * timeit(wkv_step, torch.device("cpu"), 2, iters)
        out["mix5"][name] = 1e3 * timeit(mix_step, torch.device("cpu"), 2, iters)
        out["lif"][name] = 1e3 * timeit(lif_step, torch.device("cpu"), 2, iters)
    return out


def step_times(cfg, batch, iters, warmup):
    """Seconds per training step: SpikeGPT on the references, on the fused ops, and the GPT."""
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len))
    device, rows = torch.device("cpu"), {}
    for name, backend in (("spikegpt-reference", "torch"), ("spikegpt-fused", "auto")):
        with ops.use_backend(backend):
            torch.manual_seed(0)
            rows[name] = timeit(train_step_fn(SpikeGPT(cfg).train(), x, y), device, warmup, iters)
    torch.manual_seed(0)
    gpt = Transformer(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.ctx_len)
    rows["transformer"] = timeit(train_step_fn(gpt, x, y), device, warmup, iters)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,45m", help="presets to measure (comma-separated)")
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--iters", type=int, default=20, help="timed tiny iterations (45m: a quarter, at least 2)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI; writes no result file")
    args = p.parse_args(argv)
    if not cpu.available():
        raise SystemExit(f"bench_cpu_ops: the fused CPU ops did not build here ({cpu.failure()})")

    result = {**header(torch.device("cpu")), "load_average_1min": os.getloadavg()[0], "shapes": {}}
    lines = [f"Fused CPU ops vs references — {result['device']}, torch {result['torch']}, commit "
             f"{result['commit']}, {result['date']}, 1-min load average at start {result['load_average_1min']:.2f}",
             ""]
    for preset in args.shapes.split(","):
        shape = {k: PRESETS[preset][k] for k in ("n_layer", "n_embd", "ctx_len", "batch_size")}
        iters = args.iters if preset == "tiny" else max(2, args.iters // 4)
        step_batch = shape["batch_size"] if preset == "tiny" else 1
        if args.smoke:
            shape, iters, step_batch = dict(n_layer=2, n_embd=32, ctx_len=16, batch_size=2), 2, 2
        cfg = ModelConfig(vocab_size=args.vocab_size, n_layer=shape["n_layer"], n_embd=shape["n_embd"],
                          ctx_len=shape["ctx_len"])
        B, T, C = shape["batch_size"], shape["ctx_len"], shape["n_embd"]
        opt = op_times(B, T, C, iters)
        steps = step_times(cfg, step_batch, iters, 1 if args.smoke else 2)
        tokens = step_batch * cfg.ctx_len
        fused = steps["spikegpt-fused"]
        mix_ms = cfg.n_layer * (opt["mix5"]["reference"] - opt["mix5"]["fused"]) * step_batch / B
        neuron_ms = 2 * cfg.n_layer * opt["lif"]["fused"] * step_batch / B
        wkv_ms = cfg.n_layer * opt["wkv"]["fused"] * step_batch / B
        result["shapes"][preset] = {
            "shape": shape, "step_batch_size": step_batch, "op_ms_forward_backward": opt,
            "seconds_per_step": steps, "tokens_per_second": {k: tokens / s for k, s in steps.items()},
            "fused_vs_transformer": fused / steps["transformer"],
            "reference_vs_transformer": steps["spikegpt-reference"] / steps["transformer"],
            "fused_step_share_estimate": {"neuron": neuron_ms / 1e3 / fused, "wkv": wkv_ms / 1e3 / fused},
            "fused_mix_saving_estimate_seconds": mix_ms / 1e3}
        lines += [f"### {preset}: L{cfg.n_layer} C{C} ctx {T}; ops at batch {B}, training step at batch "
                  f"{step_batch}", "", "| op (forward + backward) | reference ms | fused ms | speed-up |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {op} | {t['reference']:.2f} | {t['fused']:.2f} | {t['reference'] / t['fused']:.1f}x |"
                  for op, t in opt.items()]
        lines += ["", "| training step | s/step | tokens/s | vs transformer |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {s:.4f} | {tokens / s:.0f} | {s / steps['transformer']:.2f}x |" for k, s in steps.items()]
        lines += ["", f"Fused step, estimated from the per-op timings: neuron {100 * neuron_ms / 1e3 / fused:.0f}%, "
                  f"WKV {100 * wkv_ms / 1e3 / fused:.0f}%, the rest (matrix products, token-shift mixes, "
                  "norms, optimizer) the remainder.  The fused mixes save about "
                  f"{mix_ms:.0f} ms per step ({100 * mix_ms / 1e3 / fused:.0f}% of it), estimated from the mix5 timings.", ""]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.smoke:
        stem = RESULTS / f"cpu_fused-{result['date'][:10]}-{result['commit']}"
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stem.with_suffix(".json"), result)
        atomic_write_text(stem.with_suffix(".md"), markdown + "\n")
        print(f"written to {stem}.json")
    return result


if __name__ == "__main__":
    main()
