"""Benchmark the WKV, LIF and GIF kernels: Triton vs the PyTorch reference (eager and torch.compile'd) vs
flash-linear-attention's RWKV-4 kernel (when ``fla`` is importable).

For every (B, T, C) and dtype it times the forward and the forward+backward and reports the achieved
bandwidth counting only the *minimum* bytes of docs/model.md §7 (per element of (B, T, C), s = bytes of the
I/O dtype: WKV forward 3s, forward+backward 8s; LIF and GIF forward 2s, forward+backward 5s), and that
bandwidth as a fraction of a device-to-device copy measured in the same run.

    python benchmarks/bench_kernels.py                 # GPU: all shapes, fp32 and bf16, writes
                                                       # benchmarks/results/kernels-<device>-<date>.{json,md}
    python benchmarks/bench_kernels.py --smoke         # CPU (Triton interpreter), tiny sizes, seconds

GIF runs the default ``--neuron gif`` configuration (``spikegpt.config.GIF_DEFAULTS``).

Options: ``--shapes 16x1024x512,12x1024x768``, ``--dtypes fp32,bf16``, ``--kernels wkv,lif,gif``,
``--compile-ref {none,wkv,all}`` (compiling the LIF reference unrolls its T-step Python loop and takes
minutes at T = 1024, so by default only the WKV reference is compiled), ``--out PATH``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # Triton must see this before it is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(16, 1024, 512), (12, 1024, 768), (1, 4096, 768), (32, 1024, 768)]
SMOKE_SHAPES = [(2, 20, 24)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIN_BYTES = {("wkv", "fwd"): 3, ("wkv", "fwd+bwd"): 8, ("lif", "fwd"): 2, ("lif", "fwd+bwd"): 5,
             ("gif", "fwd"): 2, ("gif", "fwd+bwd"): 5}


def _import_kernels():
    try:
        from spikegpt import kernels
    except ImportError:  # running from a source tree without the spikegpt.kernels mapping
        sys.path.insert(0, str(REPO))
        try:
            from spikegpt import kernels
        except ImportError:
            spec = importlib.util.spec_from_file_location(
                "spikegpt.kernels", REPO / "kernels" / "__init__.py",
                submodule_search_locations=[str(REPO / "kernels")])
            kernels = importlib.util.module_from_spec(spec)
            sys.modules["spikegpt.kernels"] = kernels
            spec.loader.exec_module(kernels)
    return kernels


def _fla_rwkv4():
    try:
        from fla.ops.rwkv4 import fused_recurrent_rwkv4
    except Exception:  # noqa: BLE001  (not installed, or broken against this torch/triton)
        return None
    return fused_recurrent_rwkv4


# --------------------------------------------------------------------------------------------------
def _timer(device):
    if device.type == "cuda":
        import triton.testing

        def run(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100)  # ms (median)
        return run

    def run_cpu(fn):
        fn()
        t0 = time.perf_counter()
        n = 0
        while n < 2 or time.perf_counter() - t0 < 0.2:
            fn()
            n += 1
        return (time.perf_counter() - t0) / n * 1e3
    return run_cpu


def copy_bandwidth(device, nbytes):
    """GB/s of ``dst.copy_(src)`` (read + write counted) for an nbytes buffer."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _timer(device)(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _wkv_impls(kernels, fla, compile_ref):
    from spikegpt.ops import wkv_torch

    impls = {"triton": lambda w, u, k, v: kernels.wkv(w, u, k, v)[0],
             "torch": lambda w, u, k, v: wkv_torch(w, u, k, v)[0]}
    if compile_ref in ("wkv", "all"):
        compiled = torch.compile(wkv_torch)
        impls["torch.compile"] = lambda w, u, k, v: compiled(w, u, k, v)[0]
    if fla is not None:
        def run_fla(w, u, k, v):
            # fla's RWKV-4 takes time_decay (it applies -exp itself) and a (B, 3, 1, C) state
            # (numerator, denominator, exponent).
            state = torch.zeros(k.shape[0], 3, 1, k.shape[2], dtype=k.dtype, device=k.device)
            state[:, 2] = -1e38
            return fla(torch.log(-w), u, k, v, state)[0]
        impls["fla"] = run_fla
    return impls


def _lif_impls(kernels, compile_ref):
    from spikegpt.ops import lif_torch

    impls = {"triton": lambda x: kernels.lif(x)[0], "torch": lambda x: lif_torch(x)[0]}
    if compile_ref == "all":
        compiled = torch.compile(lif_torch)
        impls["torch.compile"] = lambda x: compiled(x)[0]
    return impls


def _gif_impls(kernels, compile_ref):
    from spikegpt.config import GIF_DEFAULTS
    from spikegpt.ops import gif_torch

    d = GIF_DEFAULTS
    kw = dict(levels=d["levels"], bipolar=d["polarity"] == "bipolar", reset=d["reset"], surrogate=d["surrogate"])
    impls = {"triton": lambda x: kernels.gif(x, None, 1.0, **kw)[0], "torch": lambda x: gif_torch(x, None, 1.0, **kw)[0]}
    if compile_ref == "all":
        compiled = torch.compile(gif_torch)
        impls["torch.compile"] = lambda x: compiled(x, None, 1.0, **kw)[0]
    return impls


