"""Where a CPU training step's time goes: matrix products, the neurons, WKV, the rest (issue 17).

    python benchmarks/profile_cpu_train.py                  # tiny: L4 C128 ctx 64 batch 12 vocab 65, 10 steps
    python benchmarks/profile_cpu_train.py --shape 45m      # L12 C512 ctx 1024 vocab 256, batch 1, 3 steps
    python benchmarks/profile_cpu_train.py --threads 1      # on a busy machine (see below)
    python benchmarks/profile_cpu_train.py --smoke          # tiny sizes, seconds, no file (CI)

A step is what ``bench_cpu_train.py`` times (forward + backward + gradient clipping + AdamW), on the
fused CPU ops (``--kernels auto``, the default) or the references (``--kernels torch``), run under
``torch.profiler``; ``step_profile.py`` says how each op's self CPU time goes to a category (matmul,
neuron, WKV, other).

The profiler adds about a microsecond per op, which weighs most on the categories made of many small
ops; the step's time without the profiler (median of ``--steps``) is reported beside the shares, with
the machine's load average before and after.  On a CPU shared with other processes, OpenMP's
spin-waiting makes multi-threaded steps erratic (10-100x slower at times): ``--threads 1`` gives
stable numbers there.  Results go to
``benchmarks/results/profile_cpu_train-SHAPE-THREADSt[-torch]-DATE-COMMIT.{json,md}``, or ``--out PATH``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_train import train_step_fn  # noqa: E402
from common import header, timeit, write_json_md, write_result  # noqa: E402
from step_profile import profile_steps  # noqa: E402

from spikegpt import ModelConfig, SpikeGPT, ops  # noqa: E402

SHAPES = {"tiny": dict(n_layer=4, n_embd=128, ctx_len=64, vocab_size=65, batch_size=12, steps=10),
          "45m": dict(n_layer=12, n_embd=512, ctx_len=1024, vocab_size=256, batch_size=1, steps=3),
          "smoke": dict(n_layer=2, n_embd=32, ctx_len=16, vocab_size=65, batch_size=2, steps=2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("tiny", "45m"), default="tiny")
    p.add_argument("--batch-size", type=int, help="default: 12 at tiny, 1 at 45m")
    p.add_argument("--steps", type=int, help="timed and profiled steps (default: 10 at tiny, 3 at 45m)")
    p.add_argument("--kernels", choices=("auto", "torch"), default="auto",
                   help="auto: the fused CPU ops where they build; torch: the PyTorch references")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS or all cores)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds, writes no file")
    p.add_argument("--out", help="JSON path (the table is written beside it as .md) instead of benchmarks/results/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "smoke" if args.smoke else args.shape
    shape = dict(SHAPES[name])
    batch, steps = shape.pop("batch_size"), shape.pop("steps")
    batch, steps = args.batch_size or batch, args.steps or steps

    device = torch.device("cpu")
    cfg = ModelConfig(**shape)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.ctx_len))
    load_before = os.getloadavg()
    with ops.use_backend(args.kernels):
        step = train_step_fn(SpikeGPT(cfg).train(), x, y)
        seconds = timeit(step, device, warmup=1 if args.smoke else 2, iters=steps)
        breakdown = profile_steps(step, steps)
    load_after = os.getloadavg()

    result = {**header(device), "shape": {**shape, "batch_size": batch, "name": name}, "steps": steps,
              "kernels": args.kernels, "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "seconds_per_step": seconds, "tokens_per_s": batch * cfg.ctx_len / seconds, **breakdown,
              "load_average_1min": [load_before[0], load_after[0]],
              "note": "wall times on a machine shared with other processes: see load_average_1min "
                      f"(1-minute load before and after, on {os.cpu_count()} cores)"}
    lines = [f"CPU training step profile, {name}: L{cfg.n_layer} C{cfg.n_embd} ctx {cfg.ctx_len} batch {batch} "
             f"vocab {cfg.vocab_size}, {steps} steps, --kernels {args.kernels} — {result['device']}, torch {result['torch']}, commit "
             f"{result['commit']}, {result['date']}", "",
             f"{seconds:.4f} s per step without the profiler ({result['tokens_per_s']:.0f} tokens/s), "
             f"{breakdown['profiled_ms_per_step'] / 1e3:.4f} s with it; 1-minute load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} cores, shared).", "",
             "| category | ms per step (profiled) | share |", "|---|---:|---:|"]
    lines += [f"| {c} | {v['ms_per_step']:.2f} | {100 * v['share']:.1f}% |" for c, v in breakdown["categories"].items()]
    lines += ["", "Largest ops in `other`: " + ", ".join(
        f"{o['op']} {100 * o['share']:.1f}% ({o['calls_per_step']} calls/step)" for o in breakdown["top_other_ops"])]
    markdown = "\n".join(lines)
    print(markdown)
    if args.out:
        print(f"written to {write_json_md(args.out, result, markdown)}")
    elif not args.smoke:
        suffix = "" if args.kernels == "auto" else f"-{args.kernels}"
        print(f"written to {write_result(f'profile_cpu_train-{name}-{torch.get_num_threads()}t{suffix}', result, markdown)}")
    return result


if __name__ == "__main__":
    main()
