"""Fast recurrent decoding: one token per call, the exact math of the parallel model (docs/model.md §4).

:class:`RecurrentDecoder` runs ``SpikeGPT`` one token at a time from a state of shape
``(n_layer, 7, B, C)`` (the same state the parallel path takes and returns, see ``spikegpt.model``),
with the per-token Python work cut to a few dozen tensor ops per layer:

* the small per-channel tensors (``1 - mu``, ``e^u``, ``e^w`` with ``w = -exp(time_decay)``, the
  token-shift mixes stacked per branch) are computed once and cached; the cache is rebuilt when any
  parameter changes (in-place optimizer steps and ``load_state_dict`` included);
* WKV runs as its single-step form: exactly the arithmetic ``ops.wkv_torch`` performs on a chunk of
  one token (running max ``K = max(k, o)``, output ``(p e^{o-K} + e^{u+k-K} v) / (q e^{o-K} +
  e^{u+k-K})``, then the state renormalised to ``q = 1``), so states are interchangeable between the
  two paths;
* LIF runs as one step of ``ops.lif_torch``: ``h = v + (x - v) / tau`` (one ``addcdiv``, which rounds
  the same: its kernel is ``v + 1 * d / tau``, and a division feeding the add cannot be FMA-contracted),
  ``s = h >= v_th``, ``v = h (1 - s)``; a GIF neuron as one step of ``ops.gif_torch``, with the same
  ops (``floor(|h| / theta)`` clamped, the sign copied, ``v`` by ``masked_fill`` / ``addcmul`` / zero);
* on a CPU, a batch of one sequence splits each matrix-vector product by output columns into one
  block per thread, run as one batched product (``bmm``) that ATen spreads over the cores, where a
  plain ``mm`` of one row runs on one core and streams weights at a fraction of the memory's rate;
  a split is used only where it gives bitwise the same product (checked on this machine, per shape
  and batch size: ``RecurrentDecoder._mats_for``), so a step stays bitwise the parallel path run on
  one token.  Batches of 2+ sequences multiply by oneDNN-prepacked copies of the weights (of the
  matrices of 512 x 512 or more: 2x faster than MKL's few-row products at the 45m shape; built on
  the first batched step, a second copy of those weights), which sum in another order: the same
  products to an ulp or so, as between any two product shapes.  ``exact_batches=True`` keeps MKL's
  (split) products at every batch size;
* on a CPU, fp32 and fp64 models run ``_step_fused``: the elementwise work between a layer's matrix
  products as four native ops (``spikegpt/cpu/decode.cpp``: LayerNorm with the token-shift mixes, the
  WKV step with the receptance gate, the neuron step with the residual add (and the FFN's gate), the
  squared ReLU), each doing the same IEEE operations in the same order and calling ATen itself for
  LayerNorm, exp, log and sigmoid, so bitwise the unfused step; they read the state's rows and write
  the new state's in place (no unbind, no stack).  ``fused=False`` (or a build without a compiler)
  keeps the unfused step;
* the new state is assembled by one ``stack`` at the end; the ops run under ``torch.inference_mode``
  (no autograd dispatch), writing the caller-visible outputs into ordinary tensors; the small
  per-layer tensors are packed into one buffer per layer (they are re-fetched from memory after every
  matmul's weight stream, so locality matters).

On a GPU a step is ~650 small kernels, each launched by the CPU: at batch 1 their launches, not the
GPU, bound the speed.  There the step is captured in a CUDA graph (``cuda_graph="auto"``, the
default; ``"on"`` insists, ``"off"`` never), one per batch size, with static buffers for the tokens,
the state, the logits and the new state: a step copies its inputs in, replays the graph (the same
kernels, so bitwise the uncaptured eager step) and returns copies of the outputs.  Where capture is
impossible (a CPU, a capture error) the step runs uncaptured and ``graph_fallback`` says why.

Elementwise ops use the same formulas, in the same order, as the parallel path, so they round the same
way; the matrix products cannot (a (B, C) x (C, N) product is blocked differently from the (B*T, C)
product of the parallel path, which moves results by an ulp or so).  On the reference checkpoints
(spike rates 15-22%) this has not flipped a spike in our tests; ``tests/test_recurrent.py`` measures it.

``weight_dtype=torch.bfloat16`` (opt-in, for CPU decoding speed) keeps a bf16 copy of every matrix
(on a CPU prepacked for oneDNN, whose bf16 products are faster than torch.mm's; benchmarks/results/bench_generate-*);
activations are rounded to bf16 only as matmul inputs, everything else (LayerNorm, WKV, LIF, the state)
stays fp32.  That is an approximation of the model, not the model: spikes near threshold will flip.
"""
from __future__ import annotations

