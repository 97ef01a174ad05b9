"""Triton multi-level GIF neuron (SpikeLLM), generalising the LIF kernel of ``lif.py``.

Same layout and schedule as the LIF kernel: ``x`` (B, T, C), fp32 or bf16, time on dim 1; one program
per (batch row, block of ``BLOCK_C`` channels); time in chunks of ``CH`` unrolled steps; the fp32
membrane before every chunk is saved, and the backward sweep recomputes each chunk's membranes from it.
The equations are those of ``spikegpt.ops.gif_torch`` (see ``_GIF`` there):

* forward: ``h_t = v_{t-1} + (x_t - v_{t-1}) / tau``, ``s_t = clip(floor(h_t / theta), 0, L)`` (or
  ``sign(h_t) min(floor(|h_t| / theta), L)``, the quotient rounded to nearest), output ``theta s_t``,
  ``v_t`` by the reset (``RESET`` 0 hard, 1 soft, 2 zero);
* backward: ``g_t = theta gy_t ds/dh + c_t dv/dh``, ``gx_t = g_t / tau``, ``c_{t-1} = g_t (1 - 1/tau)``,
  and per program the partial sum of ``gy_t s_t + theta gy_t ds/dtheta + c_t dv/dtheta`` over its
  steps and channels, written to a (B, n_blocks) buffer that the host reduces with ``torch.sum``:
  no atomics, so the threshold gradient is bitwise reproducible.

``theta`` is read from a 0-d fp32 tensor, so a learnable threshold needs no host sync.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .lif import _lif_charge
from .wkv import CHUNK, _block_c, _grid

HALF_PI = math.pi / 2
RESET_CODES = {"hard": 0, "soft": 1, "zero": 2}


@triton.jit
def _levels(h, theta, LEVELS: tl.constexpr, BIPOLAR: tl.constexpr):
    """The spike count of ``h`` (as ``ops.gif_levels``)."""
    if BIPOLAR:
        q = tl.minimum(tl.floor(tl.math.div_rn(tl.abs(h), theta)), LEVELS)
        return tl.where(h < 0, -q, q)
    return tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(h, theta)), 0.0), LEVELS)


@triton.jit
def _next_v(h, s, theta, RESET: tl.constexpr):
    if RESET == 0:
        return tl.where(s != 0, 0.0, h)
    if RESET == 1:
        return h - theta * s
    return h * 0.0


@triton.jit
def _bump(z, alpha, HALF_PI: tl.constexpr):
    """The arctan surrogate's slope at ``z`` (``ops.atan_surrogate_grad``)."""
    a = HALF_PI * alpha * z
    return (alpha * 0.5) / (1.0 + a * a)


