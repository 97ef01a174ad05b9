"""Spike analytics: firing rates, operation counts, energy estimates and spike rasters.

Recording (for the trainer and the evaluator)
---------------------------------------------
``with record_spikes(model): model(...)`` makes every LIF module count its spikes (per neuron, on
the device, no host sync) and counts the ones of the binary embedding; ``firing_rates(model)`` then
returns a flat dict of rates to log::

    {"emb": fraction of ones of H(E[idx]),          # absent for a non-binary embedding
     "att.0": ..., "ffn.0": ..., ... ,              # per layer and branch: spikes / (neurons x tokens)
     "att": ..., "ffn": ..., "all": ...}            # means over layers (over every LIF neuron for "all")

A rate is the fraction of neurons that spike per token: total spikes / (B * T * C), averaged over
everything recorded since the recording started (or since ``reset_spike_stats``).  A non-spiking
model (``ModelConfig(spiking=False, binary_embedding=False)``) has no rates: ``{}``.  Recording is off
by default and costs one attribute test per LIF call when off.  ``SpikeGPT.step``'s fast recurrent
decoder may bypass the LIF modules: record through ``model(...)`` (the parallel path).

Operation counts (per token, per module, summed over layers)
-------------------------------------------------------------
Notation: L layers, C = n_embd, F = ffn_mult * C, V = vocab; rho_emb the fraction of ones of the binary
embedding, rho_att[l] / rho_ffn[l] the measured firing rates of layer l's TimeMix / ChannelMix LIF.
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
actual spike (DESIGN section 4):

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

WKV per channel and token (the DESIGN section 1 recurrence): ``u + k``, ``max(o, u+k)``, two
exponent subtractions, ``w + o``, ``max(w+o, k)``, two more subtractions = 8 AC; ``e1 p + e2 v``,
``e1 q + e2`` for the output and again for the state update = 6 MAC; 4 exp and 1 division = 5
MAC-equivalents.  The residual add of a spike tensor is event-driven: only a 1 needs an addition.

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

"Matmul" totals (projections, attention products and the head) are reported beside the totals over
every counted operation; the paper-style headline figure is the matmul total of convention (a).

CLI: ``python -m spikegpt.analyze --ckpt RUN_OR_FILE [--data-dir DIR] [--split val] [--tokens N]
[--json OUT] [--raster PNG [--raster-prompt TEXT] [--raster-layer L]] [--e-mac 4.6] [--e-ac 0.9]``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ModelConfig

E_MAC_45NM = 4.6  # pJ, 32-bit float multiply-accumulate (45 nm)
E_AC_45NM = 0.9  # pJ, 32-bit float add (45 nm)

__all__ = ["record_spikes", "firing_rates", "spike_stats", "reset_spike_stats", "all_reduce_spike_stats",
           "SpikeRates", "count_rwkv", "count_transformer", "summarize_counts", "analyze", "E_MAC_45NM", "E_AC_45NM",
           "main"]


# --------------------------------------------------------------------------------------------------
# Recording.
# --------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The SpikeGPT inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and not hasattr(model, "blocks"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _branches(model):
    """[(name, layer, LIF)] in layer order: ("att", l, block.lif1), ("ffn", l, block.lif2)."""
    model = _unwrap(model)
    out = []
    for l, block in enumerate(model.blocks):
        out += [("att", l, block.lif1), ("ffn", l, block.lif2)]
    return out


def _count_embedding_ones(module, inputs, output):
    ones = (output.detach() >= 0).count_nonzero()
    prev = getattr(module, "spike_ones", None)
    module.spike_ones = ones if prev is None else prev + ones
    module.spike_elems = getattr(module, "spike_elems", 0) + output.numel()


def reset_spike_stats(model) -> None:
    """Forget everything recorded so far (spike counts, embedding ones, raw traces)."""
    model = _unwrap(model)
    for _, _, lif in _branches(model):
        lif.reset_records()
    model.emb.spike_ones, model.emb.spike_elems = None, 0


@contextlib.contextmanager
def record_spikes(model, raw: bool = False, reset: bool = True):
    """Record spikes of every LIF module (and the binary embedding's ones) inside the block.

    ``raw=False`` keeps per-neuron spike counts only (cheap: no host sync, O(C) memory per LIF);
    ``raw=True`` also keeps every spike tensor (bool, CPU) for rasters.  ``reset`` clears earlier
    records first.  Yields the unwrapped model; read the result with :func:`firing_rates` or
    :func:`spike_stats` (the records stay after the block ends)."""
    base = _unwrap(model)
    if reset:
        reset_spike_stats(base)
    lifs = [lif for _, _, lif in _branches(base)]
    previous = [lif.record for lif in lifs]
    for lif in lifs:
        lif.record = "raw" if raw else "rate"
    handle = base.emb.register_forward_hook(_count_embedding_ones) if base.config.binary_embedding else None
    try:
        yield base
    finally:
        for lif, prev in zip(lifs, previous):
            lif.record = prev
        if handle is not None:
            handle.remove()


def all_reduce_spike_stats(model) -> None:
    """Sum the records of every process of the default ``torch.distributed`` group into each one,
    so that rates cover the whole global batch (a collective: every rank calls it; no-op without a
    process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    model = _unwrap(model)
    lifs = [lif for _, _, lif in _branches(model)]
    device = model.emb.weight.device
    zeros = torch.zeros(model.config.n_embd, dtype=torch.float64, device=device)
    counts = [zeros if lif.spike_counts is None else lif.spike_counts.to(device, torch.float64) for lif in lifs]
    emb_ones, emb_elems = getattr(model.emb, "spike_ones", None), getattr(model.emb, "spike_elems", 0)
    scalars = torch.tensor([lif.spike_steps for lif in lifs] + [float(emb_ones or 0), emb_elems],
                           dtype=torch.float64, device=device)
    flat = torch.cat(counts + [scalars])
    dist.all_reduce(flat)  # float64 holds integer counts exactly up to 2^53
    n = len(lifs) * zeros.numel()
    for lif, c, steps in zip(lifs, flat[:n].view(len(lifs), -1), flat[n:n + len(lifs)].tolist()):
        lif.spike_counts, lif.spike_steps = (c.long(), int(steps)) if steps else (None, 0)
    emb_ones, emb_elems = flat[-2:].tolist()
    model.emb.spike_ones, model.emb.spike_elems = (emb_ones, int(emb_elems)) if emb_elems else (None, 0)


def spike_stats(model) -> dict:
    """Detailed records: ``{"emb": rate or None, "branches": [{"branch", "layer", "rate", "steps",
    "per_neuron": (C,) float tensor of per-neuron rates}]}`` (rate None where nothing was recorded)."""
    model = _unwrap(model)
    emb_elems = getattr(model.emb, "spike_elems", 0)
    emb = float(model.emb.spike_ones) / emb_elems if emb_elems else None
    branches = []
    for name, l, lif in _branches(model):
        if lif.spike_steps and lif.spike_counts is not None:
            per_neuron = lif.spike_counts.double().cpu() / lif.spike_steps
            rate = float(per_neuron.mean())
        else:
            per_neuron, rate = None, None
        branches.append({"branch": name, "layer": l, "rate": rate, "steps": lif.spike_steps,
                         "per_neuron": per_neuron})
    return {"emb": emb, "branches": branches}


def firing_rates(model, prefix: str = "") -> dict:
    """Flat ``{prefix+key: rate}`` for logging (keys ``emb``, ``att.{l}``, ``ffn.{l}``, ``att``,
    ``ffn``, ``all``), from what was recorded; ``{}`` when nothing was (or the model does not spike)."""
    stats = spike_stats(model)
    out = {}
    if stats["emb"] is not None:
        out["emb"] = stats["emb"]
    means = {"att": [], "ffn": []}
    for b in stats["branches"]:
        if b["rate"] is not None:
            out[f"{b['branch']}.{b['layer']}"] = b["rate"]
            means[b["branch"]].append(b["rate"])
    for name, rates in means.items():
        if rates:
            out[name] = sum(rates) / len(rates)
    if means["att"] or means["ffn"]:
        allr = means["att"] + means["ffn"]
        out["all"] = sum(allr) / len(allr)
    return {prefix + k: v for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Counting.
# --------------------------------------------------------------------------------------------------
@dataclass
class SpikeRates:
    """Measured rates: ``emb`` fraction of ones of the binary embedding (None if not binary);
    ``att[l]``, ``ffn[l]`` the LIF firing rates (None for a non-spiking model)."""

    emb: float | None
    att: list | None = None
    ffn: list | None = None

    @classmethod
    def from_model(cls, model) -> "SpikeRates":
        stats = spike_stats(model)
        att = [b["rate"] for b in stats["branches"] if b["branch"] == "att"]
        ffn = [b["rate"] for b in stats["branches"] if b["branch"] == "ffn"]
        spiking = _unwrap(model).config.spiking
        return cls(emb=stats["emb"], att=att if spiking else None, ffn=ffn if spiking else None)


# Rows that are matrix products (projections, attention products, head).
MATMUL_ROWS = {"att.key_value_receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value", "head",
               "attn.qkv", "attn.scores", "attn.weighted_sum", "attn.output", "mlp.fc", "mlp.proj"}


def count_rwkv(config: ModelConfig, rates: SpikeRates | None = None, convention: str = "code") -> dict:
    """Per-token ``{module: {"mac": n, "ac": n}}`` for the RWKV family (see the module docstring).

    ``convention``: ``"code"`` (b), ``"paper"`` (a) or ``"rwkv"`` (the non-spiking twin).  ``code``
    and ``paper`` need the measured ``rates`` of a spiking model; for a non-spiking model they equal
    ``rwkv``."""
    if convention not in ("code", "paper", "rwkv"):
        raise ValueError(f"unknown convention {convention!r}: code, paper or rwkv")
    L, C, V, F = config.n_layer, config.n_embd, config.vocab_size, config.ffn_mult * config.n_embd
    spiking = config.spiking and convention != "rwkv"
    if spiking and (rates is None or rates.att is None or rates.ffn is None
                    or None in rates.att or None in rates.ffn):
        raise ValueError(f"convention {convention!r} of a spiking model needs measured firing rates")
    rows = {
        "embedding": (0, 0),
        "layernorm": ((2 * L + 2) * 3 * C, (2 * L + 2) * 2 * C),
        "att.shift_mix": (L * 3 * 2 * C, 0),
        "att.key_value_receptance": (L * 3 * C * C, 0),
        "att.wkv": (L * 11 * C, L * 8 * C),
        "att.gate": (L * 2 * C, 0),
        "att.output": (L * C * C, 0),
        "att.lif": (L * C, L * 2 * C) if spiking else (0, 0),
        "att.residual": (0, C * sum(rates.att)) if spiking else (0, L * C),
        "ffn.shift_mix": (L * 2 * 2 * C, 0),
        "ffn.key": (L * C * F, 0),
        "ffn.relu_square": (L * F, L * F),
        "ffn.receptance": (L * C * C, 0),
        "ffn.value": (L * F * C, 0),
        "ffn.gate": (L * 2 * C, 0),
        "ffn.lif": (L * C, L * 2 * C) if spiking else (0, 0),
        "ffn.residual": (0, C * sum(rates.ffn)) if spiking else (0, L * C),
        "head": (V * C, 0),
    }
    if convention == "paper" and spiking:
        emb_in = rates.emb if config.binary_embedding else None
        rho_att_in = [emb_in] + list(rates.ffn[:-1])  # spikes entering each TimeMix branch
        rho_ffn_in = list(rates.att)  # spikes entering each ChannelMix branch

        def spike_driven(fan, rhos):  # (MACs, ACs) of one projection per layer at the layers' rates
            mac = sum(fan for r in rhos if r is None)
            ac = sum(fan * r for r in rhos if r is not None)
            return mac, ac

        rows["att.key_value_receptance"] = spike_driven(3 * C * C, rho_att_in)
        rows["att.output"] = spike_driven(C * C, rho_att_in)
        rows["ffn.key"] = spike_driven(C * F, rho_ffn_in)
        rows["ffn.receptance"] = spike_driven(C * C, rho_ffn_in)
        rows["ffn.value"] = spike_driven(F * C, rho_ffn_in)
        rows["head"] = spike_driven(V * C, [rates.ffn[-1]])
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


def summarize_counts(rows: dict, e_mac: float = E_MAC_45NM, e_ac: float = E_AC_45NM) -> dict:
    """Totals of a row dict: ``{"total": {mac, ac, energy_pj}, "matmul": {...}}`` (pJ per token)."""
    def tot(keys):
        mac = sum(rows[k]["mac"] for k in keys)
        ac = sum(rows[k]["ac"] for k in keys)
        return {"mac": mac, "ac": ac, "energy_pj": mac * e_mac + ac * e_ac}
    return {"total": tot(list(rows)), "matmul": tot([k for k in rows if k in MATMUL_ROWS])}


# --------------------------------------------------------------------------------------------------
# Measurement and report.
# --------------------------------------------------------------------------------------------------
def analyze(model, tokens, n_tokens: int = 4096, window: int | None = None, streams: int = 4,
            e_mac: float = E_MAC_45NM, e_ac: float = E_AC_45NM, ctx_len: int | None = None,
            device=None) -> dict:
    """Run ``model`` over the first ``n_tokens`` (+1) of ``tokens`` (state carried across windows)
    recording spikes, and return the report dict (rates, counts under every convention, energy)."""
    from .evaluate import evaluate_tokens

    base = _unwrap(model)
    config = base.config
    window = window or config.ctx_len
    with record_spikes(base):
        ev = evaluate_tokens(base, tokens, window, carry_state=True, streams=streams, max_tokens=n_tokens,
                             device=device)
    stats = spike_stats(base)
    rates = SpikeRates.from_model(base)
    spiking = config.spiking
    layers = []
    for l in range(config.n_layer):
        row = {"layer": l}
        for b in stats["branches"]:
            if b["layer"] == l and b["per_neuron"] is not None:
                pn = b["per_neuron"]
                row[b["branch"]] = b["rate"]
                row[b["branch"] + "_silent"] = float((pn == 0).double().mean())  # never spiked
                row[b["branch"] + "_max_neuron"] = float(pn.max())
        layers.append(row)
    conventions = {}
    for conv in ("paper", "code", "rwkv"):
        rows = count_rwkv(config, rates, conv if spiking else "rwkv")
        conventions[conv] = {"modules": rows, **summarize_counts(rows, e_mac, e_ac)}
    T = ctx_len or config.ctx_len
    rows = count_transformer(config, T)
    conventions["transformer"] = {"modules": rows, **summarize_counts(rows, e_mac, e_ac)}
    notes = []
    if not spiking:
        notes.append("the model does not spike: no firing rates; every convention counts it as the plain RWKV")
    if spiking and not config.binary_embedding:
        notes.append("non-binary embedding: layer 0's TimeMix projections stay MACs in the paper convention")
    return {
        "model": {**config.to_dict(), "n_params": base.num_params()},
        "tokens_analyzed": ev["predicted_tokens"], "window": window, "streams": ev["streams"],
        "loss": ev["loss"], "bits_per_token": ev["bits_per_token"],
        "firing_rates": {"embedding_ones": stats["emb"], "layers": layers,
                         **{k: v for k, v in firing_rates(base).items() if k in ("att", "ffn", "all")}},
        "e_mac_pj": e_mac, "e_ac_pj": e_ac,
        "transformer": {"ctx_len": T, "n_head": transformer_heads(config.n_embd),
                        "mean_keys_per_query": (T + 1) / 2},
        "conventions": conventions,
        "notes": notes,
    }


def _fmt(n) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.4g}" if n != int(n) else f"{int(n)}"


def _energy(pj) -> str:
    for unit, scale in (("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def _rate(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_report(report: dict) -> str:
    cfg = report["model"]
    lines = [f"model: L{cfg['n_layer']} C{cfg['n_embd']} V{cfg['vocab_size']} ({cfg['n_params']:,} params, "
             f"spiking={cfg['spiking']}, binary_embedding={cfg['binary_embedding']}); "
             f"{report['tokens_analyzed']:,} tokens, loss {report['loss']:.4f} "
             f"({report['bits_per_token']:.4f} bits/token)", ""]
    fr = report["firing_rates"]
    lines.append("firing rates (fraction of neurons spiking per token; silent = share of neurons that never spiked)")
    lines.append(f"  binary embedding, fraction of ones: {_rate(fr['embedding_ones'])}")
    lines.append(f"  {'layer':>5}  {'att':>7}  {'ffn':>7}  {'att silent':>10}  {'ffn silent':>10}")
    for row in fr["layers"]:
        lines.append(f"  {row['layer']:>5}  {_rate(row.get('att')):>7}  {_rate(row.get('ffn')):>7}  "
                     f"{_rate(row.get('att_silent')):>10}  {_rate(row.get('ffn_silent')):>10}")
    if "all" in fr:
        lines.append(f"  {'mean':>5}  {_rate(fr.get('att')):>7}  {_rate(fr.get('ffn')):>7}")
    lines.append("")
    conv = report["conventions"]
    lines.append("operations per token, summed over layers: (a) paper = projections as spike-driven ACs at the "
                 "measured rate; (b) code = what is computed (matmuls read real values: MAC); RWKV = non-spiking twin")
    head = f"  {'module':<26}{'(a) MAC':>10}{'(a) AC':>10}{'(b) MAC':>10}{'(b) AC':>10}{'RWKV MAC':>10}{'RWKV AC':>10}"
    lines.append(head)
    for name in conv["code"]["modules"]:
        cells = []
        for c in ("paper", "code", "rwkv"):
            r = conv[c]["modules"][name]
            cells += [_fmt(r["mac"]), _fmt(r["ac"])]
        mark = "*" if name in MATMUL_ROWS else " "
        lines.append(f"  {name + mark:<26}" + "".join(f"{x:>10}" for x in cells))
    lines.append("  (* = matmul)")
    lines.append("")
    tr = report["transformer"]
    lines.append(f"same-size Transformer (GPT-style, {tr['n_head']} heads, ctx {tr['ctx_len']}: "
                 f"{tr['mean_keys_per_query']:g} keys per query on average over the window)")
    lines.append(f"  {'module':<26}{'MAC':>10}{'AC':>10}")
    for name, r in conv["transformer"]["modules"].items():
        mark = "*" if name in MATMUL_ROWS else " "
        lines.append(f"  {name + mark:<26}{_fmt(r['mac']):>10}{_fmt(r['ac']):>10}")
    lines.append("")
    e_mac, e_ac = report["e_mac_pj"], report["e_ac_pj"]
    lines.append(f"energy per token (E_MAC = {e_mac:g} pJ, E_AC = {e_ac:g} pJ)")
    lines.append(f"  {'model / convention':<30}{'MAC':>10}{'AC':>10}{'energy':>12}{'matmul only':>13}{'vs Transf.':>11}")
    ref = conv["transformer"]["total"]["energy_pj"]
    this = "SpikeGPT" if cfg["spiking"] else "no-spike model"
    names = {"paper": f"{this} (a) paper", "code": f"{this} (b) code", "rwkv": "RWKV twin (no spikes)",
             "transformer": "Transformer"}
    for c, label in names.items():
        t, m = conv[c]["total"], conv[c]["matmul"]
        lines.append(f"  {label:<30}{_fmt(t['mac']):>10}{_fmt(t['ac']):>10}{_energy(t['energy_pj']):>12}"
                     f"{_energy(m['energy_pj']):>13}{t['energy_pj'] / ref:>10.3f}x")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


# --------------------------------------------------------------------------------------------------
# Pictures.
# --------------------------------------------------------------------------------------------------
_SHOW = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def _token_label(tokenizer, i: int) -> str:
    try:
        s = tokenizer.decode([i])
    except Exception:
        return str(i)
    s = "".join(_SHOW.get(ch, ch if ch.isprintable() else "\u00b7") for ch in s)
    return s if len(s) <= 8 else s[:7] + "\u2026"


def _require_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--raster needs matplotlib: pip install matplotlib") from None
    return plt


@torch.no_grad()
def prompt_spikes(model, ids: list, device=None) -> dict:
    """Spikes of every LIF for one prompt: ``{"att": [(T, C) bool per layer], "ffn": [...],
    "emb": (T, C) bool or None}`` (parallel forward from the zero state)."""
    base = _unwrap(model)
    device = device or next(base.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = base.training
    base.eval()
    with record_spikes(base, raw=True):
        base(idx)
        emb = (base.emb(idx)[0] >= 0).cpu() if base.config.binary_embedding else None
    base.train(was_training)
    out = {"att": [], "ffn": [], "emb": emb}
    for name, _, lif in _branches(base):
        out[name].append(torch.cat([s[0] for s in lif.spike_trace], 0) if lif.spike_trace else None)
    reset_spike_stats(base)
    return out


def plot_raster(model, ids: list, tokenizer, path, layer: int = 0, device=None) -> str:
    """Write a spike raster of ``layer`` for the prompt ``ids`` (tokens on x, neurons on y, one panel
    per branch) to ``path``; returns the path."""
    plt = _require_matplotlib()
    base = _unwrap(model)
    L = base.config.n_layer
    if not -L <= layer < L:
        raise ValueError(f"--raster-layer {layer} is out of range for a {L}-layer model")
    layer = layer % L
    if not base.config.spiking:
        raise ValueError("the model does not spike (spiking=False): there is no raster to draw")
    spikes = prompt_spikes(base, ids, device)
    T, C = len(ids), base.config.n_embd
    width = min(24.0, max(8.0, 0.2 * T + 2.5))
    panel_h = min(7.0, max(2.5, C / 40))
    fig, axes = plt.subplots(2, 1, figsize=(width, 2 * panel_h + 1.2), sharex=True, constrained_layout=True)
    labels = {"att": "TimeMix (att) LIF", "ffn": "ChannelMix (ffn) LIF"}
    for ax, name in zip(axes, ("att", "ffn")):
        s = spikes[name][layer].float().numpy()  # (T, C)
        ax.imshow(s.T, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
                  extent=(-0.5, T - 0.5, C - 0.5, -0.5))
        ax.set_ylabel("neuron (channel)")
        ax.set_title(f"layer {layer} {labels[name]}: {s.mean():.1%} of neurons spike per token "
                     f"({int(s.sum())} spikes, {T} tokens x {C} neurons)", fontsize=10)
    ax = axes[-1]
    if T <= 64:
        labels = [_token_label(tokenizer, i) for i in ids]
        ax.set_xticks(range(T))
        short = max(len(t) for t in labels) * T <= 96  # labels fit side by side
        ax.set_xticklabels(labels, fontsize=8, rotation=0 if short else 90)
        ax.set_xlabel("prompt token (\u2423 = space, \u21b5 = newline)")
    else:
        ax.set_xlabel("token position")
    fig.suptitle(f"Spike raster (black = spike) for a {T}-token prompt", fontsize=11)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return str(path)


def plot_rates(report: dict, path) -> str:
    """Bar chart of the firing rate per layer and branch (+ the embedding's fraction of ones)."""
    plt = _require_matplotlib()
    import numpy as np

    layers = report["firing_rates"]["layers"]
    L = len(layers)
    att = np.array([r.get("att", np.nan) for r in layers], dtype=float)
    ffn = np.array([r.get("ffn", np.nan) for r in layers], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * L + 3), 4), constrained_layout=True)
    x = np.arange(L)
    for offset, values, label in ((-0.2, att, "TimeMix (att) LIF"), (0.2, ffn, "ChannelMix (ffn) LIF")):
        bars = ax.bar(x + offset, values, 0.4, label=label)
        if L <= 24:
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1%}" for v in values], fontsize=7)
    emb = report["firing_rates"]["embedding_ones"]
    if emb is not None:
        ax.axhline(emb, color="k", linestyle="--", linewidth=1, label=f"binary embedding ones ({emb:.1%})")
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x])
    ax.set_xlabel("layer")
    ax.set_ylabel("firing rate (fraction of neurons spiking per token)")
    values = np.concatenate([att, ffn, [emb if emb is not None else np.nan]])
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
    if not np.isfinite(np.concatenate([att, ffn])).any():
        ax.text(0.5, 0.5, "no spikes: the model does not spike (rates n/a)", transform=ax.transAxes,
                ha="center", va="center")
    ax.set_ylim(0, max(0.05, 1.15 * top))
    ax.set_title(f"Firing rates over {report['tokens_analyzed']:,} tokens of {report.get('split', 'the text')}",
                 fontsize=11)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return str(path)


