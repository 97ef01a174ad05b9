"""Where a CPU training step's time goes, by torch.profiler: matrix products, the neurons, WKV, the rest.

Shared by ``profile_cpu_train.py`` and ``bench_cpu_train.py``.  While profiling, ``ops.wkv`` and the
neuron ops (``ops.lif``, ``ops.gif``) are wrapped in ``record_function`` ranges (by replacing the
module attributes the model calls; the model itself is unchanged).  Every op's self CPU time then goes
to one category:

* ``wkv`` / ``neuron``: ops inside that range in the forward pass (the fused C++ op, or the reference's
  small ops), and in the backward pass the autograd nodes created there (matched by their sequence
  numbers), with everything they call;
* ``matmul``: the matrix products everywhere else (``aten::mm``, ``addmm``, ``bmm``, ...), forward and
  backward;
* ``other``: the rest: the token-shift mixes, gates, LayerNorm, embedding and loss, the optimizer, and
  the Python between ops.

The profiler adds about a microsecond per op, which weighs most on the categories made of many small
ops, so the shares are of the profiled step; callers report the step's time without the profiler
beside them.
"""
from __future__ import annotations

import functools
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile, record_function

from spikegpt import ops

RANGES = {"spikegpt::wkv": "wkv", "spikegpt::neuron": "neuron"}
NEURON_OPS = ("lif", "gif")  # ops.gif: the GIF neurons (issue 13), where the package has them
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::linear",
          "aten::mv", "aten::addmv", "aten::dot"}
STEP = "train_step"
ENGINE = "autograd::engine::evaluate_function: "
CATEGORIES = ("matmul", "neuron", "wkv", "other")


def _ranged(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def wrap_ops():
    """Wrap ops.wkv and the neuron ops in profiler ranges; returns the originals (for unwrap_ops)."""
    originals = {"wkv": ops.wkv, **{n: getattr(ops, n) for n in NEURON_OPS if hasattr(ops, n)}}
    for n, fn in originals.items():
        setattr(ops, n, _ranged("spikegpt::wkv" if n == "wkv" else "spikegpt::neuron", fn))
    return originals


def unwrap_ops(originals):
    for n, fn in originals.items():
        setattr(ops, n, fn)


def categorise(events, steps: int) -> dict:
    """Self CPU time per category (ms per step, share of the step) and the top ops of ``other``."""
    def ancestors(e):
        while e is not None:
            yield e
            e = e.cpu_parent

    in_step = [e for e in events if any(a.name == STEP for a in ancestors(e))]
    # Autograd nodes created inside a range: the forward ops' sequence numbers.
    created = {}
    for e in in_step:
        if e.sequence_nr >= 0 and not e.name.startswith(ENGINE):
            for a in ancestors(e):
                if a.name in RANGES:
                    created[e.sequence_nr] = RANGES[a.name]
                    break

    def category(e):
        for a in ancestors(e):
            if a.name in RANGES:
                return RANGES[a.name]
            if a.name.startswith(ENGINE) and a.sequence_nr in created:
                return created[a.sequence_nr]
        return "matmul" if e.name in MATMUL else "other"

    us = defaultdict(float)
    other = defaultdict(lambda: [0.0, 0])
    for e in in_step:
        c = category(e)
        us[c] += e.self_cpu_time_total
        if c == "other":
            other[e.name][0] += e.self_cpu_time_total
            other[e.name][1] += 1
    total = sum(us.values()) or 1.0
    top = sorted(other.items(), key=lambda kv: kv[1][0], reverse=True)[:10]
    return {"profiled_ms_per_step": total / 1e3 / steps,
            "categories": {c: {"ms_per_step": us[c] / 1e3 / steps, "share": us[c] / total} for c in CATEGORIES},
            "top_other_ops": [{"op": name, "ms_per_step": t / 1e3 / steps, "share": t / total,
                               "calls_per_step": n // steps}
                              for name, (t, n) in top]}


def profile_steps(step, steps: int) -> dict:
    """Run ``step`` ``steps`` times under the profiler; :func:`categorise` of the result."""
    originals = wrap_ops()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function(STEP):
                    step()
    finally:
        unwrap_ops(originals)
    return categorise(prof.events(), steps)
