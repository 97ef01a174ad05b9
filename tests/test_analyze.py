"""Spike analytics: recording, firing rates, hand-checked operation counts, CLI and pictures."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spikegpt import ModelConfig, SpikeGPT
from spikegpt import model as model_module
from spikegpt.analyze import (SpikeRates, analyze, count_rwkv, count_transformer, firing_rates, format_report,
                              record_spikes, summarize_counts)
from spikegpt.energy import synaptic_operations
from spikegpt.spikes import entropy_bits, level_stats, spike_stats, spike_summary
from spikegpt.checkpoint import save_model
from spikegpt.data import prepare_splits

# ---------------------------------------------------------------------------------------------------
# Counting, by hand.  Tiny config: L = 2, C = 4, F = 4C = 16, V = 10.
# Rates: rho_emb = 0.5, rho_att = [0.25, 0.5], rho_ffn = [0.75, 0.25].
# ---------------------------------------------------------------------------------------------------
TINY = ModelConfig(vocab_size=10, n_layer=2, n_embd=4, ctx_len=7)
RATES = SpikeRates(emb=0.5, att=[0.25, 0.5], ffn=[0.75, 0.25])

# (b) code convention, per token, summed over the 2 layers:  module: (MAC, AC)
CODE = {
    "embedding": (0, 0),                     # table read
    "layernorm": (72, 48),                   # (2L+2)=6 LNs: 6*3C = 72 MAC, 6*2C = 48 AC
    "att.shift_mix": (48, 0),                # L*3*2C = 2*3*8
    "att.key_value_receptance": (96, 0),     # L*3C^2 = 2*3*16
    "att.wkv": (88, 64),                     # L*11C = 88, L*8C = 64
    "att.gate": (16, 0),                     # L*2C
    "att.output": (32, 0),                   # L*C^2
    "att.lif": (8, 16),                      # L*C, L*2C
    "att.residual": (0, 3),                  # C*(0.25+0.5) = 3 spikes added
    "ffn.shift_mix": (32, 0),                # L*2*2C
    "ffn.key": (128, 0),                     # L*C*F = 2*64
    "ffn.relu_square": (32, 32),             # L*F, L*F
    "ffn.receptance": (32, 0),               # L*C^2
    "ffn.value": (128, 0),                   # L*F*C
    "ffn.gate": (16, 0),                     # L*2C
    "ffn.lif": (8, 16),                      # L*C, L*2C
    "ffn.residual": (0, 4),                  # C*(0.75+0.25) = 4
    "head": (40, 0),                         # V*C
}
# Totals: MAC 72+48+96+88+16+32+8+32+128+32+32+128+16+8+40 = 776; AC 48+64+16+3+32+16+4 = 183.
# Energy (4.6, 0.9): 776*4.6 + 183*0.9 = 3569.6 + 164.7 = 3734.3 pJ.

# (a) paper: projections become ACs at the input spike rate.  TimeMix inputs: layer 0 the embedding
# (0.5), layer 1 layer 0's ffn (0.75); ChannelMix inputs: the same layer's att (0.25, 0.5); head: the
# last ffn (0.25).
PAPER_MATMUL = {
    "att.key_value_receptance": (0, 60),     # 48*0.5 + 48*0.75 = 24 + 36
    "att.output": (0, 20),                   # 16*0.5 + 16*0.75 = 8 + 12
    "ffn.key": (0, 48),                      # 64*0.25 + 64*0.5 = 16 + 32
    "ffn.receptance": (0, 12),               # 16*0.25 + 16*0.5 = 4 + 8
    "ffn.value": (0, 48),                    # as ffn.key
    "head": (0, 10),                         # 40*0.25
}
# Totals: MAC 776 - 456 = 320; AC 183 + 198 = 381; energy 320*4.6 + 381*0.9 = 1472 + 342.9 = 1814.9 pJ.
# Matmul-only: 198 AC -> 178.2 pJ.

# Transformer, ctx 7 -> t_bar = 4 keys per query; H = max(1, 4 // 64) = 1 head.
TRANSFORMER = {
    "embedding": (0, 4),                     # position add: C
    "layernorm": (60, 40),                   # (2L+1)=5 LNs: 5*12, 5*8
    "attn.qkv": (96, 0),                     # L*3C^2
    "attn.scale": (8, 0),                    # L*C
    "attn.scores": (32, 0),                  # L*t_bar*C = 2*4*4
    "attn.softmax": (16, 16),                # L*H*t_bar*2 = 2*1*4*2 each
    "attn.weighted_sum": (32, 0),            # L*t_bar*C
    "attn.output": (32, 0),                  # L*C^2
    "attn.residual": (0, 8),                 # L*C
    "mlp.fc": (128, 0),                      # L*C*F
    "mlp.gelu": (32, 0),                     # L*F
    "mlp.proj": (128, 0),                    # L*F*C
    "mlp.residual": (0, 8),                  # L*C
    "head": (40, 0),                         # V*C
}
# Totals: MAC 60+96+8+32+16+32+32+128+32+128+40 = 604; AC 40+4+16+8+8 = 76.


def as_pairs(rows):
    return {k: (v["mac"], v["ac"]) for k, v in rows.items()}


def flat(pairs):
    """``{name: (mac, ac)}`` as ``{"name/mac": mac, "name/ac": ac}``: ``pytest.approx`` of every release
    compares flat dicts of numbers (9.x rejects dicts whose values are tuples)."""
    return {f"{k}/{unit}": x for k, v in pairs.items() for unit, x in zip(("mac", "ac"), v)}


def test_code_convention_by_hand():
    rows = count_rwkv(TINY, RATES, "code")
    assert flat(as_pairs(rows)) == pytest.approx(flat(CODE))
    s = summarize_counts(rows, 4.6, 0.9)
    assert s["total"]["mac"] == 776 and s["total"]["ac"] == pytest.approx(183)
    assert s["total"]["energy_pj"] == pytest.approx(3734.3)
    assert s["matmul"]["mac"] == 456 and s["matmul"]["ac"] == 0


def test_paper_convention_by_hand():
    rows = as_pairs(count_rwkv(TINY, RATES, "paper"))
    expected = {**CODE, **PAPER_MATMUL}
    assert flat(rows) == pytest.approx(flat(expected))
    s = summarize_counts(count_rwkv(TINY, RATES, "paper"), 4.6, 0.9)
    assert s["total"]["mac"] == 320 and s["total"]["ac"] == pytest.approx(381)
    assert s["total"]["energy_pj"] == pytest.approx(1814.9)
    assert s["matmul"]["energy_pj"] == pytest.approx(178.2)


def test_rwkv_twin_by_hand():
    rows = as_pairs(count_rwkv(TINY, None, "rwkv"))
    # No LIF; dense residual adds of real values: L*C = 8 AC per branch.
    expected = {**CODE, "att.lif": (0, 0), "ffn.lif": (0, 0), "att.residual": (0, 8), "ffn.residual": (0, 8)}
    assert flat(rows) == pytest.approx(flat(expected))
    s = summarize_counts(count_rwkv(TINY, None, "rwkv"), 4.6, 0.9)
    assert s["total"]["mac"] == 760 and s["total"]["ac"] == 160  # 776-16 MAC; 48+64+8+32+8 AC


def test_transformer_by_hand():
    rows = count_transformer(TINY, ctx_len=7)
    assert flat(as_pairs(rows)) == pytest.approx(flat(TRANSFORMER))
    s = summarize_counts(rows, 4.6, 0.9)
    assert s["total"]["mac"] == 604 and s["total"]["ac"] == 76
    assert s["total"]["energy_pj"] == pytest.approx(604 * 4.6 + 76 * 0.9)


def test_code_matmuls_are_the_weight_matrices():
    # 45M preset shape: every weight matrix but the embedding is read once per token: L*13C^2 + VC.
    cfg = ModelConfig(vocab_size=256, n_layer=12, n_embd=512)
    s = summarize_counts(count_rwkv(cfg, None, "rwkv"))
    assert s["matmul"]["mac"] == 12 * 13 * 512 * 512 + 256 * 512 == 41_025_536
    assert s["matmul"]["mac"] == cfg.n_params - 256 * 512 - 12 * 11 * 512 - 4 * 512


def test_spiking_conventions_need_rates():
    with pytest.raises(ValueError, match="rates"):
        count_rwkv(TINY, None, "code")


# Multi-level spikes: the same firing rates, mean |s| att [0.5, 1.0], ffn [1.5, 0.5].  A spike count s
# drives |s| accumulates: the residual adds and, in (a), the projections count mean |s|, not the rate.
RATES_ABS = SpikeRates(emb=0.5, att=[0.25, 0.5], ffn=[0.75, 0.25], att_abs=[0.5, 1.0], ffn_abs=[1.5, 0.5])
CODE_ABS = {**CODE, "att.residual": (0, 6),  # C*(0.5+1.0)
            "ffn.residual": (0, 8)}  # C*(1.5+0.5)
PAPER_ABS = {**CODE_ABS,
             "att.key_value_receptance": (0, 96),  # 48*0.5 (embedding) + 48*1.5 (layer 0's ffn |s|)
             "att.output": (0, 32),  # 16*0.5 + 16*1.5
             "ffn.key": (0, 96),  # 64*0.5 + 64*1.0 (the same layer's att |s|)
             "ffn.receptance": (0, 24),  # 16*0.5 + 16*1.0
             "ffn.value": (0, 96),  # as ffn.key
             "head": (0, 20)}  # 40*0.5 (the last ffn |s|)


def test_multi_level_counts_weight_spikes_by_magnitude():
    assert flat(as_pairs(count_rwkv(TINY, RATES_ABS, "code"))) == pytest.approx(flat(CODE_ABS))
    assert flat(as_pairs(count_rwkv(TINY, RATES_ABS, "paper"))) == pytest.approx(flat(PAPER_ABS))
    # Synaptic operations: the spike-driven ACs, sum |s| x fan-out.
    assert synaptic_operations(count_rwkv(TINY, RATES_ABS, "code")) == pytest.approx(6 + 8)
    assert synaptic_operations(count_rwkv(TINY, RATES_ABS, "paper")) == pytest.approx(96 + 32 + 96 + 24 + 96 + 20 + 14)
    # Binary spikes: mean |s| is the rate, and the counts are those of the rates alone.
    lif = SpikeRates(emb=0.5, att=RATES.att, ffn=RATES.ffn, att_abs=list(RATES.att), ffn_abs=list(RATES.ffn))
    for conv in ("code", "paper"):
        assert count_rwkv(TINY, lif, conv) == count_rwkv(TINY, RATES, conv)
    assert synaptic_operations(count_rwkv(TINY, RATES, "paper")) == pytest.approx(198 + 3 + 4)
    with pytest.raises(ValueError, match="mean"):
        count_rwkv(TINY, SpikeRates(emb=0.5, att=RATES.att, ffn=RATES.ffn, att_abs=[0.5, None]), "code")


def test_entropy_bits_of_hand_made_histograms():
    assert entropy_bits([2, 1, 1, 0]) == pytest.approx(1.5)  # p = 1/2, 1/4, 1/4: 1/2*1 + 2*(1/4*2)
    assert entropy_bits([7, 0, 0]) == 0.0  # one level used: no information
    assert entropy_bits([3, 3]) == pytest.approx(1.0)
    assert entropy_bits(torch.tensor([5] * 8)) == pytest.approx(3.0)  # uniform over 8 levels: log2 8
    assert entropy_bits([1, 3]) == pytest.approx(-(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75)))


# ---------------------------------------------------------------------------------------------------
# Recording.
# ---------------------------------------------------------------------------------------------------
def spiky_model(seed=0, **kw):
    """A tiny model whose LIF neurons do fire (amplified branch outputs)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_embd=16, ctx_len=16, **kw)
    m = SpikeGPT(cfg).eval()
    with torch.no_grad():
        for block in m.blocks:
            block.att.output.weight.mul_(8.0)
            block.ffn.value.weight.mul_(8.0)
    return m


