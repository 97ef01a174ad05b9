"""Triton multi-step LIF neuron (hard reset, arctan surrogate, reset not detached; docs/model.md §3).

``x`` is (B, T, C) in our layout (time on dim 1, no permutes), fp32 or bf16; the membrane is fp32.
One program per (batch row, block of ``BLOCK_C`` channels); time runs in chunks of ``CH`` unrolled
steps so that a chunk's loads are all independent of the recurrence.

* forward: ``h_t = v_{t-1} + (x_t - v_{t-1}) / tau``, ``s_t = H(h_t - v_th)``, ``v_t = h_t (1 - s_t)``;
  writes spikes (exactly 0/1 in x's dtype), ``v_last``, and the fp32 membrane before every chunk.
* backward: reverse sweep over chunks; each chunk's membrane is recomputed from its checkpoint and x
  into a [CH, BLOCK_C] register tile, then ``g_t = gs_t sg_t + c_t (1 - s_t - h_t sg_t)``,
  ``gx_t = g_t / tau``, ``c_{t-1} = g_t (1 - 1/tau)`` run backwards (``c`` = dL/dv, starting at
  the gradient of ``v_last``).

Saved for backward: ``x`` itself (a reference, not a copy) and the membrane checkpoints, 4 / CH bytes
per element (0.25 B at CH = 16) -- against the 4 B/element (fp32 ``h``) the reference saves.
Traffic: forward reads x, writes s; backward reads x, gs (x twice, the second time from cache),
writes gx: the 5 element accesses of docs/model.md §7.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .wkv import CHUNK, _block_c, _grid

HALF_PI = math.pi / 2


@triton.jit
def _lif_charge(x_ptr, v, base, t, T, C, cm, tau, BLOCK_C: tl.constexpr):
    """Mask and offset of step ``t``, and the charged membrane ``h_t = v + (x_t - v) / tau``."""
    m = cm & ((tl.zeros([BLOCK_C], tl.int32) + t) < T)
    off = base + t.to(tl.int64) * C
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    return m, off, v + (x - v) / tau


@triton.jit
def _lif_fwd_kernel(x_ptr, v0_ptr, s_ptr, vl_ptr, ck_ptr, T, C, NCH, tau, v_th,
                    CH: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    sb = b * C + cs
    v = tl.load(v0_ptr + sb, mask=cm, other=0.0).to(tl.float32)
    base = b * T * C + cs
    for ci in range(0, NCH):
        t0 = ci * CH
        tl.store(ck_ptr + (b * NCH + ci) * C + cs, v, mask=cm)
        for j in tl.static_range(CH):
            m, off, h = _lif_charge(x_ptr, v, base, t0 + j, T, C, cm, tau, BLOCK_C)
            fire = h >= v_th
            tl.store(s_ptr + off, tl.where(fire, 1.0, 0.0).to(s_ptr.dtype.element_ty), mask=m)
            v = tl.where(m, tl.where(fire, 0.0, h), v)
    tl.store(vl_ptr + sb, v.to(vl_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _lif_bwd_kernel(x_ptr, ck_ptr, gs_ptr, gvl_ptr, gx_ptr, gv0_ptr, T, C, NCH, tau, v_th, alpha,
                    CH: tl.constexpr, BLOCK_C: tl.constexpr, HALF_PI: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    sb = b * C + cs
    base = b * T * C + cs
    c = tl.load(gvl_ptr + sb, mask=cm, other=0.0).to(tl.float32)  # dL/dv after the last step
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
            v = tl.where(h >= v_th, 0.0, h)
        for jr in tl.static_range(CH):
            j = CH - 1 - jr
            t = t0 + j
            m = cm & ((tl.zeros([BLOCK_C], tl.int32) + t) < T)
            off = base + t.to(tl.int64) * C
            h = tl.sum(tl.where(rows == j, H, 0.0), axis=0)
            gs = tl.load(gs_ptr + off, mask=m, other=0.0).to(tl.float32)
            z = HALF_PI * alpha * (h - v_th)
            sg = (alpha * 0.5) / (1.0 + z * z)
            fired = tl.where(h >= v_th, 1.0, 0.0)
            g = gs * sg + c * (1.0 - fired - h * sg)
            tl.store(gx_ptr + off, (g / tau).to(gx_ptr.dtype.element_ty), mask=m)
            c = tl.where(m, g * keep, c)
    tl.store(gv0_ptr + sb, c.to(gv0_ptr.dtype.element_ty), mask=cm)


@torch.library.custom_op("spikegpt::lif_forward", mutates_args=())
def lif_forward(x: torch.Tensor, v0: torch.Tensor, tau: float, v_threshold: float, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``spikes, v_last, checkpoints`` (checkpoints: (B, ceil(T/CHUNK), C) fp32)."""
    B, T, C = x.shape
    nch = triton.cdiv(T, CHUNK)
    s = torch.empty_like(x)
    vl = torch.empty_like(v0)
    ck = torch.empty(B, nch, C, dtype=torch.float32, device=x.device)
    _lif_fwd_kernel[_grid(B, C)](x, v0, s, vl, ck, T, C, nch, float(tau), float(v_threshold),
                                 CH=CHUNK, BLOCK_C=_block_c(C), num_warps=2)
    return s, vl, ck


