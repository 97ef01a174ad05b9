"""``python -m spikegpt.analyze``: firing rates, spike levels, operation counts, energy estimates and
spike rasters of a model on a split (the report and its plots; recording and the spike statistics are
:mod:`spikegpt.spikes`, the operation model :mod:`spikegpt.energy`).

For every spiking model the report gives per layer and branch the firing rate (share of non-zero
outputs), the share of silent neurons and the effective bits per neuron-token (entropy of the level
distribution); for multi-level neurons (``gif``, ``quant``) also the mean |s| and the level
histogram; and under each spiking convention the synaptic operations per token (sum |s| x fan-out).

CLI: ``python -m spikegpt.analyze --ckpt RUN_OR_FILE [--data-dir DIR] [--split val] [--tokens N]
[--json OUT] [--raster PNG [--raster-prompt TEXT] [--raster-layer L]] [--e-mac 4.6] [--e-ac 0.9]``.
"""
from __future__ import annotations

import math

import torch

from .errors import UserError
from .energy import (E_AC_45NM, E_MAC_45NM, MATMUL_ROWS, count_rwkv, count_transformer, summarize_counts,
                     synaptic_operations, transformer_heads)
from .spikes import (SpikeRates, all_reduce_spike_stats, firing_rates, neuron_branches, record_spikes, reset_spike_stats,
                     spike_stats, spike_summary, unwrap)

__all__ = ["record_spikes", "firing_rates", "spike_stats", "reset_spike_stats", "all_reduce_spike_stats",
           "SpikeRates", "count_rwkv", "count_transformer", "summarize_counts", "analyze", "E_MAC_45NM", "E_AC_45NM",
           "MATMUL_ROWS", "main"]


