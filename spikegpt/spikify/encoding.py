"""Spike encoding of a linear layer's input (SpikeLLM's multi-step neurons, with exact integer ranges).

A channel value ``x`` is quantized asymmetrically to an integer ``q`` in ``[0, Q]`` with a step size
(threshold) ``delta`` and an offset ``lo``::

    q = clamp(round((x - lo) / delta), 0, Q)        x_hat = lo + delta * q

and ``q`` is sent as a spike train: a multi-level integrate-and-fire neuron integrates ``q`` and
over ``S`` time steps fires ``c_t = clamp(q - t M, 0, M)`` spikes at step ``t`` (at most ``M`` per
step), so ``sum_t c_t = q`` and ``delta * sum_t c_t + lo`` is exactly ``x_hat``.

An ordinary channel has ``b`` bits and one step: ``Q = 2^b - 1``, ``S = 1``, ``M = Q`` (2^b levels
per step).  A salient channel has ``b + a`` bits over ``S = 2^a`` steps: ``Q = 2^(b+a) - 1``, which
``2^a`` steps of ``2^b - 1`` spikes cannot reach (``2^a (2^b - 1) < Q`` for ``a >= 1``: the top
integers would be lost), so each step carries up to ``M = ceil(Q / S) = 2^b`` spikes
(:func:`per_step_max`).  Salient channels may instead be kept real-valued (``steps = 0``: the
full-precision upper bound).

Ranges (``lo``, ``delta``):

* ``token-minmax`` (SpikeLLM): per token, separately for the ordinary and the salient channels,
  ``lo = min_c x``, ``delta = (max_c x - lo) / Q`` over the channels of the group;
* ``channel-static``: per channel, fixed from calibration data (``lo`` = the smallest value seen,
  ``delta`` = range / Q); values outside saturate at 0 or Q.  ``W x_hat = W lo + (W diag(delta)) q``:
  a constant plus spike-driven accumulates, as in a real SNN.

:class:`InputEncoder` holds a layer's encoding as buffers (``salient`` bool, ``steps`` int,
``qmax`` float, and for ``channel-static`` ``lo`` and ``delta``); it is the identity with no buffers
until :meth:`InputEncoder.configure` is called, so unconverted checkpoints are unchanged, and a
converted state dict re-creates the buffers when it is loaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import List

import torch
import torch.nn as nn

ENCODINGS = ("token-minmax", "channel-static")
SALIENCY_METHODS = ("spikellm", "hessian", "taylor", "maxabs", "random")
_BUFFERS = ("salient", "steps", "qmax", "lo", "delta")


@dataclass(frozen=True)
class SpikifyConfig:
    """How a model's linear inputs were spike-encoded (recorded in the checkpoint as plain data)."""
    bits: int = 4
    salient_frac: float = 0.1
    extra_steps: int = 1
    saliency: str = "spikellm"
    encoding: str = "token-minmax"
    salient_full_precision: bool = False
    calib_tokens: int = 8192
    finetune_iters: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.bits < 1 or self.extra_steps < 0 or not 0 <= self.salient_frac <= 1:
            raise ValueError(f"bits >= 1, extra_steps >= 0 and salient_frac in [0, 1] required: {self}")
        if self.saliency not in SALIENCY_METHODS or self.encoding not in ENCODINGS:
            raise ValueError(f"saliency in {SALIENCY_METHODS}, encoding in {ENCODINGS} required: {self}")

    @property
    def avg_bits(self) -> float:
        """Average bits per activation, ``b + p a``."""
        return self.bits + self.salient_frac * self.extra_steps

    @property
    def avg_steps(self) -> float:
        """Average spike steps per activation, ``1 + p (2^a - 1)``."""
        return 1 + self.salient_frac * (2 ** self.extra_steps - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpikifyConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------------
# The neuron: integers <-> spike counts per step.
# --------------------------------------------------------------------------------------------------
def per_step_max(qmax: int, steps: int) -> int:
    """``M = ceil(Q / S)``: the fewest spikes per step with which ``S`` steps reach every integer up to ``Q``."""
    return -(-qmax // steps)


def spike_train(q: torch.Tensor, steps: int, per_step: int) -> torch.Tensor:
    """Spike counts ``(..., steps)`` of integers ``q``: ``c_t = clamp(q - t M, 0, M)`` (the neuron
    fires as much as it can at each step until its integrated input is spent)."""
    t = torch.arange(steps, device=q.device, dtype=q.dtype)
    return (q[..., None] - t * per_step).clamp(0, per_step)


# --------------------------------------------------------------------------------------------------
# Quantization (used by InputEncoder and by the recurrent decoder: the same ops, so the same rounding).
# --------------------------------------------------------------------------------------------------
def token_range(x: torch.Tensor, salient: torch.Tensor, qmax: torch.Tensor):
    """Per token, per channel group (ordinary / salient), ``lo = min x`` and ``delta = (max x - lo) / Q``,
    broadcast to every channel: ``(lo, delta)`` of ``x``'s shape."""
    inf = float("inf")
    lo_n = x.masked_fill(salient, inf).amin(-1, keepdim=True)
    hi_n = x.masked_fill(salient, -inf).amax(-1, keepdim=True)
    lo_s = x.masked_fill(~salient, inf).amin(-1, keepdim=True)
    hi_s = x.masked_fill(~salient, -inf).amax(-1, keepdim=True)
    lo = torch.where(salient, lo_s, lo_n)
    delta = torch.clamp_min((torch.where(salient, hi_s, hi_n) - lo) / qmax, 1e-30)
    return lo, delta


def quantize(x: torch.Tensor, lo: torch.Tensor, delta: torch.Tensor, qmax: torch.Tensor) -> torch.Tensor:
    """``q = clamp(round((x - lo) / delta), 0, Q)`` (straight-through gradient when ``x``, ``lo`` or
    ``delta`` requires one: used only to fine-tune thresholds)."""
    v = (x - lo) / delta
    q = torch.round(v)
    if v.requires_grad:
        q = v + (q - v).detach()
    return torch.minimum(torch.clamp_min(q, 0.0), qmax)


def encode(x: torch.Tensor, e: List[torch.Tensor]) -> torch.Tensor:
    """``x_hat`` for an encoding ``e = [salient, real, qmax]`` (token-minmax) or ``[salient, real,
    qmax, lo, delta]`` (channel-static); ``real`` marks channels passed through unencoded."""
    if len(e) == 3:
        lo, delta = token_range(x, e[0], e[2])
    else:
        lo, delta = e[3], e[4]
    q = quantize(x, lo, delta, e[2])
    return torch.where(e[1], x, lo + q * delta)


# --------------------------------------------------------------------------------------------------
# The module.
# --------------------------------------------------------------------------------------------------
class InputEncoder(nn.Module):
    """The spike encoding of one linear layer's input; the identity until :meth:`configure`.

    With ``record = True`` each call adds, over the encoded channels of every token, the spikes
    (``spikes``: the sum of the integers) and the steps that carry at least one spike
    (``spike_steps``: ``ceil(q / M)`` per channel) and counts the tokens (``tokens``)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        for name in _BUFFERS:
            self.register_buffer(name, None)
        self.record = False
        self.spikes, self.spike_steps, self.tokens = 0.0, 0.0, 0

    @property
    def active(self) -> bool:
        return self.salient is not None

    @property
    def static(self) -> bool:
        return self.lo is not None

    @torch.no_grad()
    def configure(self, salient: torch.Tensor, bits: int, extra_steps: int, full_precision: bool = False,
                  lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> None:
        """Encode ``b``-bit ordinary channels and ``b + a``-bit salient ones (``salient`` bool (C,)) in
        ``2^a`` steps, or salient ones real-valued with ``full_precision``; ``lo``/``hi`` (C,) fix the
        ranges per channel (channel-static), otherwise they are taken per token (token-minmax)."""
        salient = salient.to(torch.bool).reshape(-1)
        if salient.numel() != self.in_features:
            raise ValueError(f"salient mask has {salient.numel()} channels, the layer {self.in_features}")
        device = salient.device
        qmax_n, qmax_s = 2 ** bits - 1, 2 ** (bits + extra_steps) - 1
        self.salient = salient
        self.steps = torch.where(salient, torch.tensor(0 if full_precision else 2 ** extra_steps, device=device),
                                 torch.tensor(1, device=device)).long()
        self.qmax = torch.where(salient, float(qmax_s), float(qmax_n)).float()
        if lo is not None:
            self.lo = lo.reshape(-1).float().clone()
            self.delta = torch.clamp_min((hi.reshape(-1).float() - self.lo) / self.qmax, 1e-30)
        else:
            self.lo = self.delta = None

    def encoding(self) -> List[torch.Tensor]:
        """The tensors :func:`encode` takes (empty for the identity)."""
        if not self.active:
            return []
        e = [self.salient, self.steps == 0, self.qmax]
        return e + [self.lo, self.delta] if self.static else e

    def forward(self, x):
        if not self.active:
            return x
        e = [t.to(x.dtype) if t.is_floating_point() else t for t in self.encoding()]
        y = encode(x, e)
        if self.record:
            self._record(x, e)
        return y

    @torch.no_grad()
    def _record(self, x, e):
        lo, delta = token_range(x, e[0], e[2]) if len(e) == 3 else (e[3], e[4])
        q = quantize(x, lo, delta, e[2]).masked_fill(e[1], 0.0)
        per_step = torch.where(self.steps > 0, torch.ceil(self.qmax / self.steps.clamp_min(1)), 1.0)
        self.spikes += float(q.sum())
        self.spike_steps += float(torch.ceil(q / per_step).sum())
        self.tokens += x.numel() // x.shape[-1]

    def clear(self) -> None:
        """Back to the identity (no encoding buffers)."""
        for name in _BUFFERS:
            setattr(self, name, None)

    def reset_record(self) -> None:
        self.spikes, self.spike_steps, self.tokens = 0.0, 0.0, 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A converted checkpoint carries the encoding: create the buffers it holds before loading them.
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        if not self.active:
            return "identity"
        n_s = int(self.salient.sum())
        return f"{'channel-static' if self.static else 'token-minmax'}, {n_s}/{self.in_features} salient"
