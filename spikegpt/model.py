"""SpikeGPT: a spiking RWKV language model (arXiv 2302.13939), as described in docs/model.md §1.

    x = H(E[idx])                                    binary embedding (arctan surrogate)
    x = LN0(x)                                       block 0 only
    x = x + N(TimeMix(LN1(x)))                       spiking RWKV token mixer
    x = x + N(ChannelMix(LN2(x)))                    spiking receptance FFN

N is the configured neuron (``Neuron``): the binary LIF of SpikeGPT, or SpikeLLM's multi-level GIF.
    logits = W_head LN_out(x)

Every block carries a recurrent state, so the same code runs a whole sequence in parallel (training,
prompt prefill) or continues from a state one token at a time (generation).  A state is one fp32
tensor of shape (n_layer, 7, B, C) holding, per layer, the slots named below.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops import token_shift  # noqa: F401  (re-exported: spikegpt.model.token_shift)
from .config import ModelConfig
from .spikify.encoding import InputEncoder
from .state import ATT_SHIFT, FFN_SHIFT, LIF_ATT, LIF_FFN, N_STATE_SLOTS, WKV_O, WKV_P, WKV_Q, initial_state  # noqa: F401  (re-exported: spikegpt.model.N_STATE_SLOTS)


class Neuron(nn.Module):
    """The configured spiking neuron over the token axis (``ops.lif`` or ``ops.gif``); the identity
    when the model does not spike.

    ``lif``: binary spikes.  ``gif``/``quant``: ``theta * s`` with integer spike counts ``s`` in 0..L
    (unipolar) or -L..L (bipolar); ``theta`` is ``v_threshold``, or with ``learn_threshold`` a
    parameter of this branch (initialised to ``v_threshold``) whose gradient is scaled by
    ``1 / sqrt(C L)`` as in LSQ.

    Spike recording is opt-in (``spikegpt.spikes.record_spikes`` sets it up): with ``record`` None,
    the default, nothing is kept and the cost is one attribute test.  With ``record = "rate"`` each
    call adds, on the spikes' device and without a host sync:

    * ``spike_counts`` (int64, (C,)): per neuron, the number of non-zero outputs (firing);
    * ``spike_abs`` (int64, (C,)): per neuron, the sum of ``|s|`` (spike-count-weighted events; equal
      to ``spike_counts`` for ``lif``);
    * ``level_counts`` (int64, (len(level_values),)): how many outputs had each spike count, in the
      order of ``level_values`` (the tuple of possible counts: (0, 1) for ``lif``, 0..L or -L..L);
    * ``spike_steps``: the number of (sequence, token) steps.

    With ``record = "raw"`` it also appends the spike counts themselves ((B, T, C) on the CPU; bool
    for ``lif``, int8 otherwise) to ``spike_trace``.  Recording is detached and never changes the
    output or the gradients.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.spiking, self.kind = config.spiking, config.neuron
        self.tau, self.v_threshold, self.alpha = config.tau, config.v_threshold, config.surrogate_alpha
        if self.kind == "lif":
            self.level_values = (0, 1)
        else:
            L, self.bipolar = config.levels, config.polarity == "bipolar"
            self.levels, self.surrogate = L, config.surrogate
            self.reset = "zero" if self.kind == "quant" else config.reset
            self.level_values = tuple(range(-L if self.bipolar else 0, L + 1))
            if config.learn_threshold:
                self.threshold = nn.Parameter(torch.tensor(float(config.v_threshold)))
                self.threshold_grad_scale = 1 / math.sqrt(config.n_embd * L)
        self.record = None  # None, "rate" or "raw"
        self.reset_records()

    def reset_records(self):
        self.spike_counts, self.spike_abs, self.level_counts, self.spike_steps, self.spike_trace = None, None, None, 0, []

    def theta(self):
        """The threshold: a float, or the learnable parameter (with LSQ's gradient scale)."""
        if hasattr(self, "threshold"):
            return ops.grad_scale(self.threshold, self.threshold_grad_scale)
        return self.v_threshold

    def forward(self, x, v0):
        if not self.spiking:
            return x, v0
        if self.kind == "lif":
            y, v = ops.lif(x, v0, self.tau, self.v_threshold, self.alpha)
        else:
            y, v = ops.gif(x, v0, self.theta(), self.tau, self.levels, self.bipolar, self.reset,
                           self.surrogate, self.alpha)
        if self.record is not None:
            self._record(y)
        return y, v

    @torch.no_grad()
    def _record(self, y):
        s = y.detach() if self.kind == "lif" else torch.round(y.detach().float() / float(self.theta()))
        flat = s.reshape(-1, s.shape[-1])
        counts, total = flat.count_nonzero(0), flat.abs().sum(0).long()
        hist = torch.bincount((flat.flatten() - self.level_values[0]).long(), minlength=len(self.level_values))
        if self.spike_counts is None:
            self.spike_counts, self.spike_abs, self.level_counts = counts, total, hist
        else:
            self.spike_counts, self.spike_abs = self.spike_counts + counts, self.spike_abs + total
            self.level_counts = self.level_counts + hist
        self.spike_steps += s.shape[0] * s.shape[1]
        if self.record == "raw":
            self.spike_trace.append(s.to("cpu", torch.bool if self.kind == "lif" else torch.int8))


