"""Triton WKV (RWKV-4 weighted key-value scan), forward and backward (docs/model.md §2, §7).

Layout and state
----------------
``k, v, y`` are (B, T, C), contiguous, fp32 or bf16 (loaded and computed in fp32, ``y`` stored in
the input dtype).  ``w, u`` are (C,) with ``w = -exp(time_decay)``.  Inside the kernels a state is
held as ``(a, b, e)``: numerator ``a * e^e`` and denominator ``b * e^e``, ``e`` a running maximum
exponent (docs/model.md §2).  The state returned to the caller is normalised like the PyTorch reference
(``spikegpt.ops.wkv_torch``): ``p = num / den``, ``q = 1``, ``o = log(den)``, so that gradients with
respect to the returned state mean exactly what they mean for the reference.

Kernels
-------
One program per (batch row, block of ``BLOCK_C`` channels); time runs through the program in chunks
of ``CH`` steps whose body is unrolled (``tl.static_range``), so the loads of a whole chunk do not
depend on the recurrence and can all be in flight at once.  There is no compile-time maximum on T.

* forward: the exact running-max recurrence of docs/model.md §2; also writes a fp32 checkpoint of the state
  before every chunk (12 bytes per (b, chunk, c), i.e. 12 / CH bytes per element: 0.75 B at CH = 16).
* backward: one reverse sweep over chunks.  For each chunk it replays the forward from the chunk's
  checkpoint into [CH, BLOCK_C] register tiles (the state before each step), then walks the chunk
  backwards carrying the adjoint ``lambda`` of the state (again as mantissas with one exponent):
  with ``g_t = gy_t / D_t``:
  ``gv_t = g_t e^{u+k_t} + e^{k_t} lambda^num_{t+1}``,
  ``gk_t = g_t e^{u+k_t} (v_t - y_t) + e^{k_t} (v_t lambda^num_{t+1} + lambda^den_{t+1})``,
  ``gu  += g_t e^{u+k_t} (v_t - y_t)``, ``gw += e^w <lambda_{t+1}, state_before_t>``,
  ``lambda_t = g_t (1, -y_t) + e^w lambda_{t+1}``; the initial state's gradient is ``lambda_0``.
  Every product of large and small factors is formed by adding exponents first, so nothing
  overflows for any |k|.  ``y`` is recomputed, never saved.  ``gw`` and ``gu`` are written as
  per-(b, c) partials and summed over b by torch (deterministic).

Memory traffic: forward reads k, v and writes y; backward reads k, v, gy (twice, the second time from
cache) and writes gk, gv: the minimum of docs/model.md §7 plus the small checkpoints.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

EMPTY_EXP = -1e38  # same as spikegpt.ops.EMPTY_EXP (not imported: kernels must not import spikegpt.ops)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 16


def _block_c(C: int) -> int:
    cap = 32 if INTERPRET else 64
    return max(16, min(cap, triton.next_power_of_2(C)))


@triton.jit
def _load_step(k_ptr, v_ptr, base, t, T, C, cm, BLOCK_C: tl.constexpr):
    """Mask, offset and fp32 ``k_t, v_t`` of time step ``t`` for a block of channels."""
    m = cm & ((tl.zeros([BLOCK_C], tl.int32) + t) < T)
    off = base + t.to(tl.int64) * C
    kk = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
    vv = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
    return m, off, kk, vv


@triton.jit
def _wkv_output(a, bb, e, u, kk, vv):
    """``y_t`` from the state before step t (docs/model.md §2); also returns ``e^{u+k_t-mx}``, the
    denominator mantissa and the exponent ``mx`` that the backward pass needs."""
    ww = u + kk
    mx = tl.maximum(e, ww)
    e1 = tl.exp(e - mx)
    e2 = tl.exp(ww - mx)
    dm = e1 * bb + e2
    return (e1 * a + e2 * vv) / dm, e2, dm, mx


@triton.jit
def _wkv_advance(a, bb, e, w, kk, vv, m):
    """The state after step t from the state before it (where ``m``; unchanged elsewhere)."""
    ww = w + e
    mx = tl.maximum(ww, kk)
    e1 = tl.exp(ww - mx)
    e2 = tl.exp(kk - mx)
    return tl.where(m, e1 * a + e2 * vv, a), tl.where(m, e1 * bb + e2, bb), tl.where(m, mx, e)


@triton.jit
def _wkv_fwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, p0_ptr, q0_ptr, o0_ptr,
                    y_ptr, pT_ptr, qT_ptr, oT_ptr, ck_ptr,
                    T, C, NCH,
                    CH: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    w = tl.load(w_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    sb = b * C + cs
    a = tl.load(p0_ptr + sb, mask=cm, other=0.0)
    bb = tl.load(q0_ptr + sb, mask=cm, other=0.0)
    e = tl.load(o0_ptr + sb, mask=cm, other=-1e38)
    base = b * T * C + cs
    ck_plane = tl.num_programs(0).to(tl.int64) * NCH * C  # (3, B, NCH, C) checkpoint planes
    for ci in range(0, NCH):
        t0 = ci * CH
        cb = (b * NCH + ci) * C + cs
        tl.store(ck_ptr + cb, a, mask=cm)
        tl.store(ck_ptr + ck_plane + cb, bb, mask=cm)
        tl.store(ck_ptr + 2 * ck_plane + cb, e, mask=cm)
        for j in tl.static_range(CH):
            m, off, kk, vv = _load_step(k_ptr, v_ptr, base, t0 + j, T, C, cm, BLOCK_C)
            y, _, _, _ = _wkv_output(a, bb, e, u, kk, vv)
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
            a, bb, e = _wkv_advance(a, bb, e, w, kk, vv, m)
    # Normalised final state (as the reference): p = num/den, q = 1, o = log(den).
    bs = tl.where(cm, bb, 1.0)
    tl.store(pT_ptr + sb, a / bs, mask=cm)
    tl.store(qT_ptr + sb, tl.full([BLOCK_C], 1.0, tl.float32), mask=cm)
    tl.store(oT_ptr + sb, e + tl.log(bs), mask=cm)


@triton.jit
def _wkv_bwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, gy_ptr, ck_ptr,
                    pT_ptr, oT_ptr, gpT_ptr, goT_ptr, p0_ptr, q0_ptr, o0_ptr,
                    gk_ptr, gv_ptr, gw_ptr, gu_ptr, gp0_ptr, gq0_ptr, go0_ptr,
                    T, C, NCH,
                    CH: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    w = tl.load(w_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    sb = b * C + cs
    base = b * T * C + cs
    ck_plane = tl.num_programs(0).to(tl.int64) * NCH * C

    # Adjoint of the final state (p = num/den, o = log den, q constant):
    # dL/dnum = gp e^{-o}, dL/dden = (go - gp p) e^{-o}.  Kept as mantissas (la, ld), exponent le.
    pT = tl.load(pT_ptr + sb, mask=cm, other=0.0)
    oT = tl.load(oT_ptr + sb, mask=cm, other=0.0)
    la = tl.load(gpT_ptr + sb, mask=cm, other=0.0)
    ld = tl.load(goT_ptr + sb, mask=cm, other=0.0) - la * pT
    le = tl.where((la == 0.0) & (ld == 0.0), -1e38, -oT)

    gw = tl.zeros([BLOCK_C], tl.float32)
    gu = tl.zeros([BLOCK_C], tl.float32)
    rows = tl.arange(0, CH)[:, None]
    for ci in range(0, NCH):
        c = NCH - 1 - ci
        t0 = c * CH
        cb = (b * NCH + c) * C + cs
        a = tl.load(ck_ptr + cb, mask=cm, other=0.0)
        bb = tl.load(ck_ptr + ck_plane + cb, mask=cm, other=0.0)
        e = tl.load(ck_ptr + 2 * ck_plane + cb, mask=cm, other=-1e38)
        # Replay the chunk: SA/SB/SE[j] = state before step t0 + j.
        SA = tl.zeros([CH, BLOCK_C], tl.float32)
        SB = tl.zeros([CH, BLOCK_C], tl.float32)
        SE = tl.zeros([CH, BLOCK_C], tl.float32)
        for j in tl.static_range(CH):
            sel = rows == j
            SA = tl.where(sel, a[None, :], SA)
            SB = tl.where(sel, bb[None, :], SB)
            SE = tl.where(sel, e[None, :], SE)
            if j < CH - 1:
                m, off, kk, vv = _load_step(k_ptr, v_ptr, base, t0 + j, T, C, cm, BLOCK_C)
                a, bb, e = _wkv_advance(a, bb, e, w, kk, vv, m)
        # Reverse sweep through the chunk.
        for jr in tl.static_range(CH):
            j = CH - 1 - jr
            sel = rows == j
            a = tl.sum(tl.where(sel, SA, 0.0), axis=0)
            bb = tl.sum(tl.where(sel, SB, 0.0), axis=0)
            e = tl.sum(tl.where(sel, SE, 0.0), axis=0)
            m, off, kk, vv = _load_step(k_ptr, v_ptr, base, t0 + j, T, C, cm, BLOCK_C)
            gyv = tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
            y, e2, dm, mx = _wkv_output(a, bb, e, u, kk, vv)
            gm = gyv / dm  # g_t = gm * e^{-mx}
            cur = gm * e2  # g_t e^{u + k_t}
            ef = tl.exp(kk + le)  # e^{k_t} * (lambda's scale)
            gvt = cur + ef * la
            gkt = cur * (vv - y) + ef * (vv * la + ld)
            tl.store(gk_ptr + off, gkt.to(gk_ptr.dtype.element_ty), mask=m)
            tl.store(gv_ptr + off, gvt.to(gv_ptr.dtype.element_ty), mask=m)
            gu += tl.where(m, cur * (vv - y), 0.0)
            gw += tl.where(m, tl.exp(w + le + e) * (la * a + ld * bb), 0.0)
            # lambda_t = g_t (1, -y_t) + e^w lambda_{t+1}
            we = w + le
            ne = tl.where(gm != 0.0, tl.maximum(-mx, we), we)
            f1 = tl.exp(tl.minimum(-mx - ne, 0.0)) * gm
            f2 = tl.exp(we - ne)
            la = tl.where(m, f1 + f2 * la, la)
            ld = tl.where(m, f2 * ld - f1 * y, ld)
            le = tl.where(m, ne, le)
    tl.store(gw_ptr + sb, gw, mask=cm)
    tl.store(gu_ptr + sb, gu, mask=cm)
    # Initial state: num0 = p0 e^{o0}, den0 = q0 e^{o0}.
    p0 = tl.load(p0_ptr + sb, mask=cm, other=0.0)
    q0 = tl.load(q0_ptr + sb, mask=cm, other=0.0)
    o0 = tl.load(o0_ptr + sb, mask=cm, other=0.0)
    f = tl.exp(le + o0)
    gp0 = la * f
    gq0 = ld * f
    tl.store(gp0_ptr + sb, gp0, mask=cm)
    tl.store(gq0_ptr + sb, gq0, mask=cm)
    tl.store(go0_ptr + sb, gp0 * p0 + gq0 * q0, mask=cm)


# --------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and autograd.
# --------------------------------------------------------------------------------------------------
def _grid(B, C):
    return (B, triton.cdiv(C, _block_c(C)))


@torch.library.custom_op("spikegpt::wkv_forward", mutates_args=())
def wkv_forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                p0: torch.Tensor, q0: torch.Tensor, o0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``y, pT, qT, oT, checkpoints`` (checkpoints: (3, B, ceil(T/CHUNK), C) fp32)."""
    B, T, C = k.shape
    nch = triton.cdiv(T, CHUNK)
    y = torch.empty_like(k)
    pT, qT, oT = (torch.empty(B, C, dtype=torch.float32, device=k.device) for _ in range(3))
    ck = torch.empty(3, B, nch, C, dtype=torch.float32, device=k.device)
    _wkv_fwd_kernel[_grid(B, C)](w, u, k, v, p0, q0, o0, y, pT, qT, oT, ck, T, C, nch,
                                 CH=CHUNK, BLOCK_C=_block_c(C), num_warps=2)
    return y, pT, qT, oT, ck