# --------------------------------------------------------------------------------------------------
# Measurement and report.
# --------------------------------------------------------------------------------------------------
def analyze(model, tokens, n_tokens: int = 4096, window: int | None = None, streams: int = 4,
            e_mac: float = E_MAC_45NM, e_ac: float = E_AC_45NM, ctx_len: int | None = None,
            device=None) -> dict:
    """Run ``model`` over the first ``n_tokens`` (+1) of ``tokens`` (state carried across windows)
    recording spikes, and return the report dict (rates, levels, counts under every convention,
    synaptic operations, energy)."""
    from .evaluate import evaluate_tokens

    from .spikify.convert import input_spike_rows, input_spike_stats, recording_input_spikes

    base = unwrap(model)
    config = base.config
    window = window or config.ctx_len
    with record_spikes(base), recording_input_spikes(base):
        ev = evaluate_tokens(base, tokens, window, carry_state=True, streams=streams, max_tokens=n_tokens,
                             device=device)
    spike_inputs = input_spike_rows(base)  # None unless spikegpt.spikify converted the model
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
                row[b["branch"] + "_mean_abs_s"] = b["mean_abs_s"]
                row[b["branch"] + "_effective_bits"] = b["effective_bits"]
        layers.append(row)
    summary = spike_summary(base) if spiking else None
    levels = None if summary is None else {
        **summary, "branches": [{"branch": b["branch"], "layer": b["layer"], "level_counts": b["level_counts"]}
                                for b in stats["branches"]]}
    conventions = {}
    for conv in ("paper", "code", "rwkv"):
        rows = count_rwkv(config, rates, conv if spiking else "rwkv", spike_inputs if conv == "code" else None)
        conventions[conv] = {"modules": rows, **summarize_counts(rows, e_mac, e_ac),
                             "synops": synaptic_operations(rows) if spiking and conv != "rwkv" else None}
    T = ctx_len or config.ctx_len
    rows = count_transformer(config, T)
    conventions["transformer"] = {"modules": rows, **summarize_counts(rows, e_mac, e_ac), "synops": None}
    notes = []
    if not spiking:
        notes.append("the model does not spike: no firing rates; every convention counts it as the plain RWKV")
    if spike_inputs is not None:
        notes.append("spike-driven linear inputs (spikegpt.spikify): convention (b) counts every projection as "
                     "d_out ACs per input spike step (ACE) plus the MACs of step sizes and real-valued channels")
    if spiking and not config.binary_embedding:
        notes.append("non-binary embedding: layer 0's TimeMix projections stay MACs in the paper convention")
    return {
        "model": {**config.to_dict(), "n_params": base.num_params()},
        "tokens_analyzed": ev["predicted_tokens"], "window": window, "streams": ev["streams"],
        "loss": ev["loss"], "bits_per_token": ev["bits_per_token"],
        "firing_rates": {"embedding_ones": stats["emb"], "layers": layers,
                         **{k: v for k, v in firing_rates(base).items() if k in ("att", "ffn", "all")}},
        "levels": levels,
        "e_mac_pj": e_mac, "e_ac_pj": e_ac,
        "transformer": {"ctx_len": T, "n_head": transformer_heads(config.n_embd),
                        "mean_keys_per_query": (T + 1) / 2},
        "conventions": conventions,
        "input_spikes": input_spike_stats(base) if spike_inputs is not None else None,
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
    multi = cfg.get("neuron", "lif") != "lif" and report.get("levels") is not None
    neuron = cfg.get("neuron", "lif") + (f" L{cfg['levels']} {cfg['polarity']}" if multi else "")
    lines = [f"model: L{cfg['n_layer']} C{cfg['n_embd']} V{cfg['vocab_size']} ({cfg['n_params']:,} params, "
             f"spiking={cfg['spiking']}, neuron={neuron}, binary_embedding={cfg['binary_embedding']}); "
             f"{report['tokens_analyzed']:,} tokens, loss {report['loss']:.4f} "
             f"({report['bits_per_token']:.4f} bits/token)", ""]
    fr = report["firing_rates"]
    lines.append("firing rates (fraction of neurons spiking per token; silent = share of neurons that never spiked; "
                 "bits = effective bits per neuron-token, the entropy of the spike levels"
                 + ("; |s| = mean spike count magnitude per neuron-token)" if multi else ")"))
    lines.append(f"  binary embedding, fraction of ones: {_rate(fr['embedding_ones'])}")
    extra = [("att_effective_bits", "att bits"), ("ffn_effective_bits", "ffn bits")]
    extra += [("att_mean_abs_s", "att |s|"), ("ffn_mean_abs_s", "ffn |s|")] if multi else []
    lines.append(f"  {'layer':>5}  {'att':>7}  {'ffn':>7}  {'att silent':>10}  {'ffn silent':>10}"
                 + "".join(f"  {label:>8}" for _, label in extra))
    for row in fr["layers"]:
        lines.append(f"  {row['layer']:>5}  {_rate(row.get('att')):>7}  {_rate(row.get('ffn')):>7}  "
                     f"{_rate(row.get('att_silent')):>10}  {_rate(row.get('ffn_silent')):>10}"
                     + "".join(f"  {_rate(row.get(key)):>8}" for key, _ in extra))
    if "all" in fr:
        lines.append(f"  {'mean':>5}  {_rate(fr.get('att')):>7}  {_rate(fr.get('ffn')):>7}")
    lv = report.get("levels")
    if lv is not None:
        lines.append(f"  all branches: firing rate {_rate(lv['firing_rate'])}, "
                     + (f"mean |s| {_rate(lv['mean_abs_s'])}, " if multi else "")
                     + f"effective bits {_rate(lv['effective_bits'])} (mean over branches; at most "
                     f"log2 {len(lv['levels'])} = {math.log2(len(lv['levels'])):.3g})")
    if multi:
        lines.append("")
        lines.append("spike levels (share of neuron-tokens emitting each spike count s)")
        lines.append(f"  {'branch':>7}" + "".join(f"{'s=' + str(v):>8}" for v in lv["levels"]))
        for b in lv["branches"] + [{"branch": "all", "layer": None, "level_counts": lv["level_counts"]}]:
            name = b["branch"] if b["layer"] is None else f"{b['branch']}.{b['layer']}"
            counts = b["level_counts"] or [None] * len(lv["levels"])
            total = sum(c or 0 for c in counts)
            lines.append(f"  {name:>7}" + "".join(f"{_rate(None if c is None else c / total):>8}" for c in counts))
    lines.append("")
    conv = report["conventions"]
    lines.append("operations per token, summed over layers: (a) paper = projections as spike-driven ACs at the "
                 "measured rate" + (" (mean |s|: a spike count s is |s| accumulates)" if multi else "")
                 + "; (b) code = what is computed (matmuls read real values: MAC); RWKV = non-spiking twin")
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
    if conv["paper"].get("synops") is not None:
        lines.append("synaptic operations per token (the ACs that spikes drive, sum |s| x fan-out): "
                     f"(a) paper {_fmt(conv['paper']['synops'])}, (b) code {_fmt(conv['code']['synops'])}")
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
        raise UserError("--raster needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from None
    return plt


def _savefig(fig, path) -> None:
    """Write a figure atomically, in the format its name ends with (PNG without a suffix), and close it."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from .fileio import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:].lower() or "png", dpi=130))
    plt.close(fig)


@torch.no_grad()
def prompt_spikes(model, ids: list, device=None) -> dict:
    """Spikes of every neuron for one prompt: ``{"att": [(T, C) per layer: bool for lif, int8 spike
    counts otherwise], "ffn": [...], "emb": (T, C) bool or None}`` (parallel forward from the zero state)."""
    base = unwrap(model)
    device = device or next(base.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = base.training
    base.eval()
    with record_spikes(base, raw=True):
        base(idx)
        emb = (base.emb(idx)[0] >= 0).cpu() if base.config.binary_embedding else None
    base.train(was_training)
    out = {"att": [], "ffn": [], "emb": emb}
    for name, _, lif in neuron_branches(base):
        out[name].append(torch.cat([s[0] for s in lif.spike_trace], 0) if lif.spike_trace else None)
    reset_spike_stats(base)
    return out


def plot_raster(model, ids: list, tokenizer, path, layer: int = 0, device=None) -> str:
    """Write a spike raster of ``layer`` for the prompt ``ids`` (tokens on x, neurons on y, one panel
    per branch; multi-level neurons shaded by spike count) to ``path``; returns the path."""
    plt = _require_matplotlib()
    base = unwrap(model)
    L = base.config.n_layer
    if not -L <= layer < L:
        raise ValueError(f"--raster-layer {layer} is out of range for a {L}-layer model")
    layer = layer % L
    if not base.config.spiking:
        raise ValueError("the model does not spike (spiking=False): there is no raster to draw")
    spikes = prompt_spikes(base, ids, device)
    T, C = len(ids), base.config.n_embd
    values = neuron_branches(base)[0][2].level_values
    lo, hi, binary = min(values), max(values), tuple(values) == (0, 1)
    width = min(24.0, max(8.0, 0.2 * T + 2.5))
    panel_h = min(7.0, max(2.5, C / 40))
    fig, axes = plt.subplots(2, 1, figsize=(width, 2 * panel_h + 1.2), sharex=True, constrained_layout=True)
    kind = base.config.neuron.upper()
    labels = {"att": f"TimeMix (att) {kind}", "ffn": f"ChannelMix (ffn) {kind}"}
    for ax, name in zip(axes, ("att", "ffn")):
        s = spikes[name][layer].float().numpy()  # (T, C)
        im = ax.imshow(s.T, aspect="auto", interpolation="nearest", cmap="RdBu_r" if lo < 0 else "Greys",
                       vmin=lo, vmax=hi, extent=(-0.5, T - 0.5, C - 0.5, -0.5))
        ax.set_ylabel("neuron (channel)")
        counted = f"{int(s.sum())} spikes" if binary else f"{int(abs(s).sum())} events |s|"
        ax.set_title(f"layer {layer} {labels[name]}: {(s != 0).mean():.1%} of neurons spike per token "
                     f"({counted}, {T} tokens x {C} neurons)", fontsize=10)
        if not binary:
            fig.colorbar(im, ax=ax, label="spike count s", ticks=list(values) if len(values) <= 9 else None)
    ax = axes[-1]
    if T <= 64:
        labels = [_token_label(tokenizer, i) for i in ids]
        ax.set_xticks(range(T))
        short = max(len(t) for t in labels) * T <= 96  # labels fit side by side
        ax.set_xticklabels(labels, fontsize=8, rotation=0 if short else 90)
        ax.set_xlabel("prompt token (\u2423 = space, \u21b5 = newline)")
    else:
        ax.set_xlabel("token position")
    shading = "black = spike" if binary else "shade = spike count"
    fig.suptitle(f"Spike raster ({shading}) for a {T}-token prompt", fontsize=11)
    _savefig(fig, path)
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
    kind = report["model"].get("neuron", "lif").upper()
    for offset, values, label in ((-0.2, att, f"TimeMix (att) {kind}"), (0.2, ffn, f"ChannelMix (ffn) {kind}")):
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
    _savefig(fig, path)
    return str(path)


def plot_levels(report: dict, path) -> str:
    """Heat map of the level histogram: one row per layer and branch (+ all branches), one column
    per spike count, shaded and labelled by the share of neuron-tokens (a multi-level model's report)."""
    plt = _require_matplotlib()
    import numpy as np

    lv = report["levels"]
    names = [f"{b['branch']}.{b['layer']}" for b in lv["branches"]] + ["all"]
    counts = [b["level_counts"] or [0] * len(lv["levels"]) for b in lv["branches"]] + [lv["level_counts"]]
    share = np.array([np.array(c, dtype=float) / max(sum(c), 1) for c in counts])
    K, R = len(lv["levels"]), len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * K + 2.5), max(3.0, 0.3 * R + 1.6)), constrained_layout=True)
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    if K * R <= 400:
        for i in range(R):
            for j in range(K):
                ax.text(j, i, f"{share[i, j]:.0%}" if share[i, j] >= 0.005 else "", ha="center", va="center",
                        fontsize=7, color="white" if share[i, j] < 0.6 else "black")
    ax.set_xticks(range(K))
    ax.set_xticklabels([str(v) for v in lv["levels"]])
    ax.set_yticks(range(R))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("spike count s")
    fig.colorbar(im, ax=ax, label="share of neuron-tokens")
    ax.set_title(f"Spike levels over {report['tokens_analyzed']:,} tokens\nfiring rate {lv['firing_rate']:.1%}, "
                 f"mean |s| {lv['mean_abs_s']:.3f}, {lv['effective_bits']:.2f} effective bits", fontsize=10)
    _savefig(fig, path)
    return str(path)


