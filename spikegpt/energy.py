"""Operation counts and energy per token, under the conventions of the SpikeGPT paper and of this code.

Notation: L layers, C = n_embd, F = ffn_mult * C, V = vocab; rho_emb the fraction of ones of the binary
embedding, rho_att[l] / rho_ffn[l] the measured spike events per neuron-token of layer l's TimeMix /
ChannelMix neuron: its firing rate for binary LIF spikes, and its mean |s| for the integer spike counts
s of multi-level neurons (``gif``, ``quant``), which merge |s| binary events into one step, so that a
spike count s costs |s| accumulates of its fan-out (spike-count-weighted synaptic operations).
MAC = multiply(-accumulate), AC = accumulate (an addition).  Energy = MACs * E_MAC + ACs * E_AC
(45 nm: E_MAC = 4.6 pJ, a 32-bit float multiply 3.7 pJ + add 0.9 pJ; E_AC = 0.9 pJ, a float add).
Elementwise arithmetic is counted with one rule: an add, subtract or comparison alone is 1 AC; a
multiply, with or without an add folded in, is 1 MAC; each exp, division or sigmoid is counted as 1
MAC-equivalent (a lower bound: it costs several in practice).  Per-token constants (``-exp(time_decay)``,
``1 - mu``, ``1/tau``) are precomputed; O(1)-per-token work (a LayerNorm's rsqrt) is ignored.
The embedding lookup (a table read) is 0 operations in every model.

Convention (b), ``code`` -- what this implementation computes, read as the recurrent (per token)
algorithm.  Every matmul reads real-valued data (LayerNorm output mixed with its token-shifted copy,
``r * WKV``, ``relu(.)^2``), so every matmul is a MAC; only work whose operand is a spike is an AC per
actual spike (docs/model.md §6):

=======================  ====================================  ==================================
module                   MACs                                  ACs
=======================  ====================================  ==================================
layernorm (2L+2 LNs)     (2L+2) * 3C  (var, scale, affine)     (2L+2) * 2C  (mean, centre)
att.shift_mix            L * 3 * 2C  (z*mu + zs*(1-mu), k v r)
att.key_value_recept.    L * 3C^2
att.wkv                  L * 11C  (6 mul-adds, 4 exp, 1 div)   L * 8C  (adds, subtracts, 2 max)
att.gate                 L * 2C  (sigmoid, r * y)
att.output               L * C^2
att.lif                  L * C  (h = v + (x - v)/tau)          L * 2C  (x - v, compare)
att.residual                                                   C * sum_l rho_att[l]  (add a spike)
ffn.shift_mix            L * 2 * 2C  (k r)
ffn.key                  L * C F
ffn.relu_square          L * F  (square)                       L * F  (relu compare)
ffn.receptance           L * C^2
ffn.value                L * F C
ffn.gate                 L * 2C  (sigmoid, r * v)
ffn.lif                  L * C                                 L * 2C
ffn.residual                                                   C * sum_l rho_ffn[l]
head                     V C
=======================  ====================================  ==================================

WKV per channel and token (docs/model.md §2): ``u + k``, ``max(o, u+k)``, two
exponent subtractions, ``w + o``, ``max(w+o, k)``, two more subtractions = 8 AC; ``e1 p + e2 v``,
``e1 q + e2`` for the output and again for the state update = 6 MAC; 4 exp and 1 division = 5
MAC-equivalents.  The residual add of a spike tensor is event-driven: only a 1 needs an addition (a
spike count s, |s| additions of theta).

Convention (a), ``paper`` -- the SpikeGPT paper's premise that the network is driven by spikes: every
projection (and the head) is a spike-driven accumulate, ``rate * fan_in * fan_out`` ACs and no MAC,
at the measured rate of the spike tensor that the paper regards as the branch's input:
``rho_in_att[l] = rho_emb`` for l = 0 and ``rho_ffn[l-1]`` after, ``rho_in_ffn[l] = rho_att[l]``,
head at ``rho_ffn[L-1]``; the same rate serves every projection of a branch (also W_o and the FFN's
W_v, whose inputs are real-valued even in the paper's picture).  Elementwise rows are those of (b),
so (a) and (b) differ only in the matmul rows.  If a branch's input is not spikes (non-binary
embedding, non-spiking model), its projections stay MACs.

``rwkv`` -- the same-size non-spiking RWKV twin (LIF = identity, real embedding): the rows of (b)
without the LIF rows and with dense residual adds (``L * C`` ACs per branch).  Rates do not enter.

``transformer`` -- a same-size GPT-style decoder (same L, C, V, FFN width F, pre-LN, learned
positions, ``H = max(1, C // 64)`` heads), run with a KV cache over a context window of T tokens (the
model's ctx_len unless given).  Attention cost depends on the position: the query at position t
(1-based) reads t keys; we average over the positions of one window, ``t_bar = (T + 1) / 2``:

=======================  ====================================  ==================================
embedding                                                      C  (add the position embedding)
layernorm (2L+1 LNs)     (2L+1) * 3C                           (2L+1) * 2C
attn.qkv                 L * 3C^2
attn.scale               L * C  (q / sqrt(d))
attn.scores              L * t_bar * C  (q . k)
attn.softmax             L * H t_bar * 2  (exp, * 1/sum)       L * H t_bar * 2  (- max, + sum)
attn.weighted_sum        L * t_bar * C  (p . v)
attn.output              L * C^2
attn.residual                                                  L * C
mlp.fc / mlp.proj        L * C F each
mlp.gelu                 L * F  (1 MAC-equivalent each)
mlp.residual                                                   L * C
head                     V C
=======================  ====================================  ==================================

Spike-driven linear inputs (``spikegpt.spikify``): a converted model's projections read spike trains,
and ``count_rwkv(..., spike_inputs=rows)`` replaces the matmul rows with the measured per-token counts
(``spikegpt.spikify.convert.input_spike_rows``: ACE, ``d_out`` ACs per spike step of the inputs, plus
the MACs that apply step sizes and offsets, and those of channels kept real-valued).  Analyze passes
them to convention (b); convention (a) keeps the paper's premise.

"Matmul" totals (projections, attention products and the head) are reported beside the totals over
every counted operation; the paper-style headline figure is the matmul total of convention (a).
Synaptic operations (``synaptic_operations``) are the ACs that spikes drive, ``sum |s| x fan-out`` per
token: the residual adds (fan-out 1) and, in convention (a), the spike-driven projections and head.
"""
from __future__ import annotations