import warnings
from typing import List

import torch

from . import cpu
from .spikify.encoding import encode
from .state import ATT_SHIFT, FFN_SHIFT, LIF_ATT, LIF_FFN, WKV_O, WKV_P, WKV_Q

# _step_impl indexes the state slots by number (TorchScript has no module constants): check them.
assert (ATT_SHIFT, FFN_SHIFT, WKV_P, WKV_Q, WKV_O, LIF_ATT, LIF_FFN) == (0, 1, 2, 3, 4, 5, 6)

__all__ = ["RecurrentDecoder", "CudaGraphs", "decoder_for"]


def _tensor_dicts(model):
    """Every module's dicts of parameters and of buffers (a spike encoding of the linear inputs), kept
    once: walking the modules on every step costs more than a third of a millisecond at 45m."""
    return [d for module in model.modules() for d in (module._parameters, module._buffers)]


def _param_key(dicts):
    """What the cache depends on: the tensors now in ``dicts`` (see ``_tensor_dicts``), by memory and
    version (a new tensor, or new data of another dtype or device, has new memory; in-place updates
    bump the version)."""
    return tuple((t.data_ptr(), t._version) for d in dicts for t in d.values() if t is not None)


# Per-layer entries of the flat list of small tensors handed to the step function (_step_impl reads
# them by number); the weight matrices go in a second list, 7 per layer in the order the step
# multiplies by them (key, value, receptance, output, ffn key, ffn receptance, ffn value), head last.
_LN1W, _LN1B, _LN2W, _LN2B, _MU_ATT, _OMU_ATT, _EU, _EW, _MU_FFN, _OMU_FFN = range(10)
_SMALL = 10
# Batches up to this size split their matrix products over the cores (RecurrentDecoder._split); on
# a 2-core machine the split is faster at every batch size measured (1 to 64).
_SPLIT_MAX_BATCH = 64
# Batched steps use oneDNN for matrices of at least this many weights: a oneDNN call has a larger fixed
# cost than MKL's, which its faster few-row products repay from about this size (benchmarks/bench_generate.py).
_ONEDNN_MIN_SIZE = 512 * 512


def _linear_without_onednn(x, w):
    raise RuntimeError("oneDNN-packed weights need torch's mkldnn ops")


try:  # oneDNN's linear on prepacked weights (bf16 mode, fp32 batches), in TorchScript's own syntax:
    # the op's `Scalar?[]` argument needs its `number` type
    _onednn_linear = torch.jit.CompilationUnit("""
def linear(x: Tensor, w: Tensor) -> Tensor:
    no_scalars: List[Optional[number]] = []
    return torch.ops.mkldnn._linear_pointwise(x.to(w.dtype), w, None, "none", no_scalars, "").to(x.dtype)
""").linear
except Exception:  # torch built without mkldnn
    _onednn_linear = _linear_without_onednn


def _mm(x, m: List[torch.Tensor], cast: bool):
    """``x @ w`` for ``m = [w]`` (``w`` (in, out), or oneDNN-prepacked (out, in), see ``_packed``), or
    for ``w`` split by columns (see ``RecurrentDecoder._split``) into ``m = [blocks, rest]``:
    ``blocks`` (P, in, n) multiplied as one batched product, which ATen spreads over the cores (a
    single matrix-vector product runs on one core), then ``rest`` (in, r)."""
    if len(m) == 1:
        if m[0].is_mkldnn:
            return _onednn_linear(x, m[0])
        if cast:
            return torch.mm(x.to(m[0].dtype), m[0]).to(x.dtype)
        return torch.mm(x, m[0])
    blocks, rest = m[0], m[1]
    B, (P, K, n) = x.shape[0], blocks.shape
    y = torch.empty(B, P * n + rest.shape[1], dtype=x.dtype, device=x.device)
    out = y[:, :P * n].view(B, P, n).transpose(0, 1)  # y's columns as (P, B, n)
    if B == 1:  # contiguous: the batched product writes straight into y
        torch.bmm(x.expand(P, B, K), blocks, out=out)
    else:  # strided: ATen would run the blocks one after another, so copy instead
        out.copy_(torch.bmm(x.expand(P, B, K), blocks))
    if rest.shape[1] > 0:
        torch.mm(x, rest, out=y[:, P * n:])  # BLAS takes y's row stride as is
    return y