def rates_path(raster_path, suffix: str = "_rates") -> str:
    from pathlib import Path

    p = Path(raster_path)
    return str(p.with_name(p.stem + suffix + (p.suffix or ".png")))


# --------------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------------
def build_parser():
    from . import cli
    p = cli.new_parser("python -m spikegpt.analyze",
                       "Firing rates, operation counts and energy of a model on a split.")
    cli.add_model_args(p)
    p.add_argument("--data-dir", help="prepared dataset (default: the built-in corpus)")
    cli.add_split_arg(p, help="split to analyse")
    p.add_argument("--tokens", type=cli.positive_int, default=4096, help="analyse the first N tokens of the split")
    p.add_argument("--window", type=cli.positive_int, default=None, help="tokens per forward pass (default "
                   "ctx_len); the state is carried across windows")
    p.add_argument("--streams", type=cli.positive_int, default=4, help="contiguous parts of the text run side by side")
    p.add_argument("--ctx", type=cli.positive_int, default=None, help="context length of the comparison "
                   "Transformer (default: the model's ctx_len)")
    p.add_argument("--e-mac", type=cli.nonneg_float, default=E_MAC_45NM, help="energy of one MAC (pJ)")
    p.add_argument("--e-ac", type=cli.nonneg_float, default=E_AC_45NM, help="energy of one AC (pJ)")
    cli.add_json_arg(p)
    p.add_argument("--raster", help="write a spike raster PNG for --raster-prompt (and NAME_rates.png; "
                   "NAME_levels.png for multi-level neurons)")
    p.add_argument("--raster-prompt", default="The quick brown fox jumps over the lazy dog.",
                   help="prompt for the raster")
    p.add_argument("--raster-layer", type=int, default=0, help="layer shown in the raster (negative: from the end)")
    cli.add_device_arg(p)
    cli.add_kernels_arg(p)
    cli.add_threads_arg(p)
    return p