@triton.jit
def _gif_fwd_kernel(x_ptr, v0_ptr, th_ptr, y_ptr, vl_ptr, ck_ptr, T, C, NCH, tau,
                    LEVELS: tl.constexpr, BIPOLAR: tl.constexpr, RESET: tl.constexpr,
                    CH: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    sb = b * C + cs
    theta = tl.load(th_ptr)
    v = tl.load(v0_ptr + sb, mask=cm, other=0.0).to(tl.float32)
    base = b * T * C + cs
    for ci in range(0, NCH):
        t0 = ci * CH
        tl.store(ck_ptr + (b * NCH + ci) * C + cs, v, mask=cm)
        for j in tl.static_range(CH):
            m, off, h = _lif_charge(x_ptr, v, base, t0 + j, T, C, cm, tau, BLOCK_C)
            s = _levels(h, theta, LEVELS, BIPOLAR)
            tl.store(y_ptr + off, (theta * s).to(y_ptr.dtype.element_ty), mask=m)
            v = tl.where(m, _next_v(h, s, theta, RESET), v)
    tl.store(vl_ptr + sb, v.to(vl_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _gif_bwd_kernel(x_ptr, ck_ptr, th_ptr, gy_ptr, gvl_ptr, gx_ptr, gv0_ptr, gth_ptr, T, C, NCH, tau, alpha,
                    LEVELS: tl.constexpr, BIPOLAR: tl.constexpr, RESET: tl.constexpr, STE: tl.constexpr,
                    CH: tl.constexpr, BLOCK_C: tl.constexpr, HALF_PI: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    sb = b * C + cs
    base = b * T * C + cs
    theta = tl.load(th_ptr)
    c = tl.load(gvl_ptr + sb, mask=cm, other=0.0).to(tl.float32)  # dL/dv after the last step
    gth = tl.zeros([BLOCK_C], tl.float32)
    rows = tl.arange(0, CH)[:, None]
    keep = 1.0 - 1.0 / tau
    for ci in range(0, NCH):
        cidx = NCH - 1 - ci
        t0 = cidx * CH
        v = tl.load(ck_ptr + (b * NCH + cidx) * C + cs, mask=cm, other=0.0)
        H = tl.zeros([CH, BLOCK_C], tl.float32)
        for j in tl.static_range(CH):
            _, _, h = _lif_charge(x_ptr, v, base, t0 + j, T, C, cm, tau, BLOCK_C)
            H = tl.where(rows == j, h[None, :], H)
            v = _next_v(h, _levels(h, theta, LEVELS, BIPOLAR), theta, RESET)
        for jr in tl.static_range(CH):
            j = CH - 1 - jr
            t = t0 + j
            m = cm & ((tl.zeros([BLOCK_C], tl.int32) + t) < T)
            off = base + t.to(tl.int64) * C
            h = tl.sum(tl.where(rows == j, H, 0.0), axis=0)
            s = _levels(h, theta, LEVELS, BIPOLAR)
            gy = tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
            # ds/dh, ds/dtheta and, for the hard reset, dF/dh, dF/dtheta (F = 1[s != 0]).
            if STE:
                a = h
                sgn = h * 0.0 + 1.0
                if BIPOLAR:
                    a = tl.abs(h)
                    sgn = tl.where(h < 0, -1.0, tl.where(h > 0, 1.0, 0.0))
                inside = tl.where((a < (LEVELS + 1) * theta) & (a >= 0), 1.0, 0.0)
                ds_dh = inside / theta
                ds_dth = -inside * h / (theta * theta)
                inside1 = tl.where((a < 2 * theta) & (a >= 0), 1.0, 0.0)
                dF_dh = inside1 * sgn / theta
                dF_dth = -inside1 * a / (theta * theta)
            else:
                up = _bump(h - theta, alpha, HALF_PI)
                ds_dh = up
                ds_dth = -up
                for k in tl.static_range(2, LEVELS + 1):
                    sg = _bump(h - k * theta, alpha, HALF_PI)
                    ds_dh = ds_dh + sg
                    ds_dth = ds_dth - k * sg
                dF_dh = up
                dF_dth = -up
                if BIPOLAR:
                    down = _bump(h + theta, alpha, HALF_PI)
                    dF_dh = up - down
                    dF_dth = -(up + down)
                    for k in tl.static_range(1, LEVELS + 1):
                        sg = _bump(h + k * theta, alpha, HALF_PI)
                        ds_dh = ds_dh + sg
                        ds_dth = ds_dth + k * sg
            if RESET == 0:
                dv_dh = 1.0 - tl.where(s != 0, 1.0, 0.0) - h * dF_dh
                dv_dth = -h * dF_dth
            elif RESET == 1:
                dv_dh = 1.0 - theta * ds_dh
                dv_dth = -s - theta * ds_dth
            else:
                dv_dh = h * 0.0
                dv_dth = h * 0.0
            gs = gy * theta
            g = gs * ds_dh + c * dv_dh
            gth += tl.where(m, gy * s + gs * ds_dth + c * dv_dth, 0.0)
            tl.store(gx_ptr + off, (g / tau).to(gx_ptr.dtype.element_ty), mask=m)
            c = tl.where(m, g * keep, c)
    tl.store(gv0_ptr + sb, c.to(gv0_ptr.dtype.element_ty), mask=cm)
    tl.store(gth_ptr + b * tl.num_programs(1) + cb, tl.sum(gth, axis=0))


def _consts(levels, bipolar, reset):
    return dict(LEVELS=int(levels), BIPOLAR=bool(bipolar), RESET=RESET_CODES[reset])


@torch.library.custom_op("spikegpt::gif_forward", mutates_args=())
def gif_forward(x: torch.Tensor, v0: torch.Tensor, theta: torch.Tensor, tau: float, levels: int, bipolar: bool,
                reset: str, surrogate: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``y, v_last, checkpoints`` (checkpoints: (B, ceil(T/CHUNK), C) fp32)."""
    B, T, C = x.shape
    nch = triton.cdiv(T, CHUNK)
    y = torch.empty_like(x)
    vl = torch.empty_like(v0)
    ck = torch.empty(B, nch, C, dtype=torch.float32, device=x.device)
    _gif_fwd_kernel[_grid(B, C)](x, v0, theta, y, vl, ck, T, C, nch, float(tau), **_consts(levels, bipolar, reset),
                                 CH=CHUNK, BLOCK_C=_block_c(C), num_warps=2)
    return y, vl, ck


@gif_forward.register_fake
def _(x, v0, theta, tau, levels, bipolar, reset, surrogate, alpha):
    B, T, C = x.shape
    nch = (T + CHUNK - 1) // CHUNK
    return torch.empty_like(x), torch.empty_like(v0), x.new_empty(B, nch, C, dtype=torch.float32)


@torch.library.custom_op("spikegpt::gif_backward", mutates_args=())
def gif_backward(x: torch.Tensor, ck: torch.Tensor, theta: torch.Tensor, gy: torch.Tensor, gvl: torch.Tensor,
                 v0: torch.Tensor, tau: float, levels: int, bipolar: bool, reset: str, surrogate: str, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``gx`` (x's dtype), ``gv0`` (v0's dtype) and ``gtheta`` (0-d fp32)."""
    B, T, C = x.shape
    gx = torch.empty_like(x)
    gv0 = torch.empty_like(v0)
    grid = _grid(B, C)
    partial = torch.empty(grid, dtype=torch.float32, device=x.device)
    _gif_bwd_kernel[grid](x, ck, theta, gy, gvl, gx, gv0, partial, T, C, ck.shape[1], float(tau), float(alpha),
                          **_consts(levels, bipolar, reset), STE=surrogate == "ste", CH=CHUNK,
                          BLOCK_C=_block_c(C), HALF_PI=HALF_PI, num_warps=2)
    return gx, gv0, partial.sum()


@gif_backward.register_fake
def _(x, ck, theta, gy, gvl, v0, tau, levels, bipolar, reset, surrogate, alpha):
    return torch.empty_like(x), torch.empty_like(v0), x.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, v0, theta, *consts = inputs
    ctx.save_for_backward(x, v0, theta, output[2])
    ctx.consts = consts
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, gy, gvl, gck):
    x, v0, theta, ck = ctx.saved_tensors
    gy = torch.zeros_like(x) if gy is None else gy.contiguous()
    gvl = torch.zeros_like(v0) if gvl is None else gvl.contiguous()
    gx, gv0, gth = gif_backward(x, ck, theta, gy, gvl, v0, *ctx.consts)
    return gx, gv0, gth, None, None, None, None, None, None


gif_forward.register_autograd(_backward, setup_context=_setup_context)


def gif(x, v0=None, theta=1.0, tau: float = 2.0, levels: int = 1, bipolar: bool = False, reset: str = "hard",
        surrogate: str = "atan", alpha: float = 2.0):
    """Multi-step GIF over dim 1 of ``x`` (B, T, C) with Triton; returns ``(y, v_last)``, ``y = theta s``.

    Same contract as :func:`spikegpt.ops.gif_torch`: ``theta`` a float or a 0-d tensor (differentiable,
    used as fp32), ``v0`` (B, C) the membrane before the first step (fp32 zeros when None); ``y`` in x's
    dtype, ``v_last`` in v0's dtype.  Differentiable in ``x``, ``v0`` and ``theta``.
    """
    from spikegpt.ops import _check_gif
    _check_gif(levels, reset, surrogate)
    B, T, C = x.shape
    if v0 is None:
        v0 = torch.zeros(B, C, dtype=torch.float32, device=x.device)
    if not torch.is_tensor(theta):
        theta = torch.tensor(float(theta), dtype=torch.float32, device=x.device)
    if T == 0:
        return torch.empty_like(x), v0.clone()
    return gif_forward(x.contiguous(), v0.contiguous(), theta.float().reshape(()), float(tau), int(levels),
                       bool(bipolar), reset, surrogate, float(alpha))[:2]