def bench_case(kernel, impl, fn, shape, dtype, device, timer):
    B, T, C = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    if kernel == "wkv":
        w = (-torch.exp(torch.randn(C, generator=g))).to(device).requires_grad_()
        u = torch.randn(C, generator=g).to(device).requires_grad_()
        k = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
        v = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
        inputs = (w, u, k, v)
    else:
        x = (torch.randn(B, T, C, generator=g) * 1.5 + 0.8).to(device=device, dtype=dtype).requires_grad_()
        inputs = (x,)
    gy = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        y = fn(*inputs)
        return torch.autograd.grad(y, inputs, gy)

    rows = []
    for name, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        try:
            ms = timer(f)
            err = None
        except Exception as e:  # noqa: BLE001  (report, keep benchmarking the rest)
            ms, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        nbytes = MIN_BYTES[(kernel, name)] * torch.finfo(dtype).bits // 8 * B * T * C
        rows.append({"kernel": kernel, "impl": impl, "pass": name, "B": B, "T": T, "C": C,
                     "dtype": str(dtype).replace("torch.", ""), "ms": ms,
                     "GBps": None if ms is None else nbytes / (ms * 1e-3) / 1e9,
                     "min_bytes": nbytes, "error": err})
    return rows


def _git_commit():
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def markdown(report):
    lines = [f"# Kernel benchmark: {report['device']}", "",
             f"commit `{report['commit']}`, {report['date']}, torch {report['torch']}, "
             f"triton {report['triton']}; copy bandwidth {report['copy_GBps']:.0f} GB/s. "
             "GB/s counts only the minimum bytes (WKV 3s fwd / 8s fwd+bwd, LIF and GIF 2s / 5s per element).",
             "", "| kernel | impl | pass | B×T×C | dtype | ms | GB/s | % of copy |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for r in report["results"]:
        shape = f"{r['B']}×{r['T']}×{r['C']}"
        if r["ms"] is None:
            lines.append(f"| {r['kernel']} | {r['impl']} | {r['pass']} | {shape} | {r['dtype']} | "
                         f"failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['impl']} | {r['pass']} | {shape} | {r['dtype']} | "
                         f"{r['ms']:.3f} | {r['GBps']:.0f} | {100 * r['frac_copy']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (Triton interpreter)")
    ap.add_argument("--shapes", help="comma-separated BxTxC list")
    ap.add_argument("--dtypes", default=None, help="comma-separated subset of fp32,bf16")
    ap.add_argument("--kernels", default="wkv,lif,gif")
    ap.add_argument("--compile-ref", choices=("none", "wkv", "all"), default="wkv")
    ap.add_argument("--out", help="JSON path (a .md table is written beside it)")
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        shapes = SMOKE_SHAPES
        dtypes = ["fp32"]
        compile_ref = "none"
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: the Triton kernels only run in the interpreter here; use --smoke")
        device = torch.device("cuda")
        shapes = SHAPES
        dtypes = ["fp32", "bf16"]
        compile_ref = args.compile_ref
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    if args.dtypes:
        dtypes = args.dtypes.split(",")

    kernels = _import_kernels()
    import triton
    fla = None if args.smoke else _fla_rwkv4()
    timer = _timer(device)
    copy_gbps = copy_bandwidth(device, (1 << 20) if args.smoke else (1 << 30))
    print(f"device: {_device_name(device)}; copy bandwidth {copy_gbps:.1f} GB/s"
          + ("" if fla else "; flash-linear-attention not importable"))

    results = []
    for kernel in args.kernels.split(","):
        impls = {"wkv": lambda: _wkv_impls(kernels, fla, compile_ref), "lif": lambda: _lif_impls(kernels, compile_ref),
                 "gif": lambda: _gif_impls(kernels, compile_ref)}[kernel]()
        for shape in shapes:
            for dt in dtypes:
                for impl, fn in impls.items():
                    for r in bench_case(kernel, impl, fn, shape, DTYPES[dt], device, timer):
                        r["frac_copy"] = None if r["GBps"] is None else r["GBps"] / copy_gbps
                        results.append(r)
                        if r["ms"] is None:
                            print(f"{kernel:4s} {impl:14s} {r['pass']:8s} {shape} {dt}: {r['error']}")
                        else:
                            print(f"{kernel:4s} {impl:14s} {r['pass']:8s} {shape} {dt}: {r['ms']:9.3f} ms "
                                  f"{r['GBps']:8.1f} GB/s {100 * r['frac_copy']:5.1f}% of copy")

    report = {"device": _device_name(device), "commit": _git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
              "copy_GBps": copy_gbps, "min_bytes_per_element": {f"{k}/{p}": b for (k, p), b in MIN_BYTES.items()},
              "results": results}
    out = args.out
    if out is None and device.type == "cuda":
        slug = _device_name(device).replace(" ", "-").replace("/", "-")
        out = REPO / "benchmarks" / "results" / f"kernels-{slug}-{datetime.date.today().isoformat()}.json"
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from spikegpt.fileio import atomic_write_text
        atomic_write_text(out, json.dumps(report, indent=1))
        atomic_write_text(out.with_suffix(".md"), markdown(report))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = [r for r in results if r["impl"] == "triton" and r["ms"] is None]
    return 1 if failed else 0


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"


if __name__ == "__main__":
    sys.exit(main())
