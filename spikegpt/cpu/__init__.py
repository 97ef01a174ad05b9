"""Fused CPU ops: the WKV scan, the GIF/LIF neuron, the token-shift mixes, the FFN's squared ReLU and the
receptance gates, forward and backward, as one native call each (the gates: their backward).

The pure PyTorch references of :mod:`spikegpt.ops` issue a few small tensor ops per token (the LIF
loop) or per chunk (WKV); here each (B, T, C) call is one C++ loop over the tokens with the channels as
the inner, vectorised loop (``ops.cpp``), built with PyTorch's extension tooling on first use into its
cache directory (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).  Without a C++
compiler, or if the build fails, :func:`available` is False after one warning naming why, and
:mod:`spikegpt.ops` keeps its references.  Importing this module builds nothing.

Exactness, on fp32 (fp64 input runs in fp64; other dtypes compute in fp32, as the references do):

* the neuron is bitwise the reference: the same IEEE operations in the same order (a fused
  multiply-add exactly where ATen's ``addcmul`` has one), so :func:`lif` equals ``ops.lif_torch`` in
  spikes, membrane and both gradients; the GIF modes follow the same rules, and their threshold
  gradient is a sum over (B, T, C) added per channel and then in fp64 (another order than a
  reference's ``sum``);
* the WKV scan is the recurrence of ``ops.wkv_torch`` run token by token, where the reference sums a
  chunk of tokens by a matrix product: values and gradients agree to rounding (``tests/test_cpu_fused.py``
  states the tolerances), and in fp64 to 1e-10;
* the token-shift mixes are bitwise the reference expression in value, their gradients agree to
  rounding (the sum over (B, T) for ``mu`` runs in another order); the squared ReLU and the gate are
  bitwise their references, values and gradients.

All are deterministic: a result never depends on the thread count, so an interrupted and resumed
training run computes what an uninterrupted one does.

WKV.  With the state before token t as ``(a_t, b_t, o_t)`` (numerator ``a e^o``, denominator
``b e^o``) and ``m = max(o_t, u + k_t)``, ``n = max(w + o_t, k_t)``::

    y_t     = (e^{o_t-m} a_t + e^{u+k_t-m} v_t) / (e^{o_t-m} b_t + e^{u+k_t-m})
    a_{t+1} = e^{w+o_t-n} a_t + e^{k_t-n} v_t,   b_{t+1} = e^{w+o_t-n} b_t + e^{k_t-n},   o_{t+1} = n

starting from the given state ``(p, q, o)``; the final state is returned as the reference returns it,
``(a/b, 1, o + log b)``.  The backward runs the adjoints of ``(a, b)`` scaled by ``e^{o}`` in reverse,
so every term stays in range; the gradient of the returned ``q`` is ignored (it is the constant 1).

Neuron (the GIF spec; LIF is one unipolar level with hard reset and the arctan surrogate, output
``s`` instead of ``theta s``): ``h_t = v_{t-1} + (x_t - v_{t-1}) / tau``; ``s_t`` the level count of
``h_t`` (``clip(floor(h/theta), 0, L)``, bipolar ``sign(h) min(floor(|h|/theta), L)``); reset ``hard``
(``v = 0`` where ``s != 0``, else ``h``), ``soft`` (``v = h - theta s``) or ``zero`` (``v = 0`` after
every step: the ``quant`` control); surrogates ``atan`` (the LIF's arctan bump at every level
threshold ``+-k theta``) and ``ste`` (``1/theta`` on ``0 <= h < (L+1) theta``, bipolar ``|h| < (L+1)
theta``); the hard reset's ``1[s != 0]`` takes the surrogate of the first level; the reset is
differentiated, and so is the threshold.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ..state import empty_wkv_state

RESETS = {"hard": 0, "soft": 1, "zero": 2}
SURROGATES = {"atan": 0, "ste": 1}
# ops.cpp: the training ops (Python bindings); decode.cpp: the recurrent decoder's step ops
# (torch.ops.spikegpt.decode_*, which TorchScript can call).
_SOURCES = [Path(__file__).with_name(name) for name in ("ops.cpp", "decode.cpp")]
_HEADER = Path(__file__).with_name("mul_add.h")  # included by both
_ext = None
_failure: str | None = None


# The instruction set of each ATen CPU capability: the build targets the one ATen dispatches to, so that
# the kernels round a + b * c exactly as ATen's (FMA where the capability has it).
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma"],
              "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]}


def _build():
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    cpp_extension.verify_ninja_availability()
    capability = torch.backends.cpu.get_cpu_capability()
    # -fno-trapping-math lets the compiler vectorise selects; it changes no rounding.  -fopenmp-simd:
    # the `omp simd` loops, also where the OpenMP runtime is not used.
    flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd", *_ISA_FLAGS.get(capability, [])]
    ldflags = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        flags.append("-fopenmp")  # the threads of ATen's parallel_for (torch's own OpenMP runtime)
        ldflags.append("-fopenmp")
    # The name carries a digest of the source, flags and torch version: checkouts of other versions
    # sharing the cache directory build beside this one instead of over it.
    texts = [source.read_text() for source in (*_SOURCES, _HEADER)]
    digest = hashlib.sha256("\0".join([*texts, *flags, *ldflags, torch.__version__]).encode()).hexdigest()
    return cpp_extension.load(name=f"spikegpt_cpu_ops_{capability.lower()}_{digest[:12]}",
                              sources=[str(source) for source in _SOURCES],
                              extra_cflags=flags, extra_ldflags=ldflags, verbose=False)


def available() -> bool:
    """Whether the fused ops run here; builds them on the first call (a minute, once per machine).

    A failed build warns once, naming why, and leaves the references in use."""
    global _ext, _failure
    if _ext is None and _failure is None:
        try:
            _ext = _build()
        except Exception as exc:  # noqa: BLE001  (any build failure means: use the references)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _failure = f"{type(exc).__name__}: {reason}"
            warnings.warn(f"spikegpt.cpu: fused CPU ops unavailable ({_failure}); using the PyTorch "
                          "reference ops", RuntimeWarning, stacklevel=2)
    return _ext is not None


def failure() -> str | None:
    """Why the fused ops did not build (None if they did, or were not tried yet)."""
    return _failure


def supports(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` runs fused: a CPU tensor of a floating dtype, and the ops built."""
    return x.device.type == "cpu" and x.is_floating_point() and available()