def _packed(w, batch_hint: int):
    """``w`` (in, out) as oneDNN's prepacked (out, in) weight (laid out for ``batch_hint`` rows) where
    that is available and gives ``torch.mm``'s product up to summation order, else ``w``."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return w
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), batch_hint)
        x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want, got = torch.mm(x.to(w.dtype), w).float(), _onednn_linear(x, packed).float()
        tol = 1e-2 if w.dtype == torch.bfloat16 else 1e-5
        if got.shape == want.shape and (got - want).abs().max() <= tol * want.abs().max():
            return packed
    except Exception:  # a torch whose private oneDNN ops differ: the plain product
        pass
    return w


def _shape_key(w):
    """What a BLAS kernel choice can depend on: shape, strides, dtype, alignment."""
    return tuple(w.shape), w.stride(), w.dtype, w.data_ptr() % 64


def _in(x, e: List[torch.Tensor]):
    """The input of a matrix product: ``x``, or its spike encoding ``e`` (``spikegpt.spikify``)."""
    return x if len(e) == 0 else encode(x, e)


def _neuron_step(x, inp, v, tau, theta, neuron: int, levels: int, bipolar: bool, reset: int,
                 counts: List[torch.Tensor], collect: bool, slots: List[torch.Tensor]):
    """One step of the configured neuron (new membrane appended to ``slots``); returns ``x + output``.

    ``neuron``: -1 none (the twin), 0 LIF (one step of ops.lif_torch), 1 GIF (one step of
    ops.gif_torch, ``reset`` 0 hard, 1 soft, 2 zero), each op the one the parallel path runs."""
    if neuron < 0:
        slots.append(v)
        return x + inp
    h = torch.addcdiv(v, inp - v, tau)  # == v + (inp - v) / tau, bitwise (no FMA: a div feeds the add)
    if neuron == 0:
        fired = torch.ge(h, theta)
        slots.append(h.masked_fill_(fired, 0.0))
        if collect:
            counts.append(fired.sum())
        return x + fired
    a = h.abs() if bipolar else h
    s = torch.div(a, theta).floor_()
    s = s.clamp_(max=levels) if bipolar else s.clamp_(0, levels)
    if bipolar:
        s = torch.copysign(s, h)
    if reset == 0:
        slots.append(h.masked_fill(torch.ge(a, theta), 0.0))
    elif reset == 1:
        slots.append(torch.addcmul(h, s, -theta))
    else:
        slots.append(torch.zeros_like(h))
    if collect:
        counts.append(torch.count_nonzero(s))
    return x + theta * s


def _step_impl(tokens, state, emb, ln0w, ln0b, params: List[torch.Tensor], mats: List[List[torch.Tensor]],
               encs: List[List[torch.Tensor]],
               ln_out_w, ln_out_b, n_layer: int, eps: float, tau, thetas: List[torch.Tensor], ones, tiny: float,
               binary: bool, neuron: int, levels: int, bipolar: bool, reset: int, cast: bool, collect: bool,
               logits, new) -> List[torch.Tensor]:
    C = emb.shape[1]
    x = torch.embedding(emb, tokens)
    if binary:
        x = torch.ge(x, 0.0).to(x.dtype)
    x = torch.layer_norm(x, [C], ln0w, ln0b, eps)  # block 0's extra LayerNorm
    B = state.shape[2]
    S = state.reshape(n_layer * 7, B, C).unbind(0)
    slots: List[torch.Tensor] = []
    counts: List[torch.Tensor] = []
    for l in range(n_layer):
        P = params[l * 10:(l + 1) * 10]
        W = mats[l * 7:(l + 1) * 7]
        E = encs[l * 7:(l + 1) * 7]
        s0 = l * 7
        # ---- TimeMix: token shift mixes (z mu + z_prev (1 - mu), as the parallel path), k, v, r
        z = torch.layer_norm(x, [C], P[0], P[1], eps)
        m = (z * P[4] + S[s0] * P[5]).unbind(0)
        k = _mm(_in(m[0], E[0]), W[0], cast)
        v = _mm(_in(m[1], E[1]), W[1], cast)
        r = torch.sigmoid(_mm(_in(m[2], E[2]), W[2], cast))
        # WKV, one token: ops.wkv_torch's chunk arithmetic for a chunk of length 1.
        o = S[s0 + 4]
        K = torch.maximum(k, o)
        ek = torch.exp(k - K)
        es = torch.exp(o - K)
        a = S[s0 + 2] * es
        b = S[s0 + 3] * es
        now = P[6] * ek
        y = (a + now * v) / (b + now)
        den = (ek + P[7] * b).clamp_min_(tiny)
        slot_v: List[torch.Tensor] = []
        x = _neuron_step(x, _mm(_in(r * y, E[3]), W[3], cast), S[s0 + 5], tau, thetas[2 * l], neuron, levels,
                         bipolar, reset, counts, collect, slot_v)
        # ---- ChannelMix
        z2 = torch.layer_norm(x, [C], P[2], P[3], eps)
        m2 = (z2 * P[8] + S[s0 + 1] * P[9]).unbind(0)
        kk = torch.relu(_mm(_in(m2[0], E[4]), W[4], cast))
        out = torch.sigmoid(_mm(_in(m2[1], E[5]), W[5], cast)) * _mm(_in(kk * kk, E[6]), W[6], cast)
        x = _neuron_step(x, out, S[s0 + 6], tau, thetas[2 * l + 1], neuron, levels, bipolar, reset, counts,
                         collect, slot_v)
        slots += [z, z2, (ek * v + P[7] * a) / den, ones, K + torch.log(den), slot_v[0], slot_v[1]]
    torch.stack(slots, out=new.view(n_layer * 7, B, C))
    xo = torch.layer_norm(x, [C], ln_out_w, ln_out_b, eps)
    logits.copy_(_mm(_in(xo, encs[n_layer * 7]), mats[n_layer * 7], cast))
    return counts


def _step_fused(tokens, state, emb, ln0w, ln0b, params: List[torch.Tensor], mats: List[List[torch.Tensor]],
                encs: List[List[torch.Tensor]],
                ln_out_w, ln_out_b, n_layer: int, eps: float, tau, thetas: List[torch.Tensor], tiny: float,
                binary: bool, neuron: int, levels: int, bipolar: bool, reset: int, cast: bool, collect: bool,
                logits, new, counts) -> List[torch.Tensor]:
    """``_step_impl`` with the elementwise work between a layer's matrix products as four fused CPU ops
    (``spikegpt/cpu/decode.cpp``: the same operations in the same order, so bitwise the same step),
    which read the state's rows and write the new state's in place; ``state`` contiguous, of the
    model's dtype (fp32 or fp64).  The spike counts go to ``counts`` (2 n_layer int64)."""
    C = emb.shape[1]
    x = torch.embedding(emb, tokens)
    if binary:
        x = torch.ge(x, 0.0).to(x.dtype)
    x = torch.layer_norm(x, [C], ln0w, ln0b, eps)  # block 0's extra LayerNorm
    for l in range(n_layer):
        P = params[l * 10:(l + 1) * 10]
        W = mats[l * 7:(l + 1) * 7]
        E = encs[l * 7:(l + 1) * 7]
        m = torch.ops.spikegpt.decode_ln_mix(x, P[0], P[1], eps, state, new, l, 0, P[4], P[5])
        k = _mm(_in(m[0], E[0]), W[0], cast)
        v = _mm(_in(m[1], E[1]), W[1], cast)
        ry = torch.ops.spikegpt.decode_wkv(k, v, _mm(_in(m[2], E[2]), W[2], cast), state, new, l, P[6], P[7], tiny)
        x = torch.ops.spikegpt.decode_neuron(x, _mm(_in(ry, E[3]), W[3], cast), None, state, new, l, 5, tau,
                                             thetas[2 * l], neuron, levels, bipolar, reset, collect, counts, 2 * l)
        m2 = torch.ops.spikegpt.decode_ln_mix(x, P[2], P[3], eps, state, new, l, 1, P[8], P[9])
        kk = torch.ops.spikegpt.decode_relu_square(_mm(_in(m2[0], E[4]), W[4], cast))
        gate = _mm(_in(m2[1], E[5]), W[5], cast)
        x = torch.ops.spikegpt.decode_neuron(x, _mm(_in(kk, E[6]), W[6], cast), gate, state, new, l, 6, tau,
                                             thetas[2 * l + 1], neuron, levels, bipolar, reset, collect, counts,
                                             2 * l + 1)
    xo = torch.layer_norm(x, [C], ln_out_w, ln_out_b, eps)
    logits.copy_(_mm(_in(xo, encs[n_layer * 7]), mats[n_layer * 7], cast))
    return [counts] if collect else []