class Linear(nn.Linear):
    """``nn.Linear`` (no bias) whose input first passes its ``encoder``: the identity, unless
    ``spikegpt.spikify`` converted the model so that the input is a spike train."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.encoder = InputEncoder(in_features)

    def forward(self, x):
        return F.linear(self.encoder(x), self.weight)


class TimeMix(nn.Module):
    """``W_o (sigmoid(W_r z_r) * WKV(-exp(time_decay), time_first, W_k z_k, W_v z_v))`` with the
    token-shift mixes ``z_m = z * mu_m + zs * (1 - mu_m)`` (``ops.token_shift_mix``) and the gate
    ``sigmoid(.) * .`` (``ops.sigmoid_gate``)."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, L = config.n_embd, config.n_layer
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_first = nn.Parameter(torch.empty(C))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.receptance = Linear(C, C)
        self.output = Linear(C, C)
        self.reset_time_parameters(layer_id, L)

    @torch.no_grad()
    def reset_time_parameters(self, l, L):
        C = self.time_decay.numel()
        c = torch.arange(C, dtype=torch.float64)
        r01 = l / (L - 1) if L > 1 else 0.0
        r1 = 1 - l / L
        self.time_decay.copy_(-5 + 8 * (c / max(C - 1, 1)) ** (0.7 + 1.3 * r01))
        self.time_first.copy_(math.log(0.3) + 0.5 * (((c + 1) % 3) - 1))
        s = (c / C).view(1, 1, C)
        self.time_mix_k.copy_(s ** r1)
        self.time_mix_v.copy_(s ** r1 + 0.3 * r01)
        self.time_mix_r.copy_(s ** (0.5 * r1))

    def forward(self, z, shift, wkv_state):
        zk, zv, zr = ops.token_shift_mix(z, shift, (self.time_mix_k, self.time_mix_v, self.time_mix_r))
        k = self.key(zk)
        v = self.value(zv)
        y, wkv_state = ops.wkv(-torch.exp(self.time_decay), self.time_first, k, v, wkv_state)
        return self.output(ops.sigmoid_gate(self.receptance(zr), y)), wkv_state


