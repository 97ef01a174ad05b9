"""Spike recording: which neurons fired, counted while the model runs, and the firing rates to log.

``with record_spikes(model): model(...)`` makes every LIF module count its spikes (per neuron, on
the device, no host sync) and counts the ones of the binary embedding; ``firing_rates(model)`` then
returns a flat dict of rates to log::

    {"emb": fraction of ones of H(E[idx]),          # absent for a non-binary embedding
     "att.0": ..., "ffn.0": ..., ... ,              # per layer and branch: spikes / (neurons x tokens)
     "att": ..., "ffn": ..., "all": ...}            # means over layers (over every LIF neuron for "all")

A rate is the fraction of neurons that spike per token: total spikes / (B * T * C), averaged over
everything recorded since the recording started (or since ``reset_spike_stats``).  A non-spiking
model (``ModelConfig(spiking=False, binary_embedding=False)``) has no rates: ``{}``.  Recording is off
by default and costs one attribute test per LIF call when off.  ``SpikeGPT.step``'s fast recurrent
decoder may bypass the LIF modules: record through ``model(...)`` (the parallel path).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["record_spikes", "firing_rates", "spike_stats", "reset_spike_stats", "all_reduce_spike_stats",
           "SpikeRates"]

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
    """Sum the records of every process of the default ``torch.distributed`` group into each one,
    so that rates cover the whole global batch (a collective: every rank calls it; no-op without a
    process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    model = unwrap(model)
    lifs = [lif for _, _, lif in neuron_branches(model)]
    device = model.emb.weight.device
    zeros = torch.zeros(model.config.n_embd, dtype=torch.float64, device=device)
    counts = [zeros if lif.spike_counts is None else lif.spike_counts.to(device, torch.float64) for lif in lifs]
    emb_ones, emb_elems = getattr(model.emb, "spike_ones", None), getattr(model.emb, "spike_elems", 0)
    scalars = torch.tensor([lif.spike_steps for lif in lifs] + [float(emb_ones or 0), emb_elems],
                           dtype=torch.float64, device=device)
    flat = torch.cat(counts + [scalars])
    dist.all_reduce(flat)  # float64 holds integer counts exactly up to 2^53
    n = len(lifs) * zeros.numel()
    for lif, c, steps in zip(lifs, flat[:n].view(len(lifs), -1), flat[n:n + len(lifs)].tolist()):
        lif.spike_counts, lif.spike_steps = (c.long(), int(steps)) if steps else (None, 0)
    emb_ones, emb_elems = flat[-2:].tolist()
    model.emb.spike_ones, model.emb.spike_elems = (emb_ones, int(emb_elems)) if emb_elems else (None, 0)


def spike_stats(model) -> dict:
    """Detailed records: ``{"emb": rate or None, "branches": [{"branch", "layer", "rate", "steps",
    "per_neuron": (C,) float tensor of per-neuron rates}]}`` (rate None where nothing was recorded)."""
    model = unwrap(model)
    emb_elems = getattr(model.emb, "spike_elems", 0)
    emb = float(model.emb.spike_ones) / emb_elems if emb_elems else None
    branches = []
    for name, l, lif in neuron_branches(model):
        if lif.spike_steps and lif.spike_counts is not None:
            per_neuron = lif.spike_counts.double().cpu() / lif.spike_steps
            rate = float(per_neuron.mean())
        else:
            per_neuron, rate = None, None
        branches.append({"branch": name, "layer": l, "rate": rate, "steps": lif.spike_steps,
                         "per_neuron": per_neuron})
    return {"emb": emb, "branches": branches}


def firing_rates(model, prefix: str = "") -> dict:
    """Flat ``{prefix+key: rate}`` for logging (keys ``emb``, ``att.{l}``, ``ffn.{l}``, ``att``,
    ``ffn``, ``all``), from what was recorded; ``{}`` when nothing was (or the model does not spike)."""
    stats = spike_stats(model)
    out = {}
    if stats["emb"] is not None:
        out["emb"] = stats["emb"]
    means = {"att": [], "ffn": []}
    for b in stats["branches"]:
        if b["rate"] is not None:
            out[f"{b['branch']}.{b['layer']}"] = b["rate"]
            means[b["branch"]].append(b["rate"])
    for name, rates in means.items():
        if rates:
            out[name] = sum(rates) / len(rates)
    if means["att"] or means["ffn"]:
        allr = means["att"] + means["ffn"]
        out["all"] = sum(allr) / len(allr)
    return {prefix + k: v for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Rates as the operation counts take them.
# --------------------------------------------------------------------------------------------------
@dataclass
class SpikeRates:
    """Measured rates: ``emb`` fraction of ones of the binary embedding (None if not binary);
    ``att[l]``, ``ffn[l]`` the LIF firing rates (None for a non-spiking model)."""

    emb: float | None
    att: list | None = None
    ffn: list | None = None

    @classmethod
    def from_model(cls, model) -> "SpikeRates":
        stats = spike_stats(model)
        att = [b["rate"] for b in stats["branches"] if b["branch"] == "att"]
        ffn = [b["rate"] for b in stats["branches"] if b["branch"] == "ffn"]
        spiking = unwrap(model).config.spiking
        return cls(emb=stats["emb"], att=att if spiking else None, ffn=ffn if spiking else None)