_scripted = {}


def _compiled(fn):
    """``fn`` (a step function) under TorchScript (fewer Python round trips per op); eager if unavailable."""
    if fn not in _scripted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _scripted[fn] = torch.jit.script(fn)
        except Exception:  # TorchScript missing or broken in this torch: same math, eagerly
            _scripted[fn] = fn
    return _scripted[fn]


# Graphs a decoder keeps (one per batch size and spike collection): a decode loop uses one, and each
# holds its own memory pool, so a caller cycling through many batch sizes evicts the oldest.
_MAX_GRAPHS = 4


class CudaGraphs:
    """The capture backend of the decoder's graphs: torch.cuda's, used as PyTorch's CUDA Graphs notes
    prescribe (a few warm-up runs on a side stream, then capture on that same stream, so that cuBLAS's
    handle and workspace exist before capture)."""
    warmup = 3

    def unavailable(self, device: torch.device) -> str | None:
        """Why graphs cannot run on ``device`` (None: they can)."""
        if device.type != "cuda":
            return f"CUDA graphs need a CUDA device, the model is on {device.type}"
        return None

    def capture(self, run, device: torch.device):
        """Record ``run()`` (which reads and writes only tensors that outlive the graph); returns the replay."""
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        return graph.replay


class _StepGraph:
    """One captured step: static tokens, state, logits and new state, and the graph's replay."""

    def __init__(self, decoder, tokens, state, backend):
        self.tokens = tokens.to(torch.long, copy=True)
        self.state = torch.empty(state.shape, dtype=state.dtype, device=state.device).copy_(state)
        self.logits = torch.empty(tokens.shape[0], decoder.vocab_size, dtype=decoder.emb.dtype,
                                  device=decoder.emb.device)
        self.new = torch.empty_like(self.state)
        # A graph holds no references of its own: keep alive what it reads beyond the decoder's cache
        # (the decoder's tensor of ones is replaced when another batch size comes along).
        self.ones = decoder._ones(self.state)
        self.counts: List[torch.Tensor] = []  # the spike counts the graph writes (when collecting)

        def run():  # eager ops: a TorchScript executor could change its kernels after the capture
            self.counts[:] = decoder._run(_step_impl, self.tokens, self.state, self.logits, self.new)

        self.replay = backend.capture(run, state.device)

    def step(self, tokens, state):
        self.tokens.copy_(tokens)
        self.state.copy_(state)
        self.replay()
        return self.logits.clone(), self.new.clone(), self.counts