@wkv_forward.register_fake
def _(w, u, k, v, p0, q0, o0):
    B, T, C = k.shape
    nch = (T + CHUNK - 1) // CHUNK
    s = k.new_empty(B, C, dtype=torch.float32)
    return (torch.empty_like(k), s, torch.empty_like(s), torch.empty_like(s),
            k.new_empty(3, B, nch, C, dtype=torch.float32))


@torch.library.custom_op("spikegpt::wkv_backward", mutates_args=())
def wkv_backward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 gy: torch.Tensor, ck: torch.Tensor, pT: torch.Tensor, oT: torch.Tensor,
                 gpT: torch.Tensor, goT: torch.Tensor,
                 p0: torch.Tensor, q0: torch.Tensor, o0: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``gw, gu, gk, gv, gp0, gq0, go0``."""
    B, T, C = k.shape
    nch = ck.shape[2]
    gk, gv = torch.empty_like(k), torch.empty_like(v)
    part = torch.empty(2, B, C, dtype=torch.float32, device=k.device)
    gp0, gq0, go0 = (torch.empty(B, C, dtype=torch.float32, device=k.device) for _ in range(3))
    _wkv_bwd_kernel[_grid(B, C)](w, u, k, v, gy, ck, pT, oT, gpT, goT, p0, q0, o0,
                                 gk, gv, part[0], part[1], gp0, gq0, go0, T, C, nch,
                                 CH=CHUNK, BLOCK_C=_block_c(C), num_warps=2)
    gw = part[0].sum(0).to(w.dtype)
    gu = part[1].sum(0).to(u.dtype)
    return gw, gu, gk, gv, gp0, gq0, go0


@wkv_backward.register_fake
def _(w, u, k, v, gy, ck, pT, oT, gpT, goT, p0, q0, o0):
    return (torch.empty_like(w), torch.empty_like(u), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(p0), torch.empty_like(q0), torch.empty_like(o0))


def _setup_context(ctx, inputs, output):
    w, u, k, v, p0, q0, o0 = inputs
    y, pT, qT, oT, ck = output
    ctx.save_for_backward(w, u, k, v, p0, q0, o0, pT, oT, ck)
    ctx.mark_non_differentiable(qT, ck)


def _backward(ctx, gy, gpT, gqT, goT, gck):
    w, u, k, v, p0, q0, o0, pT, oT, ck = ctx.saved_tensors
    gy = torch.zeros_like(k) if gy is None else gy.contiguous()
    gpT = torch.zeros_like(pT) if gpT is None else gpT.float().contiguous()
    goT = torch.zeros_like(oT) if goT is None else goT.float().contiguous()
    gw, gu, gk, gv, gp0, gq0, go0 = wkv_backward(w, u, k, v, gy, ck, pT, oT, gpT, goT, p0, q0, o0)
    return gw, gu, gk, gv, gp0, gq0, go0


wkv_forward.register_autograd(_backward, setup_context=_setup_context)


def wkv(w, u, k, v, state=None):
    """WKV over dim 1 of ``k, v`` (B, T, C) with Triton; returns ``(y, (p, q, o))``.

    Same contract as :func:`spikegpt.ops.wkv_torch`: ``w = -exp(time_decay)`` and ``u`` of shape
    (C,); ``k, v`` fp32 or bf16 (math in fp32, ``y`` in ``k``'s dtype); ``state`` an optional
    ``(p, q, o)`` of fp32 (B, C) tensors; the returned state is normalised to ``q = 1``.
    Differentiable in ``w, u, k, v`` and the state.  Saved for backward: the inputs (no copies) and
    fp32 chunk checkpoints, 12 / 16 = 0.75 bytes per (b, t, c).
    """
    B, T, C = k.shape
    if v.dtype != k.dtype:
        v = v.to(k.dtype)
    if state is None:
        p0 = torch.zeros(B, C, dtype=torch.float32, device=k.device)
        q0 = torch.zeros_like(p0)
        o0 = torch.full_like(p0, EMPTY_EXP)
    else:
        p0, q0, o0 = (s.to(torch.float32).contiguous() for s in state)
    if T == 0:
        return torch.empty_like(k), (p0, q0, o0)
    y, pT, qT, oT, _ = wkv_forward(w.contiguous(), u.contiguous(), k.contiguous(), v.contiguous(),
                                   p0, q0, o0)
    return y, (pT, qT, oT)