def test_firing_rates_equal_manual_count(monkeypatch):
    m = spiky_model()
    idx = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    seen = []
    real_lif = model_module.ops.lif

    def spy(*args, **kwargs):
        out = real_lif(*args, **kwargs)
        seen.append(out[0].detach().clone())
        return out

    monkeypatch.setattr(model_module.ops, "lif", spy)
    with record_spikes(m):
        m(idx[:, :12])
        m(idx[:, 12:])  # a second call: the rates accumulate over both
    rates = firing_rates(m)
    # Calls are in order: (call 1: att0, ffn0, att1, ffn1), (call 2: att0, ffn0, att1, ffn1).
    assert len(seen) == 8
    for i, key in enumerate(["att.0", "ffn.0", "att.1", "ffn.1"]):
        spikes = float(seen[i].sum() + seen[i + 4].sum())
        neurons_x_tokens = seen[i].numel() + seen[i + 4].numel()  # 3*12*16 + 3*8*16
        assert neurons_x_tokens == 960
        assert rates[key] == pytest.approx(spikes / neurons_x_tokens, abs=1e-12)
    assert 0 < rates["all"] < 1
    emb = (m.emb(idx) >= 0).double().mean().item()
    assert rates["emb"] == pytest.approx(emb, abs=1e-12)
    assert rates["att"] == pytest.approx((rates["att.0"] + rates["att.1"]) / 2)


