"""Throughput of a full training step: tokens/s, model FLOP utilisation, peak memory, and the share
of the step spent in the WKV and LIF operations.

    python benchmarks/bench_train.py                      # GPU: 45m and 216m at ctx 1024, fp32/bf16,
                                                          # Triton vs reference kernels, +- torch.compile
    python benchmarks/bench_train.py --smoke              # CPU, a tiny model, a few seconds (CI)

A step is forward + backward + AdamW on one batch of ``--batch-size`` x ctx tokens under the chosen
autocast dtype.  MFU counts ``6 x (parameters of the matrix products) x tokens`` per second (the
embedding table is a lookup, not a product, and WKV/LIF are O(T C)) against ``--peak-tflops``
(default: the dense bf16 / fp32 peak of known GPUs, tf32 where torch allows it, else unreported).  The
WKV+LIF share is ``(L * t_wkv + 2L * t_lif) / t_step`` with each operation's forward+backward
(``torch.autograd.grad`` of the op alone) timed at the step's shape, in the step's dtype and backend.
A configuration that fails (an error, out of memory) is reported as such and the rest still run; the
exit status is 1 if any failed.  Results go to ``benchmarks/results/train-<date>-<commit>.{json,md}``,
or to ``--out PATH`` (JSON, and the table beside it as ``.md``).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, timeit, write_json_md, write_result  # noqa: E402

from spikegpt import ModelConfig, SpikeGPT, ops  # noqa: E402
from spikegpt.config import preset  # noqa: E402

# Dense peak TFLOP/s of GPUs we know (the vendors' data sheets, without sparsity), the most specific
# name first; extend with --peak-tflops.
PEAKS = {"H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
         "H100 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
         "H200 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
         "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
         "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
         "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}}


def peak_tflops(device, dtype, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        dtype = "tf32"
    name = torch.cuda.get_device_name(device)
    return next((p[dtype] for key, p in PEAKS.items() if key in name), None)


def matmul_params(model) -> int:
    """Parameters that take part in a matrix product per token (every ``nn.Linear``, the head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def autocast(device, dtype):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark


def bench_one(cfg, batch, device, dtype, backend, compile_model, iters):
    torch.manual_seed(0)
    model = SpikeGPT(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=4e-9, weight_decay=0.0)
    forward = torch.compile(model) if compile_model else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len), device=device)

    def step():
        with autocast(device, dtype):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with ops.use_backend(backend):
        t_step = timeit(step, device, warmup=2, iters=iters)
        # The two sequence ops alone, at the step's shape and dtype.
        io = torch.bfloat16 if dtype == "bf16" else torch.float32
        B, T, C = batch, cfg.ctx_len, cfg.n_embd
        w = -torch.exp(torch.randn(C, device=device)).requires_grad_()
        u = torch.randn(C, device=device, requires_grad=True)
        k, v = (torch.randn(B, T, C, device=device, dtype=io, requires_grad=True) for _ in range(2))
        a = (torch.randn(B, T, C, device=device) * 1.5 + 0.8).to(io).requires_grad_()  # fires ~1/3
        gy = torch.randn(B, T, C, device=device, dtype=io)

        def wkv():
            torch.autograd.grad(ops.wkv(w, u, k, v)[0], (w, u, k, v), gy)

        def lif():
            torch.autograd.grad(ops.lif(a)[0], a, gy)

        t_wkv = timeit(wkv, device, warmup=2, iters=iters)
        t_lif = timeit(lif, device, warmup=2, iters=iters)
    tokens = batch * cfg.ctx_len
    flops = 6 * matmul_params(model) * tokens / t_step
    return {"n_params": model.num_params(), "matmul_params": matmul_params(model),
            "seconds_per_step": t_step, "tokens_per_s": tokens / t_step, "tflops": flops / 1e12,
            "peak_memory_gib": peak_memory_gib(device),
            "wkv_lif_share": cfg.n_layer * (t_wkv + 2 * t_lif) / t_step,
            "wkv_fwd_bwd_ms": t_wkv * 1e3, "lif_fwd_bwd_ms": t_lif * 1e3}


def report(rows, batch_size, device):
    """The result dict and its markdown table."""
    result = {**header(device), "batch_size": batch_size, "rows": rows}
    lines = [f"Training step — {result['device']}, torch {result['torch']}, commit {result['commit']}, "
             f"{result['date']}, batch {batch_size}", "",
             "| config | dtype | kernels | compile | tokens/s | TFLOP/s | MFU | peak mem GiB | WKV+LIF share |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['dtype']} | {r['kernels']} | {r['compile']} | failed: {r['error']} "
                         "| | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['config']} | {r['dtype']} | {r['kernels']} | {r['compile']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tflops']:.2f} | {mfu} | {r['peak_memory_gib']:.2f} | {100 * r['wkv_lif_share']:.1f}% |")
    return result, "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="45m,216m")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--backends", default="triton,torch")
    p.add_argument("--compile", default="off,on", help="off, on, or off,on")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, reference backend, no file")
    p.add_argument("--out", help="JSON path (the table is written beside it as .md) instead of benchmarks/results/")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.smoke:
        configs = {"smoke": ModelConfig(vocab_size=64, n_layer=2, n_embd=32, ctx_len=32)}
        args.batch_size, args.dtypes, args.backends, args.compile, args.iters = 2, "fp32", "torch", "off", 2
    else:
        configs = {}
        for name in args.presets.split(","):
            model_over, _ = preset(name)
            configs[name] = ModelConfig(**{"vocab_size": 256, **model_over})
    if device.type == "cpu" and "triton" in args.backends.split(",") and not args.smoke:
        print("no CUDA device: timing the reference backend only")
        args.backends = "torch"

    rows = []
    for name, cfg in configs.items():
        for dtype in args.dtypes.split(","):
            for backend in args.backends.split(","):
                for comp in args.compile.split(","):
                    row = {"config": name, "dtype": dtype, "kernels": backend, "compile": comp == "on"}
                    try:
                        r = bench_one(cfg, args.batch_size, device, dtype, backend, comp == "on", args.iters)
                    except Exception as e:  # noqa: BLE001  (report it, run the other configurations)
                        rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                        print(f"{name} {dtype} {backend} compile={comp}: failed: {rows[-1]['error']}", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    else:
                        peak = peak_tflops(device, dtype, args.peak_tflops)
                        rows.append({**row, **r, "peak_tflops": peak, "mfu": r["tflops"] / peak if peak else None})
                        print(f"{name} {dtype} {backend} compile={comp}: {r['tokens_per_s']:.0f} tok/s, "
                              f"{r['tflops']:.2f} TFLOP/s, WKV+LIF {100 * r['wkv_lif_share']:.1f}% of the step",
                              flush=True)
                    if args.out:  # after every configuration, so that a run stopped later keeps it
                        write_json_md(args.out, *report(rows, args.batch_size, device))

    result, markdown = report(rows, args.batch_size, device)
    print(markdown)
    if args.out:
        print(f"written to {write_json_md(args.out, result, markdown)}")
    elif not args.smoke:
        print(f"written to {write_result('train', result, markdown)}")
    return result


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()["rows"]) else 0)