def rates_path(raster_path) -> str:
    from pathlib import Path

    p = Path(raster_path)
    return str(p.with_name(p.stem + "_rates" + (p.suffix or ".png")))


# --------------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """``python -m spikegpt.analyze``: firing rates, operation counts and energy of a model on a split."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from . import ops
    from .checkpoint import CheckpointError, add_model_args, load_args
    from .config import resolve_device
    from .data import DataError, default_corpus_dir, load_meta, load_tokenizer, open_split

    p = argparse.ArgumentParser(prog="python -m spikegpt.analyze", description=main.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--data-dir", help="prepared dataset (default: the built-in corpus)")
    p.add_argument("--split", default="val", help="split to analyse (val, test; 'valid' means val)")
    p.add_argument("--tokens", type=int, default=4096, help="analyse the first N tokens of the split")
    p.add_argument("--window", type=int, default=None, help="tokens per forward pass (default ctx_len); "
                   "the state is carried across windows")
    p.add_argument("--streams", type=int, default=4, help="contiguous parts of the text run side by side")
    p.add_argument("--ctx", type=int, default=None, help="context length of the comparison Transformer "
                   "(default: the model's ctx_len)")
    p.add_argument("--e-mac", type=float, default=E_MAC_45NM, help="energy of one MAC (pJ)")
    p.add_argument("--e-ac", type=float, default=E_AC_45NM, help="energy of one AC (pJ)")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON to this file")
    p.add_argument("--raster", help="write a spike raster PNG for --raster-prompt (and NAME_rates.png)")
    p.add_argument("--raster-prompt", default="The quick brown fox jumps over the lazy dog.",
                   help="prompt for the raster")
    p.add_argument("--raster-layer", type=int, default=0, help="layer shown in the raster (negative: from the end)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--kernels", default="auto", choices=list(ops.BACKENDS), help="WKV/LIF implementation")
    args = p.parse_args(argv)
    try:
        if args.tokens < 1:
            raise ValueError("--tokens must be >= 1")
        if args.raster:
            _require_matplotlib()
        ops.set_backend(args.kernels)
        device = resolve_device(args.device)
        model = load_args(args, device)
        data_dir = args.data_dir or default_corpus_dir()
        split = "val" if args.split == "valid" else args.split
        meta = load_meta(data_dir)
        tokens = open_split(data_dir, split, meta, model.config.vocab_size)
        report = analyze(model, tokens, args.tokens, args.window, args.streams, args.e_mac, args.e_ac,
                         args.ctx, device)
        report.update(split=split, data_dir=str(data_dir), vocab_kind=meta.get("vocab_kind"),
                      checkpoint=str(args.ckpt or args.reference))
        print(format_report(report))
        if args.raster:
            tokenizer = model.tokenizer or load_tokenizer(data_dir)
            ids = list(tokenizer.encode(args.raster_prompt))
            if not ids:
                raise ValueError("--raster-prompt encodes to no tokens")
            if model.config.spiking:
                plot_raster(model, ids, tokenizer, args.raster, args.raster_layer, device)
                print(f"raster: {args.raster}")
            else:
                print("raster: skipped, the model does not spike")
            rp = rates_path(args.raster)
            plot_rates(report, rp)
            print(f"rates:  {rp}")
            report["raster"] = {"path": args.raster if model.config.spiking else None, "rates_path": rp,
                                "prompt": args.raster_prompt, "layer": args.raster_layer}
    except (CheckpointError, DataError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(_to_jsonable(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