from .config import ModelConfig
from .spikes import SpikeRates

E_MAC_45NM = 4.6  # pJ, 32-bit float multiply-accumulate (45 nm)
E_AC_45NM = 0.9  # pJ, 32-bit float add (45 nm)

__all__ = ["count_rwkv", "count_transformer", "transformer_heads", "summarize_counts", "synaptic_operations",
           "MATMUL_ROWS", "SPIKE_DRIVEN_ROWS", "E_MAC_45NM", "E_AC_45NM"]


# Rows that are matrix products (projections, attention products, head).
MATMUL_ROWS = {"att.key_value_receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value", "head",
               "attn.qkv", "attn.scores", "attn.weighted_sum", "attn.output", "mlp.fc", "mlp.proj"}
# Rows of count_rwkv whose ACs, in a spiking convention, are accumulates driven by spikes.
SPIKE_DRIVEN_ROWS = {"att.key_value_receptance", "att.output", "att.residual", "ffn.key", "ffn.receptance",
                     "ffn.value", "ffn.residual", "head"}


def count_rwkv(config: ModelConfig, rates: SpikeRates | None = None, convention: str = "code",
               spike_inputs: dict | None = None) -> dict:
    """Per-token ``{module: {"mac": n, "ac": n}}`` for the RWKV family (see the module docstring).

    ``convention``: ``"code"`` (b), ``"paper"`` (a) or ``"rwkv"`` (the non-spiking twin).  ``code``
    and ``paper`` need the measured ``rates`` of a spiking model (spike-driven rows take their mean |s|
    where given, see :class:`~spikegpt.spikes.SpikeRates`); for a non-spiking model they equal
    ``rwkv``.  ``spike_inputs``: measured ``{matmul row: {"mac", "ac"}}`` of spike-encoded linear
    inputs, which replace those rows."""
    if convention not in ("code", "paper", "rwkv"):
        raise ValueError(f"unknown convention {convention!r}: code, paper or rwkv")
    L, C, V, F = config.n_layer, config.n_embd, config.vocab_size, config.ffn_mult * config.n_embd
    spiking = config.spiking and convention != "rwkv"
    if spiking and (rates is None or rates.att is None or rates.ffn is None
                    or None in rates.att or None in rates.ffn):
        raise ValueError(f"convention {convention!r} of a spiking model needs measured firing rates")
    att_events, ffn_events = rates.events() if spiking else (None, None)
    if spiking and (None in att_events or None in ffn_events):
        raise ValueError(f"convention {convention!r} of a spiking model needs measured mean |s| where given")
    rows = {
        "embedding": (0, 0),
        "layernorm": ((2 * L + 2) * 3 * C, (2 * L + 2) * 2 * C),
        "att.shift_mix": (L * 3 * 2 * C, 0),
        "att.key_value_receptance": (L * 3 * C * C, 0),
        "att.wkv": (L * 11 * C, L * 8 * C),
        "att.gate": (L * 2 * C, 0),
        "att.output": (L * C * C, 0),
        "att.lif": (L * C, L * 2 * C) if spiking else (0, 0),
        "att.residual": (0, C * sum(att_events)) if spiking else (0, L * C),
        "ffn.shift_mix": (L * 2 * 2 * C, 0),
        "ffn.key": (L * C * F, 0),
        "ffn.relu_square": (L * F, L * F),
        "ffn.receptance": (L * C * C, 0),
        "ffn.value": (L * F * C, 0),
        "ffn.gate": (L * 2 * C, 0),
        "ffn.lif": (L * C, L * 2 * C) if spiking else (0, 0),
        "ffn.residual": (0, C * sum(ffn_events)) if spiking else (0, L * C),
        "head": (V * C, 0),
    }
    if convention == "paper" and spiking:
        emb_in = rates.emb if config.binary_embedding else None
        rho_att_in = [emb_in] + list(ffn_events[:-1])  # spikes entering each TimeMix branch
        rho_ffn_in = list(att_events)  # spikes entering each ChannelMix branch

        def spike_driven(fan, rhos):  # (MACs, ACs) of one projection per layer at the layers' rates
            mac = sum(fan for r in rhos if r is None)
            ac = sum(fan * r for r in rhos if r is not None)
            return mac, ac

        rows["att.key_value_receptance"] = spike_driven(3 * C * C, rho_att_in)
        rows["att.output"] = spike_driven(C * C, rho_att_in)
        rows["ffn.key"] = spike_driven(C * F, rho_ffn_in)
        rows["ffn.receptance"] = spike_driven(C * C, rho_ffn_in)
        rows["ffn.value"] = spike_driven(F * C, rho_ffn_in)
        rows["head"] = spike_driven(V * C, [ffn_events[-1]])
    rows.update({k: (v["mac"], v["ac"]) for k, v in (spike_inputs or {}).items()})
    return {k: {"mac": mac, "ac": ac} for k, (mac, ac) in rows.items()}