@lif_forward.register_fake
def _(x, v0, tau, v_threshold, alpha):
    B, T, C = x.shape
    nch = (T + CHUNK - 1) // CHUNK
    return torch.empty_like(x), torch.empty_like(v0), x.new_empty(B, nch, C, dtype=torch.float32)


@torch.library.custom_op("spikegpt::lif_backward", mutates_args=())
def lif_backward(x: torch.Tensor, ck: torch.Tensor, gs: torch.Tensor, gvl: torch.Tensor,
                 v0: torch.Tensor, tau: float, v_threshold: float, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``gx`` (x's dtype) and ``gv0`` (v0's dtype)."""
    B, T, C = x.shape
    gx = torch.empty_like(x)
    gv0 = torch.empty_like(v0)
    _lif_bwd_kernel[_grid(B, C)](x, ck, gs, gvl, gx, gv0, T, C, ck.shape[1], float(tau),
                                 float(v_threshold), float(alpha), CH=CHUNK, BLOCK_C=_block_c(C),
                                 HALF_PI=HALF_PI, num_warps=2)
    return gx, gv0


@lif_backward.register_fake
def _(x, ck, gs, gvl, v0, tau, v_threshold, alpha):
    return torch.empty_like(x), torch.empty_like(v0)


def _setup_context(ctx, inputs, output):
    x, v0, tau, v_threshold, alpha = inputs
    s, vl, ck = output
    ctx.save_for_backward(x, v0, ck)
    ctx.consts = (tau, v_threshold, alpha)
    ctx.mark_non_differentiable(ck)


def _backward(ctx, gs, gvl, gck):
    x, v0, ck = ctx.saved_tensors
    gs = torch.zeros_like(x) if gs is None else gs.contiguous()
    gvl = torch.zeros_like(v0) if gvl is None else gvl.contiguous()
    gx, gv0 = lif_backward(x, ck, gs, gvl, v0, *ctx.consts)
    return gx, gv0, None, None, None


lif_forward.register_autograd(_backward, setup_context=_setup_context)


def lif(x, v0=None, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 2.0):
    """Multi-step LIF over dim 1 of ``x`` (B, T, C) with Triton; returns ``(spikes, v_last)``.

    Same contract as :func:`spikegpt.ops.lif_torch`: ``v0`` (B, C) is the membrane before the first
    step (fp32 zeros when None); spikes are exactly 0/1 in x's dtype, ``v_last`` in v0's dtype.
    Differentiable in ``x`` and ``v0``.  Saves ``x`` (no copy) and 4 / 16 = 0.25 bytes per element of
    fp32 membrane checkpoints.
    """
    B, T, C = x.shape
    if v0 is None:
        v0 = torch.zeros(B, C, dtype=torch.float32, device=x.device)
    if T == 0:
        return torch.empty_like(x), v0.clone()
    return lif_forward(x.contiguous(), v0.contiguous(), float(tau), float(v_threshold),
                       float(alpha))[:2]
