"""The two sequence operations of SpikeGPT and the seam that dispatches them.

``wkv`` is the RWKV-4 weighted key-value scan and ``lif`` the multi-step leaky integrate-and-fire
neuron (``DESIGN.md`` §1).  Both run along dim 1 of (B, T, C) tensors.  This module holds their plain
PyTorch references, which are the CPU implementation, and dispatches to the Triton kernels of
``spikegpt.kernels`` on CUDA tensors:

* ``backend="auto"`` (default): Triton on CUDA tensors when Triton is importable, the fused C++ ops
  of ``spikegpt.cpu`` on CPU tensors where they build (WKV calls of two or more tokens), reference
  otherwise;
* ``"triton"``: always Triton (an error if it cannot run);
* ``"torch"``: always the reference.

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

import torch

EMPTY_EXP = -1e38
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
def empty_wkv_state(batch: int, channels: int, device=None):
    """The state before the first token: ``p = q = 0``, ``o = EMPTY_EXP`` (fp32, shape (B, C))."""
    zeros = torch.zeros(batch, channels, dtype=torch.float32, device=device)
    return zeros, zeros.clone(), torch.full_like(zeros, EMPTY_EXP)


def wkv_torch(w, u, k, v, state=None, chunk: int = 32):
    """Reference WKV (DESIGN §1), differentiable by autograd in every input, the state included.

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
# LIF reference.
# --------------------------------------------------------------------------------------------------
class _LIF(torch.autograd.Function):
    """Multi-step LIF with hard reset to 0, reset not detached (DESIGN §1).

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


def triton_available() -> bool:
    try:
        from . import kernels  # noqa: F401  (spikegpt.kernels, installed from kernels/)
    except ImportError:
        return False
    return True


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    backend = backend or _backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' was requested but Triton is not importable; "
                               "install triton (Linux) or use --kernels torch")
        return True
    return x.is_cuda and triton_available()


def _use_cpu_fused(x: torch.Tensor, backend: str | None) -> bool:
    """``"auto"`` on CPU tensors: the fused C++ ops of :mod:`spikegpt.cpu`, wherever they build."""
    from . import cpu
    return (backend or _backend) == "auto" and cpu.supports(x)


def wkv(w, u, k, v, state=None, backend: str | None = None):
    """WKV over dim 1 of ``k, v`` (B, T, C); see :func:`wkv_torch`.  Returns ``(y, (p, q, o))``.
    One-token calls keep the reference's arithmetic, which the recurrent decoder mirrors bitwise."""
    if _use_triton(k, backend):
        from . import kernels
        return kernels.wkv(w, u, k, v, state)
    if k.shape[1] > 1 and _use_cpu_fused(k, backend):
        from . import cpu
        return cpu.wkv(w, u, k, v, state)
    return wkv_torch(w, u, k, v, state)


def lif(x, v0=None, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 2.0,
        backend: str | None = None):
    """Multi-step LIF over dim 1 of ``x`` (B, T, C); see :func:`lif_torch`.  Returns
    ``(spikes, v_last)``."""
    if _use_triton(x, backend):
        from . import kernels
        return kernels.lif(x, v0, tau, v_threshold, alpha)
    if _use_cpu_fused(x, backend):
        from . import cpu
        return cpu.lif(x, v0, tau, v_threshold, alpha)
    return lif_torch(x, v0, tau, v_threshold, alpha)