class RecurrentDecoder:
    """A precomputed single-token decoder for ``model`` (see the module docstring).

    ``step(tokens, state) -> (logits (B, V), new_state)``; ``state`` is left untouched.
    ``weight_dtype``: None (the model's own weights, exact) or ``torch.bfloat16`` (opt-in speed mode).
    ``script``: run the step under TorchScript (default; falls back to eager if unavailable).
    ``split``: on a CPU, spread each matrix product over the threads where that is bitwise exact
    (default; see the module docstring).
    ``fused``: on a CPU, for fp32 and fp64 models, run the elementwise work between the matrix products
    as the fused ops of ``spikegpt/cpu/decode.cpp`` (default; bitwise the same step); ``fused_step``
    says whether they run (False also where the ops did not build).
    ``exact_batches``: batches of 2+ sequences use the same (split) BLAS products as batch 1, bitwise
    the parallel path run on one token, instead of the faster oneDNN products (default off).
    ``cuda_graph``: ``"auto"`` (capture the step in a CUDA graph where the model is on a GPU),
    ``"on"`` (the same, a ``ValueError`` elsewhere, and a warning where capture fails) or ``"off"``;
    ``graph_fallback`` is why a step runs uncaptured (None while graphs run), ``graph_captures``
    counts captures.  ``graph_backend``: the capture backend (default :class:`CudaGraphs`).
    Set ``collect_spikes = True`` to accumulate per-layer spike counts in ``spike_counts``
    ((n_layer, 2) for the att / ffn LIFs) over ``spike_steps`` token steps.
    """

    def __init__(self, model, weight_dtype: torch.dtype | None = None, script: bool = True, split: bool = True,
                 exact_batches: bool = False, cuda_graph: str = "auto", graph_backend=None, fused: bool = True):
        if cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be 'auto', 'on' or 'off', got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self.graph_backend = graph_backend if graph_backend is not None else CudaGraphs()
        self.graph_captures = 0
        self.model = model
        self.exact_batches = exact_batches
        self.weight_dtype = weight_dtype
        self.script = script
        self.split = split
        self.fused = fused
        self._tensors = _tensor_dicts(model)
        self._key = None
        self.collect_spikes = False
        self.spike_counts = None
        self.spike_steps = 0
        self._build()

    @torch.no_grad()
    def _build(self):
        m, cfg = self.model, self.model.config
        wd = self.weight_dtype

        def mat(lin):  # (in, out): a transposed view, exactly what F.linear multiplies by
            w = lin.weight.detach()
            return (w if wd is None or w.dtype == wd else w.to(wd)).t()

        params, mats, linears = [], [], []
        for block in m.blocks:
            a, f = block.att, block.ffn
            w = -torch.exp(a.time_decay.detach())
            compute = torch.float64 if w.dtype == torch.float64 else torch.float32
            w, u = w.to(compute), a.time_first.detach().to(compute)
            # e^w exactly as wkv_torch's state decay for a one-token chunk: exp(arange(2) * w)[1].
            ew = torch.exp(torch.arange(2, dtype=compute, device=w.device) * w[:, None])[:, 1].contiguous()
            layer = [None] * _SMALL
            layer[_LN1W], layer[_LN1B] = block.ln1.weight.detach(), block.ln1.bias.detach()
            layer[_LN2W], layer[_LN2B] = block.ln2.weight.detach(), block.ln2.bias.detach()
            layer[_MU_ATT] = torch.cat([a.time_mix_k, a.time_mix_v, a.time_mix_r]).detach()  # (3, 1, C)
            layer[_OMU_ATT] = torch.cat([1 - a.time_mix_k, 1 - a.time_mix_v, 1 - a.time_mix_r]).detach()
            layer[_EU], layer[_EW] = torch.exp(u), ew
            layer[_MU_FFN] = torch.cat([f.time_mix_k, f.time_mix_r]).detach()  # (2, 1, C)
            layer[_OMU_FFN] = torch.cat([1 - f.time_mix_k, 1 - f.time_mix_r]).detach()
            # The small per-channel tensors of a layer packed into one buffer (locality: the weight
            # streaming of every matmul evicts them from the caches), exact copies.
            if all(t.dtype == layer[0].dtype for t in layer):
                flat = torch.cat([t.reshape(-1) for t in layer])
                sizes = [t.numel() for t in layer]
                layer = [piece.view(t.shape) for piece, t in zip(flat.split(sizes), layer)]
            params += layer
            linears += [a.key, a.value, a.receptance, a.output, f.key, f.receptance, f.value]
        linears.append(m.head)
        mats = [mat(lin) for lin in linears]
        self.params = params
        # The spike encodings of the matrices' inputs (empty lists for an unconverted model).
        self.encs = [[t.to(m.emb.weight.dtype) if t.is_floating_point() else t for t in lin.encoder.encoding()]
                     for lin in linears]
        self.emb = m.emb.weight.detach()
        self.ln0 = (m.blocks[0].ln0.weight.detach(), m.blocks[0].ln0.bias.detach())
        self.ln_out = (m.ln_out.weight.detach(), m.ln_out.bias.detach())
        v_th = torch.tensor(cfg.v_threshold, dtype=self.emb.dtype, device=self.emb.device)
        # One threshold per neuron branch (att, ffn per layer): a learnt one, or v_threshold.
        self.thetas = [n.threshold.detach().to(self.emb.dtype) if hasattr(n, "threshold") else v_th
                       for block in m.blocks for n in (block.lif1, block.lif2)]
        self.neuron = -1 if not cfg.spiking else 0 if cfg.neuron == "lif" else 1
        self.reset = {"hard": 0, "soft": 1, None: 2}[cfg.reset] if cfg.neuron != "quant" else 2
        self.levels, self.bipolar = int(cfg.levels or 1), cfg.polarity == "bipolar"
        self.cast = wd is not None and wd != self.emb.dtype
        self.tau = torch.tensor(float(cfg.tau), dtype=self.emb.dtype, device=self.emb.device)
        self._ones_cache = None
        self.tiny = torch.finfo(self.emb.dtype).tiny
        self._impl = _compiled(_step_impl) if self.script else _step_impl
        self.fused_step = (self.fused and self.emb.device.type == "cpu"
                           and self.emb.dtype in (torch.float32, torch.float64)
                           and all(t.dtype == self.emb.dtype for t in [*params, *self.thetas]) and cpu.available())
        self._fused_impl = (_compiled(_step_fused) if self.script else _step_fused) if self.fused_step else None
        self.mats = [[_packed(w, 1) if self.cast else w] for w in mats]
        self._threads = torch.get_num_threads()
        self.split_mats = self._split(mats)
        self._exact = {}  # batch size -> the (split where exact) matrices, see _mats_for
        self._batched = None  # the oneDNN copies for batches, built on first use
        self.vocab_size = mats[-1].shape[1]
        self._key = _param_key(self._tensors)
        # The graphs read the tensors above: a rebuild drops them (and retries a failed capture).
        self._graphs = {}
        self.graph_fallback = "cuda_graph='off'" if self.cuda_graph == "off" else \
            self.graph_backend.unavailable(self.emb.device)
        if self.cuda_graph == "on" and self.graph_fallback is not None:
            raise ValueError(f"cuda_graph='on': {self.graph_fallback}; use 'auto' or 'off'")

    def _split(self, mats):
        """Every (in, N) matrix as ``[blocks, rest]`` for ``_mm`` (``None`` where it cannot be split).

        ATen runs a matrix-vector product on a single core, which cannot stream weights as fast as
        the memory allows; the P blocks of a batched product run on P cores.  Blocks are multiples of
        16 columns, so each starts as aligned as the matrix."""
        if not self.split or self.emb.device.type != "cpu" or self.cast or self._threads < 2:
            return None
        split = []
        for w in mats:
            K, N = w.shape
            P = min(self._threads, N // 16)
            n = N // P // 16 * 16 if P >= 2 and w.t().is_contiguous() else 0
            split.append([w[:, :P * n].t().reshape(P, n, K).transpose(1, 2), w[:, P * n:]] if n else None)
        return split

    def _mats_for(self, batch):
        """The matrices a step of ``batch`` sequences multiplies by: for 2+ sequences on a CPU
        (without ``exact_batches``) oneDNN-prepacked copies of the large ones; otherwise the model's
        own, split over the threads where that is exact.

        Each output column is the same dot product either way, but BLAS libraries pick kernels by
        shape (the few leftover columns of a 50277-row head take another kernel at batch 4 than inside
        the whole product, for instance), so a split is used only where it reproduces the whole
        product bitwise on this machine, checked once per matrix shape (and alignment) and batch size
        (kernels do not branch on values: one random draw decides)."""
        if batch > 1 and not self.exact_batches and not self.cast and self.emb.device.type == "cpu":
            if self._batched is None:  # built on the first batched step: a second copy of the weights
                self._batched = [[_packed(w, 16) if w.numel() >= _ONEDNN_MIN_SIZE else w] for (w,) in self.mats]
            return self._batched
        if self.split_mats is None or batch > _SPLIT_MAX_BATCH:
            return self.mats
        if batch not in self._exact:
            gen = torch.Generator().manual_seed(batch)
            verdict = {}
            for (w,), parts in zip(self.mats, self.split_mats):
                key = _shape_key(w)
                if parts is not None and key not in verdict:
                    x = torch.randn(batch, w.shape[0], generator=gen, dtype=torch.float32).to(w.dtype)
                    with torch.inference_mode():
                        verdict[key] = torch.equal(torch.mm(x, w), _mm(x, parts, False))
            self._exact[batch] = [parts if parts is not None and verdict[_shape_key(w)] else [w]
                                  for (w,), parts in zip(self.mats, self.split_mats)]
        return self._exact[batch]

    def _ones(self, state):
        o = self._ones_cache
        if o is None or o.shape != state.shape[2:] or o.dtype != state.dtype or o.device != state.device:
            o = self._ones_cache = torch.ones(state.shape[2:], dtype=state.dtype, device=state.device)
        return o

    def refresh(self):
        """Rebuild the cached tensors if any parameter of the model (or the thread count) changed
        since the last build."""
        if _param_key(self._tensors) != self._key or torch.get_num_threads() != self._threads:
            self._build()

    def reset_spike_stats(self):
        self.spike_counts = None
        self.spike_steps = 0

    def _run(self, impl, tokens, state, logits, new) -> List[torch.Tensor]:
        """``impl`` (the step function) on ``tokens`` and ``state``, writing ``logits`` and ``new``;
        returns the spike counts (when collecting)."""
        cfg = self.model.config
        # Inference mode skips the autograd dispatch of every op (~10% of the per-token Python-free
        # overhead); the outputs are allocated outside it, so the caller gets ordinary tensors.
        mats = self._mats_for(tokens.shape[0])
        with torch.inference_mode():
            return impl(
                tokens, state, self.emb, self.ln0[0], self.ln0[1], self.params,
                mats, self.encs, self.ln_out[0],
                self.ln_out[1], cfg.n_layer,
                cfg.layer_norm_eps, self.tau, self.thetas, self._ones(state), self.tiny, bool(cfg.binary_embedding),
                self.neuron, self.levels, self.bipolar, self.reset, self.cast, bool(self.collect_spikes), logits, new)

    def _run_fused(self, tokens, state, logits, new) -> List[torch.Tensor]:
        """``_run`` of ``_step_fused`` (a CPU state of the model's dtype)."""
        cfg = self.model.config
        mats = self._mats_for(tokens.shape[0])
        counts = torch.zeros(2 * cfg.n_layer if self.collect_spikes else 0, dtype=torch.long)
        with torch.inference_mode():
            return self._fused_impl(
                tokens, state.contiguous(), self.emb, self.ln0[0], self.ln0[1], self.params, mats, self.encs,
                self.ln_out[0], self.ln_out[1], cfg.n_layer, cfg.layer_norm_eps, self.tau, self.thetas, self.tiny,
                bool(cfg.binary_embedding), self.neuron, self.levels, self.bipolar, self.reset, self.cast,
                bool(self.collect_spikes), logits, new, counts)

    def _graph_for(self, tokens, state):
        """The captured step for this batch (captured now if new), or None where the step runs
        uncaptured (``graph_fallback`` says why)."""
        if self.graph_fallback is not None:
            return None
        key = (tokens.shape[0], tuple(state.shape), state.dtype, bool(self.collect_spikes))
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= _MAX_GRAPHS:
                del self._graphs[next(iter(self._graphs))]
            try:
                graph = _StepGraph(self, tokens, state, self.graph_backend)
            except Exception as e:  # an op or a state the capture does not support: run uncaptured
                self.graph_fallback = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                self._graphs = {}
                if self.cuda_graph == "on":
                    warnings.warn(f"CUDA graph {self.graph_fallback}; decoding without it", stacklevel=3)
                return None
            self._graphs[key] = graph
            self.graph_captures += 1
        return graph

    @torch.no_grad()
    def step(self, tokens, state):
        """One token per sequence: ``tokens`` (B,) ids, ``state`` (n_layer, 7, B, C) -> logits (B, V),
        new state (a new tensor; ``state`` is not modified)."""
        self.refresh()
        tokens = tokens.reshape(-1)
        graph = self._graph_for(tokens, state)
        if graph is not None:
            logits, new, counts = graph.step(tokens, state)
        else:
            new = torch.empty(state.shape, dtype=state.dtype, device=state.device)
            logits = torch.empty(tokens.shape[0], self.vocab_size, dtype=self.emb.dtype, device=self.emb.device)
            if self._fused_impl is not None and state.dtype == self.emb.dtype:
                counts = self._run_fused(tokens, state, logits, new)
            else:
                counts = self._run(self._impl, tokens, state, logits, new)
        if self.collect_spikes and self.model.config.spiking:
            c = torch.stack(counts).view(-1, 2).to("cpu", torch.float64)
            self.spike_counts = c if self.spike_counts is None else self.spike_counts + c
            self.spike_steps += tokens.numel()
        return logits, new


def decoder_for(model, weight_dtype: torch.dtype | None = None) -> RecurrentDecoder:
    """The model's cached decoder (built on first use, rebuilt when the parameters change)."""
    cache = model.__dict__.setdefault("_recurrent_decoders", {})
    dec = cache.get(weight_dtype)
    if dec is None:
        dec = cache[weight_dtype] = RecurrentDecoder(model, weight_dtype)
    return dec
