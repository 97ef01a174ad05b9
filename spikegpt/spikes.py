"""Spike recording: which neurons fired, counted while the model runs, and the statistics to log.

``with record_spikes(model): model(...)`` makes every neuron module count its outputs (per neuron, on
the device, no host sync) and counts the ones of the binary embedding; ``firing_rates(model)`` then
returns a flat dict of rates to log::

    {"emb": fraction of ones of H(E[idx]),          # absent for a non-binary embedding
     "att.0": ..., "ffn.0": ..., ... ,              # per layer and branch: spikes / (neurons x tokens)
     "att": ..., "ffn": ..., "all": ...}            # means over layers (over every neuron for "all")

A rate is the fraction of neurons that spike (emit a non-zero spike count) per token: non-zero
outputs / (B * T * C), over everything recorded since the recording started (or since
``reset_spike_stats``).  Multi-level neurons (``gif``, ``quant``) emit integer spike counts ``s``;
for them ``level_stats(model)`` adds, with the same keys, ``mean_abs_s/...`` = sum |s| / (B * T * C)
(the spike-count-weighted event rate; equal to the rate for ``lif``) and ``effective_bits/...``:
the entropy in bits of the branch's level distribution (:func:`entropy_bits`), the information one
neuron-token carries at the measured level usage (``all``: the mean over branches).
``spike_summary(model)`` pools them over every branch.

A non-spiking model (``ModelConfig(spiking=False, binary_embedding=False)``) has no rates: ``{}``.
Recording is off by default and costs one attribute test per neuron call when off.
``SpikeGPT.step``'s fast recurrent decoder may bypass the neuron modules: record through
``model(...)`` (the parallel path).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["record_spikes", "firing_rates", "level_stats", "spike_stats", "spike_summary", "entropy_bits",
           "reset_spike_stats", "all_reduce_spike_stats", "SpikeRates"]

# --------------------------------------------------------------------------------------------------
# Recording.
# --------------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The SpikeGPT inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and not hasattr(model, "blocks"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def neuron_branches(model):
    """[(name, layer, LIF)] in layer order: ("att", l, block.lif1), ("ffn", l, block.lif2)."""
    model = unwrap(model)
    out = []
    for l, block in enumerate(model.blocks):
        out += [("att", l, block.lif1), ("ffn", l, block.lif2)]
    return out


def _count_embedding_ones(module, inputs, output):
    ones = (output.detach() >= 0).count_nonzero()
    prev = getattr(module, "spike_ones", None)
    module.spike_ones = ones if prev is None else prev + ones
    module.spike_elems = getattr(module, "spike_elems", 0) + output.numel()


def reset_spike_stats(model) -> None:
    """Forget everything recorded so far (spike counts, embedding ones, raw traces)."""
    model = unwrap(model)
    for _, _, lif in neuron_branches(model):
        lif.reset_records()
    model.emb.spike_ones, model.emb.spike_elems = None, 0


@contextlib.contextmanager
def record_spikes(model, raw: bool = False, reset: bool = True):
    """Record spikes of every LIF module (and the binary embedding's ones) inside the block.

    ``raw=False`` keeps per-neuron spike counts only (cheap: no host sync, O(C) memory per LIF);
    ``raw=True`` also keeps every spike tensor (bool, CPU) for rasters.  ``reset`` clears earlier
    records first.  Yields the unwrapped model; read the result with :func:`firing_rates` or
    :func:`spike_stats` (the records stay after the block ends)."""
    base = unwrap(model)
    if reset:
        reset_spike_stats(base)
    lifs = [lif for _, _, lif in neuron_branches(base)]
    previous = [lif.record for lif in lifs]
    for lif in lifs:
        lif.record = "raw" if raw else "rate"
    handle = base.emb.register_forward_hook(_count_embedding_ones) if base.config.binary_embedding else None
    try:
        yield base
    finally:
        for lif, prev in zip(lifs, previous):
            lif.record = prev
        if handle is not None:
            handle.remove()


def all_reduce_spike_stats(model) -> None:
    """Sum the records of every process of the default ``torch.distributed`` group into each one
    (spike counts, sums of |s|, level counts, steps, embedding ones), so that the statistics cover
    the whole global batch (a collective: every rank calls it; no-op without a process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    model = unwrap(model)
    lifs = [lif for _, _, lif in neuron_branches(model)]
    device = model.emb.weight.device
    C, K = model.config.n_embd, len(lifs[0].level_values)

    def records(name, size):
        return [torch.zeros(size, dtype=torch.float64, device=device) if getattr(lif, name) is None
                else getattr(lif, name).to(device, torch.float64) for lif in lifs]

    emb_ones, emb_elems = getattr(model.emb, "spike_ones", None), getattr(model.emb, "spike_elems", 0)
    scalars = torch.tensor([lif.spike_steps for lif in lifs] + [float(emb_ones or 0), emb_elems],
                           dtype=torch.float64, device=device)
    flat = torch.cat(records("spike_counts", C) + records("spike_abs", C) + records("level_counts", K) + [scalars])
    dist.all_reduce(flat)  # float64 holds integer counts exactly up to 2^53
    n = len(lifs)
    counts, abs_sums, levels, steps, emb = flat.split([n * C, n * C, n * K, n, 2])
    for lif, c, a, h, st in zip(lifs, counts.view(n, C), abs_sums.view(n, C), levels.view(n, K), steps.tolist()):
        lif.spike_counts, lif.spike_abs, lif.level_counts, lif.spike_steps = \
            (c.long(), a.long(), h.long(), int(st)) if st else (None, None, None, 0)
    emb_ones, emb_elems = emb.tolist()
    model.emb.spike_ones, model.emb.spike_elems = (emb_ones, int(emb_elems)) if emb_elems else (None, 0)


def entropy_bits(level_counts) -> float:
    """Effective bits of a level histogram ``n_k``: the entropy ``H = -sum_k p_k log2 p_k`` of
    ``p_k = n_k / sum_j n_j`` (0 log 0 = 0); 1 bit at most for binary spikes, log2(#levels) at most."""
    n = torch.as_tensor(level_counts).double()
    p = n / n.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def spike_stats(model) -> dict:
    """Detailed records: ``{"emb": rate or None, "levels": [possible spike counts], "branches":
    [{"branch", "layer", "steps", "rate", "mean_abs_s", "effective_bits", "level_counts": [count per
    level], "per_neuron": (C,) float tensor of per-neuron rates}]}``, levels [0, 1] for ``lif`` and
    the statistics None where nothing was recorded.  ``rate`` = non-zero outputs / neuron-steps,
    ``mean_abs_s`` = sum |s| / neuron-steps, ``effective_bits`` = :func:`entropy_bits` of the levels."""
    model = unwrap(model)
    emb_elems = getattr(model.emb, "spike_elems", 0)
    emb = float(model.emb.spike_ones) / emb_elems if emb_elems else None
    branches = []
    for name, l, lif in neuron_branches(model):
        b = {"branch": name, "layer": l, "steps": lif.spike_steps, "rate": None, "mean_abs_s": None,
             "effective_bits": None, "level_counts": None, "per_neuron": None}
        if lif.spike_steps and lif.spike_counts is not None:
            neuron_steps = lif.spike_steps * lif.spike_counts.numel()
            b.update(rate=float(lif.spike_counts.sum()) / neuron_steps,
                     mean_abs_s=float(lif.spike_abs.sum()) / neuron_steps,
                     effective_bits=entropy_bits(lif.level_counts.cpu()),
                     level_counts=lif.level_counts.tolist(),
                     per_neuron=lif.spike_counts.double().cpu() / lif.spike_steps)
        branches.append(b)
    return {"emb": emb, "levels": list(neuron_branches(model)[0][2].level_values), "branches": branches}


def spike_summary(model) -> dict | None:
    """Pooled over every branch: ``{"firing_rate", "mean_abs_s"}`` per neuron-token,
    ``"effective_bits"`` (the mean over branches of each branch's entropy), ``"levels"`` and
    ``"level_counts"`` (summed over branches); None when nothing was recorded."""
    stats = spike_stats(model)
    recorded = [b for b in stats["branches"] if b["rate"] is not None]
    if not recorded:
        return None
    lifs = {(name, l): lif for name, l, lif in neuron_branches(model)}
    neurons = [lifs[b["branch"], b["layer"]] for b in recorded]
    neuron_steps = sum(n.spike_steps for n in neurons) * neurons[0].spike_counts.numel()
    return {"firing_rate": sum(float(n.spike_counts.sum()) for n in neurons) / neuron_steps,
            "mean_abs_s": sum(float(n.spike_abs.sum()) for n in neurons) / neuron_steps,
            "effective_bits": sum(b["effective_bits"] for b in recorded) / len(recorded),
            "levels": stats["levels"],
            "level_counts": [sum(c) for c in zip(*(b["level_counts"] for b in recorded))]}


def _by_branch(stats, field) -> dict:
    """``{"att.{l}", "ffn.{l}": value, "att", "ffn": mean over layers, "all": mean over branches}``."""
    out, means = {}, {"att": [], "ffn": []}
    for b in stats["branches"]:
        if b[field] is not None:
            out[f"{b['branch']}.{b['layer']}"] = b[field]
            means[b["branch"]].append(b[field])
    for name, values in means.items():
        if values:
            out[name] = sum(values) / len(values)
    if means["att"] or means["ffn"]:
        values = means["att"] + means["ffn"]
        out["all"] = sum(values) / len(values)
    return out


def firing_rates(model, prefix: str = "") -> dict:
    """Flat ``{prefix+key: rate}`` for logging (keys ``emb``, ``att.{l}``, ``ffn.{l}``, ``att``,
    ``ffn``, ``all``), from what was recorded; ``{}`` when nothing was (or the model does not spike)."""
    stats = spike_stats(model)
    out = {} if stats["emb"] is None else {"emb": stats["emb"]}
    out.update(_by_branch(stats, "rate"))
    return {prefix + k: v for k, v in out.items()}


def level_stats(model, prefix: str = "") -> dict:
    """Flat ``{prefix+"mean_abs_s/"+key, prefix+"effective_bits/"+key: value}`` with the keys of
    :func:`firing_rates` (no ``emb``), for multi-level neurons (``gif``, ``quant``); ``{}`` for
    ``lif`` (whose mean |s| is its rate) and when nothing was recorded."""
    model = unwrap(model)
    if model.config.neuron == "lif":
        return {}
    stats = spike_stats(model)
    return {f"{prefix}{field}/{k}": v for field in ("mean_abs_s", "effective_bits")
            for k, v in _by_branch(stats, field).items()}


# --------------------------------------------------------------------------------------------------
# Rates as the operation counts take them.
# --------------------------------------------------------------------------------------------------
@dataclass
class SpikeRates:
    """Measured rates: ``emb`` fraction of ones of the binary embedding (None if not binary);
    ``att[l]``, ``ffn[l]`` the firing rates of the neurons (None for a non-spiking model);
    ``att_abs[l]``, ``ffn_abs[l]`` their mean |s| per neuron-token, the rate of unit events that
    spike-driven accumulates count (None: binary spikes, equal to the rates)."""

    emb: float | None
    att: list | None = None
    ffn: list | None = None
    att_abs: list | None = None
    ffn_abs: list | None = None

    @classmethod
    def from_model(cls, model) -> "SpikeRates":
        stats = spike_stats(model)
        if not unwrap(model).config.spiking:
            return cls(emb=stats["emb"])
        by = {f: {name: [b[f] for b in stats["branches"] if b["branch"] == name] for name in ("att", "ffn")}
              for f in ("rate", "mean_abs_s")}
        return cls(emb=stats["emb"], att=by["rate"]["att"], ffn=by["rate"]["ffn"],
                   att_abs=by["mean_abs_s"]["att"], ffn_abs=by["mean_abs_s"]["ffn"])

    def events(self) -> tuple[list, list]:
        """(att, ffn) per layer: the mean |s| where measured, else the rates."""
        return (self.att if self.att_abs is None else self.att_abs,
                self.ffn if self.ffn_abs is None else self.ffn_abs)