def transformer_heads(n_embd: int) -> int:
    return max(1, n_embd // 64)


def count_transformer(config: ModelConfig, ctx_len: int | None = None, n_head: int | None = None) -> dict:
    """Per-token ``{module: {"mac", "ac"}}`` of a same-size GPT-style Transformer (module docstring),
    averaged over the positions of a ``ctx_len`` window (``t_bar = (ctx_len + 1) / 2`` keys)."""
    L, C, V, F = config.n_layer, config.n_embd, config.vocab_size, config.ffn_mult * config.n_embd
    T = ctx_len or config.ctx_len
    H = n_head or transformer_heads(C)
    t_bar = (T + 1) / 2
    rows = {
        "embedding": (0, C),
        "layernorm": ((2 * L + 1) * 3 * C, (2 * L + 1) * 2 * C),
        "attn.qkv": (L * 3 * C * C, 0),
        "attn.scale": (L * C, 0),
        "attn.scores": (L * t_bar * C, 0),
        "attn.softmax": (L * H * t_bar * 2, L * H * t_bar * 2),
        "attn.weighted_sum": (L * t_bar * C, 0),
        "attn.output": (L * C * C, 0),
        "attn.residual": (0, L * C),
        "mlp.fc": (L * C * F, 0),
        "mlp.gelu": (L * F, 0),
        "mlp.proj": (L * F * C, 0),
        "mlp.residual": (0, L * C),
        "head": (V * C, 0),
    }
    return {k: {"mac": mac, "ac": ac} for k, (mac, ac) in rows.items()}


def synaptic_operations(rows: dict) -> float:
    """Spike-count-weighted synaptic operations per token, ``sum |s| x fan-out``: the ACs of the
    spike-driven rows of a spiking convention's ``count_rwkv`` rows (module docstring)."""
    return sum(r["ac"] for k, r in rows.items() if k in SPIKE_DRIVEN_ROWS)


def summarize_counts(rows: dict, e_mac: float = E_MAC_45NM, e_ac: float = E_AC_45NM) -> dict:
    """Totals of a row dict: ``{"total": {mac, ac, energy_pj}, "matmul": {...}}`` (pJ per token)."""
    def tot(keys):
        mac = sum(rows[k]["mac"] for k in keys)
        ac = sum(rows[k]["ac"] for k in keys)
        return {"mac": mac, "ac": ac, "energy_pj": mac * e_mac + ac * e_ac}
    return {"total": tot(list(rows)), "matmul": tot([k for k in rows if k in MATMUL_ROWS])}
