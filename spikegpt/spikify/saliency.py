"""Calibration statistics of every linear layer's input, and the per-channel saliency scores.

For a layer ``y = W x`` (``W`` (out, in)) and calibration tokens ``x_t`` (columns of the input), per
input channel ``c``:

===========  ==========================================================================================
``spikellm`` ``| mean_t  x_tc (W^T W x_t)_c |``: channel c's share of the output energy ``||W x||^2``
             (Optimal Brain Spiking); the absolute value of the mean, so that signs cannot cancel later
``hessian``  ``mean_t x_tc^2 * ||W_:c||^2``: the diagonal of the layer-wise Hessian ``W^T W``, weighted
``taylor``   ``| mean_t x_tc dL/dx_tc |``: first-order change of the LM loss when the channel is removed
``maxabs``   ``max_t |x_tc|``
``random``   a seeded random score (the control)
===========  ==========================================================================================

The top ``p`` channels (``round(p * in)``) by score are salient (:func:`salient_mask`).

Fig. 2 of SpikeLLM for our layers: with the element saliency ``e_tc = |x_tc (W^T W x_t)_c|``, the
coefficient of variation across channels (``std_c e_tc / mean_c e_tc``, averaged over tokens) against
the one across tokens (``std_t e_tc / mean_t e_tc``, averaged over channels): salient channels are a
property of the channel when the second is much smaller than the first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoding import SALIENCY_METHODS

__all__ = ["linear_layers", "InputStats", "calibrate", "saliency", "salient_mask", "variation"]


def linear_layers(model) -> list:
    """``[(name, Linear)]`` of every linear layer whose input is spike-encoded, in model order:
    ``blocks.{l}.att.{key,value,receptance,output}``, ``blocks.{l}.ffn.{key,receptance,value}``, ``head``."""
    from ..model import Linear
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]


class InputStats:
    """Running per-channel statistics of one layer's input (float64 sums over tokens)."""

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().double()
        C = w.shape[1]
        self.gram = w.t() @ w  # W^T W
        self.col_norm2 = (w * w).sum(0)
        z = lambda: torch.zeros(C, dtype=torch.float64, device=w.device)
        self.n = 0
        self.sum_x2, self.sum_xgx, self.sum_xgrad = z(), z(), z()
        self.sum_e, self.sum_e2 = z(), z()
        self.lo = torch.full((C,), float("inf"), dtype=torch.float64, device=w.device)
        self.hi = -self.lo.clone()
        self.cov_channels_sum = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        xgx = x * (x @ self.gram)
        e = xgx.abs()
        self.n += x.shape[0]
        self.sum_x2 += (x * x).sum(0)
        self.sum_xgx += xgx.sum(0)
        self.sum_e += e.sum(0)
        self.sum_e2 += (e * e).sum(0)
        self.lo = torch.minimum(self.lo, x.amin(0))
        self.hi = torch.maximum(self.hi, x.amax(0))
        self.cov_channels_sum += float((e.std(1, unbiased=False) / e.mean(1).clamp_min(1e-30)).sum())

    @torch.no_grad()
    def add_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        self.sum_xgrad += (x.detach().double() * g.double()).reshape(-1, x.shape[-1]).sum(0)

    @property
    def maxabs(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())


def calibrate(model, batches, taylor: bool = True) -> dict:
    """``{name: InputStats}`` of every linear layer's input over ``batches`` (token id tensors
    (B, T + 1): inputs and next-token targets), from the zero state; with ``taylor`` also the LM
    loss's gradient (one backward pass per batch; the weights' gradients are discarded)."""
    layers = linear_layers(model)
    stats = {name: InputStats(lin.weight) for name, lin in layers}
    was_training = model.training
    model.eval()

    def hook(name):
        def pre(module, inputs):
            x = inputs[0]
            stats[name].add(x)
            if taylor and x.requires_grad:
                x.register_hook(lambda g: stats[name].add_grad(x, g))
        return pre

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in layers]
    try:
        for batch in batches:
            with torch.set_grad_enabled(taylor):
                logits = model(batch[:, :-1])
                if taylor:
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
                    loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def saliency(stats: InputStats, method: str, seed: int = 0) -> torch.Tensor:
    """The per-channel saliency (float64 (C,)) of one layer by ``method`` (module docstring)."""
    n = max(stats.n, 1)
    if method == "spikellm":
        return (stats.sum_xgx / n).abs()
    if method == "hessian":
        return stats.sum_x2 / n * stats.col_norm2
    if method == "taylor":
        return (stats.sum_xgrad / n).abs()
    if method == "maxabs":
        return stats.maxabs
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(stats.sum_x2.numel(), generator=g, dtype=torch.float64).to(stats.sum_x2.device)
    raise ValueError(f"unknown saliency {method!r}: choose one of {SALIENCY_METHODS}")


def salient_mask(scores: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool (C,): the ``round(frac * C)`` channels of highest score (ties broken by channel order)."""
    k = int(round(frac * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return mask


def variation(stats: InputStats) -> dict:
    """SpikeLLM Fig. 2 for one layer: ``{"cov_channels", "cov_tokens"}`` of the element saliency."""
    n = max(stats.n, 1)
    mean = stats.sum_e / n
    std = (stats.sum_e2 / n - mean * mean).clamp_min(0).sqrt()
    live = mean > 0
    cov_tokens = float((std[live] / mean[live]).mean()) if live.any() else 0.0
    return {"cov_channels": stats.cov_channels_sum / n, "cov_tokens": cov_tokens}