class ChannelMix(nn.Module):
    """The spiking receptance FFN: ``sigmoid(W_r z_r) * W_v(relu(W_k z_k)^2)`` (mixes as in TimeMix)."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, L = config.n_embd, config.n_layer
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, config.ffn_mult * C)
        self.receptance = Linear(C, C)
        self.value = Linear(config.ffn_mult * C, C)
        with torch.no_grad():
            s = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
            self.time_mix_k.copy_(s ** (1 - layer_id / L))
            self.time_mix_r.copy_(s ** (1 - layer_id / L))

    def forward(self, z, shift):
        zk, zr = ops.token_shift_mix(z, shift, (self.time_mix_k, self.time_mix_r))
        return ops.sigmoid_gate(self.receptance(zr), self.value(ops.relu_square(self.key(zk))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=eps)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)
        self.lif1 = Neuron(config)
        self.lif2 = Neuron(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, state):
        """``x`` (B, T, C); ``state`` (7, B, C) this layer's slots.  Returns (x, new state)."""
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        z = self.ln1(x)
        a, (p, q, o) = self.att(z, state[ATT_SHIFT], (state[WKV_P], state[WKV_Q], state[WKV_O]))
        s, v_att = self.lif1(a, state[LIF_ATT])
        x = x + s
        z2 = self.ln2(x)
        s, v_ffn = self.lif2(self.ffn(z2, state[FFN_SHIFT]), state[LIF_FFN])
        x = self.dropout(x + s)
        slots = (z[:, -1], z2[:, -1], p, q, o, v_att, v_ffn)
        return x, torch.stack([t.to(state.dtype) for t in slots])


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; backward adds ``1e-4 / (B T) * max logit`` at each position's argmax.

    The extra gradient is scaled by the incoming loss gradient, so that gradient accumulation and
    loss scaling treat it like the loss itself (with a loss gradient of 1 this is the reference).
    """

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        top, idx = logits.max(dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(logits).scatter_(-1, idx, top * factor)
        return grad_loss, grad_logits * grad_loss


class SpikeGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, l) for l in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.head = Linear(config.n_embd, config.vocab_size)
        self.tokenizer = None  # set by spikegpt.load() from the checkpoint

    def initial_state(self, batch_size: int, device=None) -> torch.Tensor:
        """The state before the first token: zeros, with the WKV log-scale at ``ops.EMPTY_EXP``.

        fp32 (fp64 for an fp64 model), on the model's device unless ``device`` is given."""
        weight = self.head.weight
        return initial_state(self.config.n_layer, batch_size, self.config.n_embd,
                             torch.float64 if weight.dtype == torch.float64 else torch.float32,
                             device if device is not None else weight.device)

    def forward(self, idx, targets=None, state=None, return_state=False):
        """Logits (B, T, V) for token ids ``idx`` (B, T), continuing from ``state`` (zero state when
        None).  Returns ``logits``, or ``(logits, loss)`` with ``targets``; with ``return_state=True``
        the final state is appended: ``(logits, state)`` or ``(logits, loss, state)``."""
        B, T = idx.shape
        h, new_state = self.features(idx, state)
        logits = self.head(h)
        out = (logits,)
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))
            out += (L2Wrap.apply(loss, logits) if self.training else loss,)
        if return_state:
            out += (new_state,)
        return out[0] if len(out) == 1 else out

    def features(self, idx, state=None):
        """The model without its head: ``(LN_out(x) (B, T, C), final state)`` for token ids ``idx``,
        continuing from ``state`` (zero state when None).  Causal: position t depends on tokens <= t
        only, so right padding never changes the features of the real tokens."""
        if state is None:
            state = self.initial_state(idx.shape[0], idx.device)
        x = self.emb(idx)
        if self.config.binary_embedding:
            x = ops.spike(x, self.config.surrogate_alpha)
        new_state = []
        for block, layer_state in zip(self.blocks, state):
            x, layer_state = block(x, layer_state)
            new_state.append(layer_state)
        return self.ln_out(x), torch.stack(new_state)

    @torch.no_grad()
    def step(self, tokens, state):
        """One recurrent step: ``tokens`` (B,) -> (logits (B, V), new state); ``state`` is not modified.

        The exact math of the parallel path (so states are interchangeable with ``forward``; at batch
        1 bitwise ``forward`` on one token, for batches up to the summation order of the matrix
        products), run by the cached fast decoder of ``spikegpt.recurrent``; in training mode
        (dropout), for half precision weights, or while spikes are being recorded (``Neuron.record``) it
        falls back to ``forward`` on one token."""
        if (self.training or self.head.weight.dtype not in (torch.float32, torch.float64)
                or any(b.lif1.record or b.lif2.record for b in self.blocks)):
            logits, state = self(tokens.view(-1, 1), state=state, return_state=True)
            return logits[:, 0], state
        from .recurrent import decoder_for
        return decoder_for(self).step(tokens, state)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