def test_recording_off_by_default_and_harmless():
    m = spiky_model()
    idx = torch.randint(0, 256, (2, 10))
    m.train(False)
    plain = m(idx)
    assert firing_rates(m) == {} and all(b.lif1.spike_counts is None for b in m.blocks)
    with record_spikes(m):
        recorded = m(idx)
    assert torch.equal(plain, recorded)
    assert all(b.lif1.record is None and b.lif2.record is None for b in m.blocks)
    assert not m.emb._forward_hooks
    # Gradients flow unchanged while recording (training mode, no dropout).
    m.train()
    for b in m.blocks:
        b.dropout.p = 0.0
    g = []
    for rec in (False, True):
        m.zero_grad()
        with record_spikes(m) if rec else torch.enable_grad():
            m(idx, targets=idx)[1].backward()
        g.append(m.emb.weight.grad.clone())
    assert torch.equal(g[0], g[1])


def test_no_spike_model_has_no_rates_and_counts_all_macs():
    m = spiky_model(spiking=False, binary_embedding=False)
    report = analyze(m, np.arange(300) % 256, n_tokens=40)
    assert firing_rates(m) == {}
    assert report["firing_rates"]["embedding_ones"] is None
    assert all("att" not in row for row in report["firing_rates"]["layers"])
    conv = report["conventions"]
    assert conv["paper"]["total"] == conv["code"]["total"] == conv["rwkv"]["total"]
    assert conv["paper"]["matmul"]["ac"] == 0