def _extension():
    if not available():
        raise RuntimeError(f"spikegpt.cpu: fused CPU ops unavailable ({_failure})")
    return _ext


def _compute(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# WKV.
# --------------------------------------------------------------------------------------------------
class _WKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, p0, q0, o0):
        dt = _compute(k)
        args = [t.to(dt).contiguous() for t in (w, u, k, v, p0, q0, o0)]
        y, p, o, sa, sb, so, b_last = _extension().wkv_forward(*args)
        ctx.save_for_backward(*args[:6], sa, sb, so, p, b_last)
        ctx.dtypes = tuple(t.dtype for t in (w, u, k, v, p0, q0, o0))
        return y.to(k.dtype), p, o

    @staticmethod
    def backward(ctx, gy, gp, go):
        w, u, k, v, p0, q0, sa, sb, so, p, b_last = ctx.saved_tensors
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
        gp = torch.zeros_like(p) if gp is None else gp.to(p.dtype).contiguous()
        go = torch.zeros_like(p) if go is None else go.to(p.dtype).contiguous()
        grads = _extension().wkv_backward(w, u, k, v, p0, q0, sa, sb, so, p, b_last, gy, gp, go)
        return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes))


def wkv(w, u, k, v, state=None):
    """WKV over dim 1 of ``k, v`` (B, T, C), the contract of ``ops.wkv_torch``: returns ``y`` (dtype
    of ``k``) and the final state ``(p, q, o)`` (fp32; fp64 for fp64 input), ``q = 1``."""
    dt = _compute(k)
    if state is None:
        state = empty_wkv_state(k.shape[0], k.shape[2], k.device)
    if k.shape[1] == 0:
        return torch.empty_like(k), tuple(s.to(dt) for s in state)
    y, p, o = _WKV.apply(w, u, k, v, *state)
    return y, (p, torch.ones_like(p), o)


# --------------------------------------------------------------------------------------------------
# GIF / LIF neuron.
# --------------------------------------------------------------------------------------------------
class _Neuron(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v0, theta, tau, levels, bipolar, reset, surrogate, alpha, scaled):
        dt = _compute(x)
        th = float(theta)
        y, v_last, h = _extension().gif_forward(x.to(dt).contiguous(), v0.to(dt).contiguous(), th, float(tau),
                                                float(alpha), int(levels), bool(bipolar), reset, surrogate, scaled)
        ctx.save_for_backward(h)
        ctx.consts = (th, float(tau), float(alpha), int(levels), bool(bipolar), reset, surrogate, scaled,
                      x.dtype, v0.dtype, theta.dtype if torch.is_tensor(theta) else None)
        return y.to(x.dtype), v_last.to(v0.dtype)

    @staticmethod
    def backward(ctx, gy, gv_last):
        (h,) = ctx.saved_tensors
        th, tau, alpha, levels, bipolar, reset, surrogate, scaled, x_dt, v_dt, th_dt = ctx.consts
        gy = torch.zeros_like(h) if gy is None else gy.to(h.dtype).contiguous()
        gvl = torch.zeros_like(h[:, 0]) if gv_last is None else gv_last.to(h.dtype).contiguous()
        gx, gv0, gth = _extension().gif_backward(gy, gvl, h, th, tau, alpha, levels, bipolar, reset, surrogate,
                                                 scaled)
        gth = gth.to(th_dt) if th_dt is not None and ctx.needs_input_grad[2] else None
        return gx.to(x_dt), gv0.to(v_dt), gth, None, None, None, None, None, None, None


