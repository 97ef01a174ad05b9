"""The two sequence operations of SpikeGPT and the seam that dispatches them.

``wkv`` is the RWKV-4 weighted key-value scan and ``lif`` the multi-step leaky integrate-and-fire
neuron (``docs/model.md`` §2-3).  Both run along dim 1 of (B, T, C) tensors.  This module holds their plain
PyTorch references, which are the CPU implementation, and dispatches to the Triton kernels of
``spikegpt.kernels`` on CUDA tensors:

* ``backend="auto"`` (default): Triton on CUDA tensors when Triton is importable, the fused C++ ops
  of ``spikegpt.cpu`` on CPU tensors where they build (WKV calls of two or more tokens), reference
  otherwise;
* ``"triton"``: always Triton (an error if it cannot run);
* ``"torch"``: always the reference.

The same seam carries the model's elementwise pieces that the fused CPU path runs in one native pass
each (fp32/fp64 CPU tensors under ``"auto"``): the token-shift mixes (``token_shift_mix``), the
channel mixer's squared ReLU (``relu_square``) and the receptance gate's backward (``sigmoid_gate``);
elsewhere they run their reference expressions.

Select it per call (``backend=``), process-wide (:func:`set_backend`) or for a block of code
(:func:`use_backend`).

WKV state.  A WKV state is a tuple ``(p, q, o)`` of fp32 tensors of shape (B, C) describing the
numerator ``p * exp(o)`` and denominator ``q * exp(o)`` accumulated over the tokens seen so far; ``o``
is a log-scale that keeps ``p`` and ``q`` in range.  The empty state is ``p = q = 0, o = EMPTY_EXP``
(a large negative finite number: ``-inf - -inf`` would be NaN).  Two states with the same
``p * exp(o)`` and ``q * exp(o)`` are the same state, whatever their scales.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch

from .errors import UserError
from .state import EMPTY_EXP, empty_wkv_state  # noqa: F401  (part of this module's API)

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


# --------------------------------------------------------------------------------------------------
# The spike function: Heaviside forward, arctan surrogate backward.
# --------------------------------------------------------------------------------------------------
def atan_surrogate_grad(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/dz of the arctan surrogate ``arctan(pi/2 * alpha * z) / pi + 1/2``."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * z) ** 2)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, alpha):
        ctx.save_for_backward(z)
        ctx.alpha = alpha
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * atan_surrogate_grad(z, ctx.alpha), None


def spike(z: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """``H(z) = 1[z >= 0]`` with the arctan surrogate gradient of width ``alpha``."""
    return _Spike.apply(z, alpha)


# --------------------------------------------------------------------------------------------------
# WKV reference.
# --------------------------------------------------------------------------------------------------
def wkv_torch(w, u, k, v, state=None, chunk: int = 32):
    """Reference WKV (docs/model.md §2), differentiable by autograd in every input, the state included.

    ``y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} +
    e^{u+k_t})``, with the initial state acting as a token before ``t = 0``; ``w`` and ``u`` have
    shape (C,), ``k`` and ``v`` (B, T, C) of any T.  Returns ``y`` (dtype of ``k``) and the final
    state ``(p, q, o)`` (fp32; fp64 for fp64 input).

    The time axis is cut into chunks; inside a chunk the sums over past tokens are one batched matrix
    product with the per-channel decay matrix ``A[c, j, i] = e^{(j-1-i) w_c}`` (``i < j``), and the
    state is carried from chunk to chunk.  Exponentials are taken relative to the chunk's largest
    exponent ``K`` (the state's included), so nothing overflows, and the state is renormalised to
    ``q = 1`` after every chunk.  The math runs in fp32 (fp64 for fp64 input); in the rare case that
    a row's every term underflows (``k`` spanning more than ~70 nats within a chunk), the call is
    recomputed in fp64 one token per chunk, where the current token's term is always in range.
    """
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    if state is None:
        state = empty_wkv_state(k.shape[0], k.shape[2], k.device)
    if k.shape[1] == 0:
        return torch.empty_like(k), tuple(s.to(compute) for s in state)
    y, new_state, den_min = _wkv_chunked(w, u, k, v, state, chunk, compute)
    if den_min < _WKV_TINY[compute]:
        y, new_state, _ = _wkv_chunked(w, u, k, v, state, 1, torch.float64)
    return y.to(k.dtype), tuple(s.to(compute) for s in new_state)


_WKV_TINY = {torch.float32: 1e-30, torch.float64: 1e-290}


def _wkv_chunked(w, u, k, v, state, chunk, compute):
    B, T, C = k.shape
    # Work in a (C, T, B) layout so that the per-channel matrix products see contiguous operands.
    w, u = w.to(compute), u.to(compute)
    k = k.to(compute).permute(2, 1, 0).contiguous()
    v = v.to(compute).permute(2, 1, 0).contiguous()
    p, q, o = (s.to(compute).T for s in state)  # (C, B)

    L = max(1, min(chunk, T))
    steps = torch.arange(L + 1, device=k.device, dtype=compute)
    lag = steps[:, None] - 1 - steps[None, :L]  # (L+1, L): j - 1 - i
    decay = torch.exp(lag.clamp(min=0) * w[:, None, None]) * (lag >= 0)  # (C, L+1, L)
    state_decay = torch.exp(steps * w[:, None])[:, :, None]  # (C, L+1, 1): e^{j w}
    eu = torch.exp(u)[:, None, None]

    ys, den_mins = [], []
    for t0 in range(0, T, L):
        kc, vc = k[:, t0:t0 + L], v[:, t0:t0 + L]  # (C, n, B)
        n = kc.shape[1]
        K = torch.maximum(kc.amax(dim=1), o).detach()  # (C, B): this chunk's scale
        ek = torch.exp(kc - K[:, None])  # <= 1
        es = torch.exp(o - K)  # the carried state rescaled to K
        # Sums over past tokens for rows j = 0..n (row n is the state after the chunk).
        past = torch.bmm(decay[:, :n + 1, :n], torch.cat([ek * vc, ek], dim=2))
        past = past + state_decay[:, :n + 1] * torch.cat([p * es, q * es], dim=1)[:, None]
        num, den = past[..., :B], past[..., B:]
        now = eu * ek
        den_now = den[:, :n] + now
        ys.append((num[:, :n] + now * vc) / den_now)
        den_mins += [den_now.detach().amin(), den[:, n].detach().amin()]
        q_end = den[:, n].clamp_min(torch.finfo(compute).tiny)
        p, q, o = num[:, n] / q_end, torch.ones_like(q_end), K + torch.log(q_end)
    y = torch.cat(ys, dim=1).permute(2, 1, 0)
    return y, (p.T, q.T, o.T), float(torch.stack(den_mins).amin())  # one device sync per call


# --------------------------------------------------------------------------------------------------
# Token shift, the token-shift mixes, the squared ReLU and the receptance gate.
# --------------------------------------------------------------------------------------------------
def token_shift(z, last):
    """``zs[t] = z[t-1]``, with ``last`` (B, C) standing in for ``z[-1]``."""
    return torch.cat([last[:, None].to(z.dtype), z[:, :-1]], dim=1)


def token_shift_mix_torch(z, last, mus):
    """Reference token-shift mixes (docs/model.md §1): ``z * mu + zs * (1 - mu)`` for each ``mu`` of
    ``mus`` (each broadcasting against ``z``), with ``zs = token_shift(z, last)``."""
    zs = token_shift(z, last)
    return [z * mu + zs * (1 - mu) for mu in mus]


def relu_square_torch(x):
    """Reference squared ReLU of the channel mixer's key, ``relu(x)^2``."""
    return torch.square(torch.relu(x))


def sigmoid_gate_torch(a, y):
    """Reference receptance gate, ``sigmoid(a) * y``."""
    return torch.sigmoid(a) * y


# --------------------------------------------------------------------------------------------------
# LIF reference.
# --------------------------------------------------------------------------------------------------
class _LIF(torch.autograd.Function):
    """Multi-step LIF with hard reset to 0, reset not detached (docs/model.md §3).

    Forward, per neuron: ``h_t = v_{t-1} + (x_t - v_{t-1}) / tau``, ``s_t = H(h_t - v_th)``,
    ``v_t = h_t (1 - s_t)``.  Backward, with ``g_t = dL/dh_t`` and ``sg_t`` the surrogate slope at
    ``h_t - v_th``: ``g_t = dL/ds_t sg_t + dL/dv_t (1 - s_t - h_t sg_t)``,
    ``dL/dv_{t-1} = g_t (1 - 1/tau)``, ``dL/dx_t = g_t / tau``.  Saves ``h`` (fp32, or fp64 for fp64 input) for backward.
    """

    @staticmethod
    def forward(ctx, x, v0, tau, v_threshold, alpha):
        B, T, C = x.shape
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(compute)
        h = torch.empty(B, T, C, dtype=compute, device=x.device)
        fired = torch.empty(B, T, C, dtype=torch.bool, device=x.device)
        v = v0.to(compute)
        for t in range(T):
            torch.add(v, (xf[:, t] - v) / tau, out=h[:, t])
            torch.ge(h[:, t], v_threshold, out=fired[:, t])
            v = h[:, t].masked_fill(fired[:, t], 0.0)
        ctx.save_for_backward(h)
        ctx.consts = (tau, v_threshold, alpha, x.dtype, v0.dtype)
        return fired.to(x.dtype), v.to(v0.dtype)

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_last):
        (h,) = ctx.saved_tensors
        tau, v_threshold, alpha, x_dtype, v_dtype = ctx.consts
        T = h.shape[1]
        sg = atan_surrogate_grad(h - v_threshold, alpha)
        dv_dh = 1 - (h >= v_threshold).to(h.dtype) - h * sg
        from_spike = grad_spikes.to(h.dtype) * sg
        carry = dv_dh * (1 - 1 / tau)  # dL/dh_t += dL/dh_{t+1} * carry_t
        g = torch.empty_like(h)
        torch.addcmul(from_spike[:, T - 1], grad_v_last.to(h.dtype), dv_dh[:, T - 1], out=g[:, T - 1])
        for t in range(T - 2, -1, -1):
            torch.addcmul(from_spike[:, t], g[:, t + 1], carry[:, t], out=g[:, t])
        grad_x = (g / tau).to(x_dtype)
        grad_v0 = (g[:, 0] * (1 - 1 / tau)).to(v_dtype)
        return grad_x, grad_v0, None, None, None