def test_lif_statistics_are_binary_and_its_counts_use_the_rates():
    m = spiky_model()
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(3))
    with record_spikes(m):
        m(idx)
    rates = SpikeRates.from_model(m)
    assert rates.att_abs == rates.att and rates.ffn_abs == rates.ffn  # |s| = 1 at every spike
    for b in spike_stats(m)["branches"]:
        r = b["rate"]
        assert b["level_counts"] == [3 * 16 * 16 - round(r * 3 * 16 * 16), round(r * 3 * 16 * 16)]
        assert b["effective_bits"] == pytest.approx(-(r * np.log2(r) + (1 - r) * np.log2(1 - r)))
    assert level_stats(m) == {}  # training logs no extra statistics for binary spikes
    assert count_rwkv(m.config, rates, "paper") == count_rwkv(
        m.config, SpikeRates(emb=rates.emb, att=rates.att, ffn=rates.ffn), "paper")


def test_gif_statistics_and_synaptic_operations_of_known_spike_counts(monkeypatch):
    """Every neuron's spike counts are imposed: TimeMix s = 2 on even channels and 0 on odd ones (rate
    1/2, mean |s| 1, 1 bit), ChannelMix s = -2 on the first quarter of the channels (rate 1/4, mean
    |s| 1/2, H(1/4) bits); the embedding is real-valued, so layer 0's TimeMix projections stay MACs."""
    m = spiky_model(neuron="gif", levels=2, polarity="bipolar", binary_embedding=False)
    C, F, V = 16, 64, 256
    att_s = torch.tensor([2.0, 0.0] * (C // 2))
    ffn_s = torch.tensor([-2.0] * (C // 4) + [0.0] * (3 * C // 4))
    real_gif, calls = model_module.ops.gif, []

    def imposed(x, v0, theta, *args):
        y, v = real_gif(x, v0, theta, *args)
        calls.append(None)
        return theta * (att_s if len(calls) % 2 else ffn_s).expand_as(y), v  # calls: att0, ffn0, att1, ffn1

    monkeypatch.setattr(model_module.ops, "gif", imposed)
    report = analyze(m, np.arange(300) % 256, n_tokens=40, streams=2)
    h_quarter = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    for row in report["firing_rates"]["layers"]:
        assert (row["att"], row["att_mean_abs_s"], row["att_effective_bits"]) == pytest.approx((0.5, 1.0, 1.0))
        assert (row["ffn"], row["ffn_mean_abs_s"], row["ffn_effective_bits"]) == pytest.approx((0.25, 0.5, h_quarter))
    lv = report["levels"]
    n = lv["branches"][0]["level_counts"][2] * 2  # neuron-tokens per branch
    assert lv["levels"] == [-2, -1, 0, 1, 2] and n == 40 * C
    assert lv["level_counts"] == [2 * n // 4, 0, 2 * n // 2 + 2 * 3 * n // 4, 0, 2 * n // 2]
    expected = (0.375, 0.75, (1 + h_quarter) / 2)  # pooled rate and |s|; bits: the mean over branches
    assert (lv["firing_rate"], lv["mean_abs_s"], lv["effective_bits"]) == pytest.approx(expected)
    # (b): the residual adds, C * mean |s| per layer and branch.
    assert report["conventions"]["code"]["synops"] == pytest.approx(2 * C * 1.0 + 2 * C * 0.5)
    # (a): also every spike-driven projection, fan-in * fan-out * mean |s| of its input spikes.
    paper = (3 * C * C + C * C) * 0.5  # layer 1's TimeMix reads layer 0's ChannelMix spikes
    paper += 2 * (C * F + C * C + F * C) * 1.0  # both ChannelMix branches read TimeMix spikes
    paper += V * C * 0.5  # the head reads the last ChannelMix spikes
    assert report["conventions"]["paper"]["synops"] == pytest.approx(paper + 2 * C * 1.0 + 2 * C * 0.5)
    assert report["conventions"]["paper"]["modules"]["att.key_value_receptance"]["mac"] == 3 * C * C  # layer 0
    assert report["conventions"]["rwkv"]["synops"] is None
    text = format_report(report)
    assert "spike levels" in text and "s=-2" in text and "att |s|" in text and "synaptic operations" in text
    assert level_stats(m)["effective_bits/ffn.1"] == pytest.approx(h_quarter)
    assert level_stats(m, "train_")["train_mean_abs_s/all"] == pytest.approx(0.75)
    assert spike_summary(m)["level_counts"] == lv["level_counts"]


# ---------------------------------------------------------------------------------------------------
# CLI and pictures.
# ---------------------------------------------------------------------------------------------------
TEXT = ("The spiking neurons of SpikeGPT fire when their membrane crosses the threshold. " * 40)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze")
    prepare_splits(TEXT, d / "data", vocab="byte")
    save_model(d / "model.pt", spiky_model())
    return d


def test_cli_smoke(run_files):
    out = run_files / "report.json"
    r = subprocess.run([sys.executable, "-m", "spikegpt.analyze", "--ckpt", str(run_files / "model.pt"),
                        "--data-dir", str(run_files / "data"), "--split", "valid", "--tokens", "100",
                        "--json", str(out), "--e-mac", "5", "--e-ac", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "firing rates" in r.stdout and "energy per token" in r.stdout and "Transformer" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["split"] == "val" and rep["tokens_analyzed"] == 100
    assert set(rep["conventions"]) == {"paper", "code", "rwkv", "transformer"}
    code = rep["conventions"]["code"]["total"]
    assert code["energy_pj"] == pytest.approx(code["mac"] * 5 + code["ac"] * 1)
    assert len(rep["firing_rates"]["layers"]) == 2 and rep["firing_rates"]["layers"][0]["att"] > 0


def test_raster(run_files, capsys):
    pytest.importorskip("matplotlib")
    from spikegpt.analyze import main

    png = run_files / "raster.png"
    rc = main(["--ckpt", str(run_files / "model.pt"), "--data-dir", str(run_files / "data"), "--tokens", "50",
               "--raster", str(png), "--raster-prompt", "fire when", "--raster-layer", "-1"])
    assert rc == 0, capsys.readouterr().err
    assert png.stat().st_size > 1000 and (run_files / "raster_rates.png").stat().st_size > 1000


def test_gif_report_end_to_end(run_files, capsys):
    from spikegpt.analyze import main

    save_model(run_files / "gif.pt", spiky_model(neuron="gif", levels=2, polarity="bipolar", v_threshold=0.25))
    out, png = run_files / "gif.json", run_files / "gif_raster.png"
    plot = ["--raster", str(png)] if _has_matplotlib() else []
    rc = main(["--ckpt", str(run_files / "gif.pt"), "--data-dir", str(run_files / "data"), "--tokens", "60",
               "--json", str(out), *plot])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "neuron=gif L2 bipolar" in printed.out and "spike levels" in printed.out
    rep = json.loads(out.read_text())
    lv = rep["levels"]
    assert lv["levels"] == [-2, -1, 0, 1, 2] and sum(lv["level_counts"]) == 60 * 16 * 4  # 4 branches
    assert 0 < lv["firing_rate"] < lv["mean_abs_s"] and 0 < lv["effective_bits"] <= np.log2(5)
    assert rep["conventions"]["paper"]["synops"] > rep["conventions"]["code"]["synops"] > 0
    if plot:
        assert png.stat().st_size > 1000 and (run_files / "gif_raster_levels.png").stat().st_size > 1000
        assert rep["raster"]["levels_path"] == str(run_files / "gif_raster_levels.png")


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