def _v0(x, v0):
    return torch.zeros(x.shape[0], x.shape[2], dtype=_compute(x), device=x.device) if v0 is None else v0


def lif(x, v0=None, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 2.0):
    """Multi-step LIF over dim 1 of ``x`` (B, T, C), the contract of ``ops.lif_torch``: returns
    ``(spikes, v_last)``, spikes exactly 0 or 1 in ``x``'s dtype."""
    v0 = _v0(x, v0)
    if x.shape[1] == 0:
        return torch.empty_like(x), v0.clone()
    return _Neuron.apply(x, v0, v_threshold, tau, 1, False, RESETS["hard"], SURROGATES["atan"], alpha, False)


def gif(x, v0=None, theta=1.0, tau: float = 2.0, levels: int = 1, bipolar: bool = False, reset: str = "hard",
        surrogate: str = "atan", alpha: float = 2.0):
    """Multi-step GIF over dim 1 of ``x`` (B, T, C): returns ``(y, v_last)`` with ``y = theta s``.

    ``theta`` a float or a 0-d tensor (then differentiable); ``levels`` L >= 1; ``reset`` one of
    ``"hard"``, ``"soft"``, ``"zero"``; ``surrogate`` ``"atan"`` or ``"ste"``."""
    if int(levels) < 1 or reset not in RESETS or surrogate not in SURROGATES:
        raise ValueError(f"GIF needs levels >= 1, reset in {tuple(RESETS)}, surrogate in {tuple(SURROGATES)}; "
                         f"got levels={levels}, reset={reset!r}, surrogate={surrogate!r}")
    v0 = _v0(x, v0)
    if x.shape[1] == 0:
        return torch.empty_like(x), v0.clone()
    return _Neuron.apply(x, v0, theta, tau, levels, bipolar, RESETS[reset], SURROGATES[surrogate], alpha, True)


# --------------------------------------------------------------------------------------------------
# Token-shift mixes.
# --------------------------------------------------------------------------------------------------
class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, last, mu):
        ctx.save_for_backward(z, last, mu)
        return _extension().mix_forward(z, last, mu)[0]

    @staticmethod
    def backward(ctx, g):
        z, last, mu = ctx.saved_tensors
        return tuple(_extension().mix_backward(g.contiguous(), z, last, mu))


def token_shift_mix(z, last, mu):
    """The token-shift mixes of ``spikegpt.model`` for M mixes of one ``z`` in one pass:
    ``out[m] = z * mu[m] + zs * (1 - mu[m])`` with ``zs[:, t] = z[:, t-1]`` and ``zs[:, 0] = last``.

    ``z`` (B, T, C) fp32 or fp64, ``last`` (B, C), ``mu`` (M, C) (or any (M, ..., C)); returns
    (M, B, T, C).  The values are bitwise the reference expression; the gradients (of ``z``, ``last``
    and ``mu``) agree to rounding (the sums run in another order)."""
    if z.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"token_shift_mix runs fp32 or fp64, got {z.dtype}")
    mu = mu.reshape(mu.shape[0], z.shape[-1]).to(z.dtype).contiguous()
    return _Mix.apply(z.contiguous(), last.to(z.dtype).contiguous(), mu)


# --------------------------------------------------------------------------------------------------
# The FFN's squared ReLU.
# --------------------------------------------------------------------------------------------------
class _ReluSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _extension().relu_square_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _extension().relu_square_backward(g.contiguous(), x)


def relu_square(x):
    """``square(relu(x))`` of ``ops.relu_square_torch`` in one pass, forward and backward, bitwise
    (values and gradient); ``x`` fp32 or fp64.  Saves ``x`` alone for backward."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"relu_square runs fp32 or fp64, got {x.dtype}")
    return _ReluSquare.apply(x.contiguous())


# --------------------------------------------------------------------------------------------------
# The receptance gates.
# --------------------------------------------------------------------------------------------------
class _SigmoidGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, y):
        s = torch.sigmoid(a)
        ctx.save_for_backward(s, y)
        return s * y

    @staticmethod
    def backward(ctx, g):
        s, y = ctx.saved_tensors
        return tuple(_extension().sigmoid_gate_backward(g.contiguous(), s, y))


def sigmoid_gate(a, y):
    """``sigmoid(a) * y`` of ``ops.sigmoid_gate_torch`` with its backward in one pass, bitwise (values
    and gradients); ``a`` and ``y`` of one shape, fp32 or fp64."""
    if a.dtype not in (torch.float32, torch.float64) or y.dtype != a.dtype or y.shape != a.shape:
        raise TypeError(f"sigmoid_gate runs fp32 or fp64 operands of one shape, got {a.dtype} {tuple(a.shape)} "
                        f"and {y.dtype} {tuple(y.shape)}")
    return _SigmoidGate.apply(a.contiguous(), y.contiguous())