def run(args) -> None:
    from . import cli
    from .data import default_corpus_dir, load_meta, load_tokenizer, open_split

    if args.raster:
        _require_matplotlib()
    device = cli.setup_runtime(args)
    model = cli.load_model(args, device, need_tokenizer=False)
    if args.raster and not -model.config.n_layer <= args.raster_layer < model.config.n_layer:
        raise UserError(f"--raster-layer {args.raster_layer} is outside the model's {model.config.n_layer} "
                        f"layers: pass a layer in [-{model.config.n_layer}, {model.config.n_layer - 1}]")
    data_dir = args.data_dir or default_corpus_dir()
    meta = load_meta(data_dir)
    cli.check_data_matches(model, meta, data_dir)
    tokens = open_split(data_dir, args.split, meta, model.config.vocab_size)
    if len(tokens) < 2:
        raise cli.UserError(f"the {args.split} split of {data_dir} has fewer than 2 tokens: prepare more text")
    report = analyze(model, tokens, args.tokens, args.window, args.streams, args.e_mac, args.e_ac,
                     args.ctx, device)
    report.update(split=args.split, data_dir=str(data_dir), vocab_kind=meta.get("vocab_kind"),
                  checkpoint=str(args.ckpt or args.reference))
    print(format_report(report))
    if args.raster:
        tokenizer = model.tokenizer or load_tokenizer(data_dir)
        ids = list(tokenizer.encode(args.raster_prompt, **({"errors": "unk"} if tokenizer.kind == "char" else {})))
        if not ids:
            raise cli.UserError("--raster-prompt encodes to no tokens: pass a non-empty prompt")
        if model.config.spiking:
            plot_raster(model, ids, tokenizer, args.raster, args.raster_layer, device)
            print(f"raster: {args.raster}")
        else:
            print("raster: skipped, the model does not spike")
        rp = rates_path(args.raster)
        plot_rates(report, rp)
        print(f"rates:  {rp}")
        lp = None
        if model.config.spiking and model.config.neuron != "lif":
            lp = plot_levels(report, rates_path(args.raster, "_levels"))
            print(f"levels: {lp}")
        report["raster"] = {"path": args.raster if model.config.spiking else None, "rates_path": rp,
                            "levels_path": lp, "prompt": args.raster_prompt, "layer": args.raster_layer}
    if args.json_out:
        cli.write_json(args.json_out, _to_jsonable(report))


def main(argv=None) -> int:
    """``python -m spikegpt.analyze``: firing rates, operation counts and energy of a model on a split."""
    from .cli import run_cli
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