def lif_torch(x, v0=None, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 2.0):
    """Reference multi-step LIF over dim 1 of ``x`` (B, T, C); returns ``(spikes, v_last)``.

    ``v0`` is the membrane before the first step (zeros when None).  Spikes are exactly 0 or 1 in
    ``x``'s dtype; the membrane is computed in fp32 (fp64 for fp64 input).
    """
    if v0 is None:
        v0 = torch.zeros(x.shape[0], x.shape[2], device=x.device,
                         dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return _LIF.apply(x, v0, tau, v_threshold, alpha)


# --------------------------------------------------------------------------------------------------
# GIF reference: multi-level generalized integrate-and-fire (SpikeLLM, arXiv 2407.04752).
# --------------------------------------------------------------------------------------------------
RESETS = ("hard", "soft", "zero")  # "zero": v forced to 0 after every step (the `quant` control)
SURROGATES = ("atan", "ste")


def gif_levels(h, theta, levels: int, bipolar: bool):
    """The spike count of a membrane: ``clip(floor(h / theta), 0, L)`` (unipolar) or
    ``sign(h) min(floor(|h| / theta), L)`` (bipolar), with ``h / theta`` rounded once in h's dtype.

    A membrane exactly at ``k theta`` reaches level k wherever ``k theta / theta`` rounds to k (always
    for a power-of-two theta).  Level 1 fires exactly where the LIF does: ``fl(h / theta) >= 1`` if and
    only if ``h >= theta`` (a quotient below 1 is at most ``1 - 2^-24`` before rounding, in fp32).
    A bipolar zero count keeps the sign of ``h`` (``-0.0``), which every use treats as 0.
    """
    if bipolar:
        return torch.copysign(torch.floor(h.abs() / theta).clamp_(max=levels), h)
    return torch.floor(h / theta).clamp_(0, levels)


def _atan_bump(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`atan_surrogate_grad` computed in place in ``z`` (a fresh tensor), rounding the same:
    ``c / (1 + (a z)^2)`` is ``reciprocal(1 + (a z)^2) * c`` in PyTorch either way."""
    return z.mul_(math.pi / 2 * alpha).pow_(2).add_(1).reciprocal_().mul_(alpha / 2)


def _count_surrogate(h, theta, levels: int, bipolar: bool, kind: str, alpha: float, need_theta: bool):
    """``(ds/dh, ds/dtheta, sg1)`` of the surrogate of ``s = gif_levels(h, theta, L)``.

    ``atan``: ``s`` as the sum of steps ``H(h - k theta)`` (minus ``H(-h - k theta)``, bipolar), each
    with the arctan surrogate: ``ds/dh = sum_k sg(h - k theta) [+ sg(h + k theta)]``,
    ``ds/dtheta = -sum_k k sg(h - k theta) [+ k sg(h + k theta)]`` (``sg`` even; at L = 1 unipolar
    this is the LIF's surrogate).  ``ste``: ``s ~ h / theta`` inside the unclipped range
    (``0 <= h < (L + 1) theta``, bipolar ``|h| < (L + 1) theta``), 0 outside.  ``ds/dtheta`` is None
    unless ``need_theta``; ``sg1`` is ``(sg(h - theta), sg(h + theta) or None)`` under ``atan``, the
    first level's bumps, for the hard reset (None under ``ste``).
    """
    if kind == "ste":
        top = (levels + 1) * theta
        inside = (h.abs() < top if bipolar else (h >= 0) & (h < top)).to(h.dtype)
        return inside / theta, -inside * h / (theta * theta) if need_theta else None, None
    up = _atan_bump(h - 1 * theta, alpha)
    ds_dh, ds_dth, down = up, -up if need_theta else None, None
    for sign, k in [(-1, k) for k in range(2, levels + 1)] + [(1, k) for k in range(1, levels + 1) if bipolar]:
        sg = _atan_bump(h + sign * k * theta, alpha)
        down = sg if (sign, k) == (1, 1) else down
        ds_dh = ds_dh + sg
        if need_theta:
            ds_dth = ds_dth.add_(sg, alpha=sign * k)
    return ds_dh, ds_dth, (up, down)


def _fired_surrogate(h, theta, bipolar: bool, kind: str, sg1):
    """``(dF/dh, dF/dtheta)`` of the surrogate of the hard reset's ``F = 1[s != 0]`` (first level):
    ``F = H(h - theta)`` (bipolar ``+ H(-h - theta)``) under ``atan``, from the first level's bumps
    ``sg1``; ``F ~ |h| / theta`` on the one-level unclipped range under ``ste``.  At L = 1 unipolar
    both are those of ``s``."""
    if kind == "ste":
        a = h.abs() if bipolar else h
        inside = ((a < 2 * theta) & (a >= 0)).to(h.dtype)
        return inside * (torch.sign(h) if bipolar else 1) / theta, -inside * a / (theta * theta)
    up, down = sg1
    if not bipolar:
        return up, -up
    return up - down, -(up + down)


class _GIF(torch.autograd.Function):
    """Multi-step GIF over dim 1, reset not detached (the LIF's rules, generalised).

    Forward, per neuron: ``h_t = v_{t-1} + (x_t - v_{t-1}) / tau``, ``s_t = gif_levels(h_t)``,
    ``v_t = h_t (1 - F_t)`` with ``F_t = 1[s_t != 0]`` (hard), ``h_t - theta s_t`` (soft) or 0 (zero);
    output ``y_t = theta s_t``.  Backward, with ``g_t = dL/dh_t``, ``c_t = dL/dv_t`` (``c_{T-1}`` the
    gradient of ``v_last``, ``c_{t-1} = g_t (1 - 1/tau)``) and the surrogate slopes above:
    ``g_t = theta dL/dy_t ds/dh + c_t dv/dh``, ``dL/dx_t = g_t / tau``, ``dL/dv0 = g_0 (1 - 1/tau)``,
    ``dL/dtheta = sum_t dL/dy_t s_t + theta dL/dy_t ds/dtheta + c_t dv/dtheta`` with ``dv/dh = 1 - F - h dF/dh``, ``dv/dtheta = -h dF/dtheta`` (hard), ``dv/dh = 1 - theta ds/dh``,
    ``dv/dtheta = -s - theta ds/dtheta`` (soft).  Saves ``h`` and ``s`` (fp32, fp64 for fp64 input).
    """

    @staticmethod
    def forward(ctx, x, v0, theta, tau, levels, bipolar, reset, surrogate, alpha):
        B, T, C = x.shape
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf, th = x.to(compute), theta.to(compute)
        v = v0.to(compute)
        if reset == "zero":
            prev = torch.cat([v[:, None], torch.zeros_like(xf[:, 1:])], dim=1)
            h = prev + (xf - prev) / tau
            s, v = gif_levels(h, th, levels, bipolar), torch.zeros_like(v)
        elif reset == "hard":  # the loop only needs the fired mask; the levels follow at once
            h = torch.empty(B, T, C, dtype=compute, device=x.device)
            fired = torch.empty(B, T, C, dtype=torch.bool, device=x.device)
            for t in range(T):
                torch.add(v, (xf[:, t] - v) / tau, out=h[:, t])
                torch.ge(h[:, t].abs() if bipolar else h[:, t], th, out=fired[:, t])
                v = h[:, t].masked_fill(fired[:, t], 0.0)
            s = gif_levels(h, th, levels, bipolar)
        else:  # gif_levels and v = h - theta s, step by step, written into place
            h = torch.empty(B, T, C, dtype=compute, device=x.device)
            s = torch.empty_like(h)
            neg_th = -th
            for t in range(T):
                ht, st = h[:, t], s[:, t]
                torch.add(v, (xf[:, t] - v) / tau, out=ht)
                torch.div(ht.abs() if bipolar else ht, th, out=st)
                st.floor_().clamp_(None if bipolar else 0, levels)
                if bipolar:
                    torch.copysign(st, ht, out=st)
                v = torch.addcmul(ht, st, neg_th)
        ctx.save_for_backward(h, s, th)
        ctx.consts = (tau, levels, bipolar, reset, surrogate, alpha, x.dtype, v0.dtype)
        return (th * s).to(x.dtype), v.to(v0.dtype)

    @staticmethod
    def backward(ctx, grad_y, grad_v_last):
        h, s, th = ctx.saved_tensors
        tau, levels, bipolar, reset, surrogate, alpha, x_dtype, v_dtype = ctx.consts
        T = h.shape[1]
        gy = grad_y.to(h.dtype)
        need_theta = ctx.needs_input_grad[2]
        ds_dh, ds_dth, sg1 = _count_surrogate(h, th, levels, bipolar, surrogate, alpha, need_theta)
        gs = gy * th
        from_spike = gs * ds_dh
        grad_th = (gy * s + gs * ds_dth) if need_theta else None
        if reset == "zero":
            g = from_spike
        else:
            if reset == "hard":
                dF_dh, dF_dth = _fired_surrogate(h, th, bipolar, surrogate, sg1)
                dv_dh = 1 - (s != 0).to(h.dtype) - h * dF_dh
                dv_dth = -h * dF_dth if need_theta else None
            else:
                dv_dh = 1 - th * ds_dh
                dv_dth = -s - th * ds_dth if need_theta else None
            carry = dv_dh * (1 - 1 / tau)  # dL/dh_t += dL/dh_{t+1} * carry_t
            gvl = grad_v_last.to(h.dtype)
            g = torch.empty_like(h)
            torch.addcmul(from_spike[:, T - 1], gvl, dv_dh[:, T - 1], out=g[:, T - 1])
            for t in range(T - 2, -1, -1):
                torch.addcmul(from_spike[:, t], g[:, t + 1], carry[:, t], out=g[:, t])
            if need_theta:
                c = torch.cat([g[:, 1:] * (1 - 1 / tau), gvl[:, None]], dim=1)  # dL/dv_t
                grad_th = grad_th + c * dv_dth
        grad_x = (g / tau).to(x_dtype)
        grad_v0 = (g[:, 0] * (1 - 1 / tau)).to(v_dtype)
        return grad_x, grad_v0, grad_th.sum() if need_theta else None, None, None, None, None, None, None


def gif_torch(x, v0=None, theta=1.0, tau: float = 2.0, levels: int = 1, bipolar: bool = False,
              reset: str = "hard", surrogate: str = "atan", alpha: float = 2.0):
    """Reference multi-step GIF over dim 1 of ``x`` (B, T, C); returns ``(y, v_last)``, ``y = theta s``.

    ``theta`` is a float or a 0-d tensor (differentiable); ``levels`` L >= 1; ``reset`` one of
    ``RESETS``; ``surrogate`` one of ``SURROGATES``.  ``v0`` is the membrane before the first step
    (zeros when None).  The membrane is fp32 (fp64 for fp64 input); ``y`` is in x's dtype.  At
    ``levels=1, bipolar=False, reset="hard", surrogate="atan", theta=1`` this is :func:`lif_torch`
    bitwise, forward and backward.
    """
    _check_gif(levels, reset, surrogate)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if v0 is None:
        v0 = torch.zeros(x.shape[0], x.shape[2], device=x.device, dtype=compute)
    if not torch.is_tensor(theta):
        theta = torch.tensor(float(theta), dtype=compute, device=x.device)
    if x.shape[1] == 0:
        return torch.empty_like(x), v0.clone()
    return _GIF.apply(x, v0, theta, tau, levels, bipolar, reset, surrogate, alpha)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` itself, with its gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""
    return _GradScale.apply(x, scale)


def _check_gif(levels, reset, surrogate):
    if int(levels) < 1:
        raise ValueError(f"GIF levels must be >= 1, got {levels}")
    if reset not in RESETS:
        raise ValueError(f"unknown GIF reset {reset!r}; choose one of {RESETS}")
    if surrogate not in SURROGATES:
        raise ValueError(f"unknown GIF surrogate {surrogate!r}; choose one of {SURROGATES}")


# --------------------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------------------
def set_backend(name: str) -> None:
    """Select the implementation process-wide: ``"auto"``, ``"triton"`` or ``"torch"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("torch"): ...`` runs the block with another backend."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


class BackendError(UserError, RuntimeError):
    """A requested kernel backend that cannot run here."""


_kernels_state: tuple | None = None  # (module or None, why it is missing)


def _load_kernels():
    """``spikegpt.kernels`` and, when it cannot be had, why.  In a source checkout that was not
    installed (``pip install -e .`` maps ``kernels/`` to ``spikegpt.kernels``), the checkout's
    ``kernels/`` beside the package is loaded under that name."""
    global _kernels_state
    if _kernels_state is None:
        try:
            from . import kernels
            _kernels_state = (kernels, None)
        except ImportError:
            _kernels_state = _kernels_from_source()
    return _kernels_state


def _kernels_from_source() -> tuple:
    import importlib.util
    import sys

    if importlib.util.find_spec("triton") is None:
        return None, "Triton is not installed (pip install triton, Linux only)"
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if source.is_file():
        spec = importlib.util.spec_from_file_location(f"{__package__}.kernels", source,
                                                      submodule_search_locations=[str(source.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as e:
            del sys.modules[spec.name]
            return None, f"Triton is installed but spikegpt.kernels cannot be imported ({e})"
        return module, None
    return None, "Triton is installed but spikegpt.kernels is not: run pip install -e . in the source checkout"


def triton_available() -> bool:
    return _load_kernels()[0] is not None


def _kernels():
    return _load_kernels()[0]


_warned_fallback = False


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    global _warned_fallback
    backend = backend or _backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return False
    module, why = _load_kernels()
    if backend == "triton":
        if module is None:
            raise BackendError(f"kernel backend 'triton' was requested but {why}; or use --kernels torch")
        return True
    if x.is_cuda and module is None and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"--kernels auto on a CUDA tensor runs the slow PyTorch reference: {why}", stacklevel=3)
    return x.is_cuda and module is not None


def _use_cpu_fused(x: torch.Tensor, backend: str | None) -> bool:
    """``"auto"`` on CPU tensors: the fused C++ ops of :mod:`spikegpt.cpu`, wherever they build."""
    from . import cpu
    return (backend or _backend) == "auto" and cpu.supports(x)


def wkv(w, u, k, v, state=None, backend: str | None = None):
    """WKV over dim 1 of ``k, v`` (B, T, C); see :func:`wkv_torch`.  Returns ``(y, (p, q, o))``.
    One-token calls keep the reference's arithmetic, which the recurrent decoder mirrors bitwise."""
    if _use_triton(k, backend):
        return _kernels().wkv(w, u, k, v, state)
    if k.shape[1] > 1 and _use_cpu_fused(k, backend):
        from . import cpu
        return cpu.wkv(w, u, k, v, state)
    return wkv_torch(w, u, k, v, state)


def token_shift_mix(z, last, mus, backend: str | None = None):
    """The token-shift mixes of one ``z`` (B, T, C), one per ``mu`` of ``mus`` (each (1, 1, C)); see
    :func:`token_shift_mix_torch`.  On fp32/fp64 CPU tensors, one fused pass (bitwise the same values;
    the gradients agree to rounding)."""
    if z.dtype in (torch.float32, torch.float64) and _use_cpu_fused(z, backend):
        from . import cpu
        return list(cpu.token_shift_mix(z, last, torch.stack(mus)).unbind(0))
    return token_shift_mix_torch(z, last, mus)


def relu_square(x, backend: str | None = None):
    """``relu(x)^2``; see :func:`relu_square_torch`.  On fp32/fp64 CPU tensors, one fused pass forward
    and backward (bitwise)."""
    if x.dtype in (torch.float32, torch.float64) and _use_cpu_fused(x, backend):
        from . import cpu
        return cpu.relu_square(x)
    return relu_square_torch(x)


def sigmoid_gate(a, y, backend: str | None = None):
    """``sigmoid(a) * y``; see :func:`sigmoid_gate_torch`.  On fp32/fp64 CPU tensors of one shape, the
    backward is one fused pass (bitwise)."""
    if a.dtype in (torch.float32, torch.float64) and y.dtype == a.dtype and y.shape == a.shape \
            and _use_cpu_fused(a, backend):
        from . import cpu
        return cpu.sigmoid_gate(a, y)
    return sigmoid_gate_torch(a, y)


def lif(x, v0=None, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 2.0,
        backend: str | None = None):
    """Multi-step LIF over dim 1 of ``x`` (B, T, C); see :func:`lif_torch`.  Returns
    ``(spikes, v_last)``."""
    if _use_triton(x, backend):
        return _kernels().lif(x, v0, tau, v_threshold, alpha)
    if _use_cpu_fused(x, backend):
        from . import cpu
        return cpu.lif(x, v0, tau, v_threshold, alpha)
    return lif_torch(x, v0, tau, v_threshold, alpha)


def gif(x, v0=None, theta=1.0, tau: float = 2.0, levels: int = 1, bipolar: bool = False,
        reset: str = "hard", surrogate: str = "atan", alpha: float = 2.0, backend: str | None = None):
    """Multi-step GIF over dim 1 of ``x`` (B, T, C); see :func:`gif_torch`.  Returns ``(y, v_last)``."""
    if _use_triton(x, backend):
        return _kernels().gif(x, v0, theta, tau, levels, bipolar, reset, surrogate, alpha)
    if _use_cpu_fused(x, backend):
        from . import cpu
        return cpu.gif(x, v0, theta, tau, levels, bipolar, reset, surrogate, alpha)
    return gif_torch(x, v0, theta, tau, levels, bipolar, reset, surrogate, alpha)
