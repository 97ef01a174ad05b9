"""Spike-driven linear layers (spikegpt.spikify): the encoding, saliency, conversion, recurrent parity, CLI."""
import json

import pytest
import torch

from spikegpt import ModelConfig, SpikeGPT
from spikegpt.checkpoint import load, save_model
from spikegpt.data import prepare_splits
from spikegpt.spikify.convert import (calibration_batches, finetune_thresholds, input_spike_rows, is_converted,
                                      recording_input_spikes, spikify)
from spikegpt.spikify.encoding import InputEncoder, SpikifyConfig, per_step_max, spike_train
from spikegpt.spikify.saliency import InputStats, calibrate, linear_layers, saliency, salient_mask

CFG = ModelConfig(vocab_size=256, n_layer=2, n_embd=16, ctx_len=8)


def tiny_model(spiking=True, seed=0, **neuron):
    torch.manual_seed(seed)
    cfg = CFG if spiking else ModelConfig(**{**CFG.to_dict(), "spiking": False, "binary_embedding": False})
    cfg = ModelConfig(**{**cfg.to_dict(), **neuron}) if neuron else cfg
    m = SpikeGPT(cfg)
    with torch.no_grad():  # trained-looking weights: large enough that the LIFs fire
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 * (3 if "emb" not in name else 1))
    return m.eval()


def random_batches(n=3, B=4, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (B, T + 1), generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# The neuron and the quantizer.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("a", [0, 1, 2, 3])
def test_every_integer_round_trips(b, a):
    qmax, steps = 2 ** (b + a) - 1, 2 ** a
    M = per_step_max(qmax, steps)
    q = torch.arange(qmax + 1)
    c = spike_train(q, steps, M)
    assert c.shape == (qmax + 1, steps)
    assert torch.equal(c.sum(-1), q) and c.min() >= 0 and c.max() <= M
    assert M == (2 ** b if a else 2 ** b - 1)  # 2^b + 1 levels per salient step, 2^b per ordinary step
    if a:  # with 2^b - 1 spikes per step the largest integers would be lost (SpikeLLM's encoding)
        short = spike_train(q, steps, 2 ** b - 1).sum(-1)
        assert short[-1] < qmax and torch.equal(short[: steps * (2 ** b - 1) + 1], q[: steps * (2 ** b - 1) + 1])


def test_encoded_value_is_offset_plus_step_times_spikes():
    enc = InputEncoder(4)
    sal = torch.tensor([False, True, False, False])
    enc.configure(sal, bits=2, extra_steps=2, lo=torch.full((4,), -1.0), hi=torch.ones(4))
    Q = enc.qmax  # 3 for ordinary channels, 15 for the salient one
    assert Q.tolist() == [3.0, 15.0, 3.0, 3.0] and enc.steps.tolist() == [1, 4, 1, 1]
    for k in range(16):  # every integer of the salient channel's range, the largest included
        x = -1.0 + k * enc.delta
        y = enc(x[None])[0]
        q = torch.minimum(torch.tensor(float(k)), Q)
        spikes = spike_train(q.long(), 4, per_step_max(15, 4)).sum(-1)
        assert torch.equal(y, -1.0 + spikes.float() * enc.delta)


def test_channel_static_saturates():
    enc = InputEncoder(3)
    enc.configure(torch.zeros(3, dtype=torch.bool), bits=3, extra_steps=0, lo=torch.tensor([0.0, -2.0, 1.0]),
                  hi=torch.tensor([1.0, 2.0, 3.0]))
    x = torch.tensor([[5.0, 9.0, 2.0], [-5.0, -9.0, 1.0]])
    y = enc(x)
    assert torch.equal(y[0, :2], torch.tensor([0.0, -2.0]) + 7 * enc.delta[:2])  # above: Q = 7 spikes
    assert torch.equal(y[1, :2], torch.tensor([0.0, -2.0]))  # below: no spike
    assert torch.allclose(y[0, :2], torch.tensor([1.0, -2.0 + 4.0]), atol=1e-6)


def test_token_minmax_ranges_per_group():
    enc = InputEncoder(5)
    sal = torch.tensor([False, False, True, False, False])
    enc.configure(sal, bits=1, extra_steps=1)
    x = torch.tensor([[0.0, 1.0, 100.0, 0.4, 0.6]])
    y = enc(x)
    # ordinary channels: range [0, 1] in 1 bit -> {0, 1}; the outlier channel does not widen it
    assert torch.equal(y[0, [0, 1, 3, 4]], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert y[0, 2] == 100.0  # a one-channel group is exact
    enc.configure(sal, bits=1, extra_steps=1, full_precision=True)
    x = torch.tensor([[0.0, 1.0, 3.14159, 0.4, 0.6]])
    assert enc(x)[0, 2] == 3.14159 and enc.steps.tolist() == [1, 1, 0, 1, 1]


# ---------------------------------------------------------------------------------------------------
# Saliency on a hand-made layer.
# ---------------------------------------------------------------------------------------------------
def test_saliency_rankings_hand_made_layer():
    torch.manual_seed(0)
    C, N = 6, 4000
    W = torch.eye(C)
    W[:, 4] *= 50  # channel 4: largest weight column
    W[:, 2] = W[:, 0] = torch.tensor([0.0, 0, 3, 0, 0, 0])  # channels 0 and 2 share one column
    x = torch.randn(N, C) * 0.1
    x[:, 1] *= 30  # channel 1: largest inputs
    x[:, 0] = x[:, 2] * -2  # ... and anti-correlated with channel 2: W^T W x cancels on channel 2
    st = InputStats(W)
    st.add(x)
    g = torch.zeros(N, C)
    g[:, 5] = x[:, 5] * 50  # the loss is most sensitive to channel 5
    st.add_grad(x, g)
    top = {m: int(saliency(st, m).argmax()) for m in ("maxabs", "hessian", "taylor")}
    assert top == {"maxabs": 1, "hessian": 4, "taylor": 5}
    # spikellm, mean x_c (W^T W x)_c: 2500 * 0.01 (channel 4), 9 (channel 1), 9 x0 (x0 + x2) = 18 x2^2
    # (channel 0), 9 x2 (x0 + x2) = -9 x2^2 (channel 2), x_c^2 = 0.01 (channels 3, 5): a signed
    # ranking puts channel 2 last, the absolute value above channels 3 and 5
    signed = st.sum_xgx / st.n
    assert signed[2] < 0 and int(signed.argmin()) == 2
    spk = saliency(st, "spikellm")
    assert torch.argsort(spk, descending=True).tolist()[:4] == [4, 1, 0, 2]
    mask = salient_mask(spk, 0.5)
    assert mask.tolist() == [True, True, False, False, True, False]
    assert not salient_mask(spk, 0.0).any() and salient_mask(spk, 1.0).all()
    r0, r1 = saliency(st, "random", seed=0), saliency(st, "random", seed=1)
    assert torch.equal(r0, saliency(st, "random", seed=0)) and not torch.equal(r0, r1)


# ---------------------------------------------------------------------------------------------------
# A converted model: an independent fake quantization, recurrent parity.
# ---------------------------------------------------------------------------------------------------
def fake_quant(x, salient, b, a, lo=None, hi=None):
    """Asymmetric quantization of the ordinary (b bits) and salient (b + a bits) channels of x,
    ranges per token and group (lo None) or per channel."""
    out = x.clone()
    for group, bits in ((~salient, b), (salient, b + a)):
        if not group.any():
            continue
        xg, Q = x[..., group], 2 ** bits - 1
        if lo is None:
            l, h = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        else:
            l, h = lo[group], hi[group]
        d = ((h - l) / Q).clamp_min(1e-30)
        out[..., group] = l + torch.clamp(torch.round((xg - l) / d), 0, Q) * d
    return out


@pytest.mark.parametrize("encoding", ["token-minmax", "channel-static"])
@pytest.mark.parametrize("spiking", [True, False])
def test_converted_logits_equal_independent_fake_quant(encoding, spiking):
    original = tiny_model(spiking)
    model = tiny_model(spiking)
    batches = random_batches()
    cfg = SpikifyConfig(bits=3, salient_frac=0.2, extra_steps=2, saliency="spikellm", encoding=encoding)
    spikify(model, batches, cfg)
    # the reference: inputs recorded on the calibration data, spikellm scores and ranges recomputed here
    seen = {}
    hooks = [lin.register_forward_pre_hook(lambda m, i, name=name: seen.setdefault(name, []).append(i[0].detach()))
             for name, lin in linear_layers(original)]
    with torch.no_grad():
        for b in batches:
            original(b[:, :-1])
    for h in hooks:
        h.remove()
    masks, ranges = {}, {}
    for name, lin in linear_layers(original):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]]).double()
        W = lin.weight.double()
        score = (x * (x @ W.t() @ W)).mean(0).abs()
        k = round(0.2 * x.shape[1])
        masks[name] = torch.zeros(x.shape[1], dtype=torch.bool)
        masks[name][score.argsort(descending=True)[:k]] = True
        ranges[name] = (x.amin(0).float(), x.amax(0).float()) if encoding == "channel-static" else (None, None)
        assert torch.equal(masks[name], dict(linear_layers(model))[name].encoder.salient)
    hooks = [lin.register_forward_pre_hook(lambda m, i, name=name: (fake_quant(i[0], masks[name], 3, 2,
                                                                                *ranges[name]),))
             for name, lin in linear_layers(original)]
    idx = random_batches(1, B=2, T=8, seed=7)[0]
    with torch.no_grad():
        want = original(idx)
        got = model(idx)
    assert torch.equal(got, want)
    assert not torch.equal(got, tiny_model(spiking)(idx))


@pytest.mark.parametrize("encoding,neuron", [
    ("token-minmax", {}), ("channel-static", {}),
    ("token-minmax", {"neuron": "gif", "levels": 4, "polarity": "bipolar", "reset": "soft"})])
def test_recurrent_equals_parallel_on_converted_model(encoding, neuron):
    model = tiny_model(**neuron)
    spikify(model, random_batches(), SpikifyConfig(bits=2, salient_frac=0.25, extra_steps=1, encoding=encoding,
                                                   saliency="hessian"))
    idx = random_batches(1, B=2, T=12, seed=3)[0][:, :12]
    with torch.no_grad():
        want, want_state = model(idx, return_state=True)
    state = model.initial_state(2)
    steps = []
    for t in range(idx.shape[1]):
        with torch.no_grad():  # the parallel path on this one token, from the same state
            one, one_state = model(idx[:, t:t + 1], state=state, return_state=True)
        logits, state = model.step(idx[:, t], state)
        assert torch.equal(logits, one[:, 0]) and torch.equal(state, one_state)
        steps.append(logits)
    assert torch.equal(torch.stack(steps, 1), want)
    assert torch.allclose(state, want_state, rtol=1e-5, atol=1e-6)  # WKV state: normalised per chunk


def test_converted_checkpoint_round_trip_and_old_checkpoints(tmp_path):
    plain = tiny_model()
    save_model(tmp_path / "plain.pt", plain)
    assert not is_converted(load(tmp_path / "plain.pt"))  # checkpoints without encodings load as before
    model = tiny_model()
    spikify(model, random_batches(), SpikifyConfig(bits=2, encoding="channel-static"))
    save_model(tmp_path / "conv.pt", model)
    back = load(tmp_path / "conv.pt")
    assert is_converted(back)
    idx = random_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))
    with pytest.raises(ValueError, match="already converted"):
        spikify(back, random_batches(), SpikifyConfig())


def test_finetune_moves_thresholds_not_weights():
    model = tiny_model()
    batches = random_batches()
    spikify(model, batches, SpikifyConfig(bits=2, salient_frac=0.1, encoding="channel-static"))
    weights = {k: v.clone() for k, v in model.named_parameters()}
    deltas = [lin.encoder.delta.clone() for _, lin in linear_layers(model)]
    losses = finetune_thresholds(model, batches, iters=6, lr=1e-2)
    assert len(losses) == 6 and all(l == l for l in losses)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in weights.items())
    assert any(not torch.equal(d, lin.encoder.delta) for d, (_, lin) in zip(deltas, linear_layers(model)))
    assert all(not lin.encoder.delta.requires_grad for _, lin in linear_layers(model))


def test_spike_driven_operation_counts():
    model = tiny_model()
    spikify(model, random_batches(), SpikifyConfig(bits=2, salient_frac=0.25, extra_steps=1))
    idx = random_batches(1, seed=9)[0]
    with recording_input_spikes(model), torch.no_grad():
        model(idx[:, :-1])
    rows = input_spike_rows(model)
    head = model.head.encoder
    assert head.tokens == idx[:, :-1].numel() and 0 < head.spike_steps <= head.tokens * 16 * 2
    # the head: 256 ACs per spike step; two groups, 2 * 256 MACs of step size and offset per token
    assert rows["head"] == {"mac": 2 * 2 * 256, "ac": pytest.approx(256 * head.spike_steps / head.tokens)}
    assert set(rows) == {"att.key_value_receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value", "head"}


# ---------------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------------
TEXT = ("Spiking neurons fire when the membrane crosses the threshold; salient channels get more steps. " * 60)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("spikify")
    prepare_splits(TEXT, d / "data", vocab="byte")
    save_model(d / "model.pt", tiny_model())
    return d


def spikify_cli(run_files, *extra):
    from spikegpt.spikify.__main__ import main
    return main(["--ckpt", str(run_files / "model.pt"), "--data-dir", str(run_files / "data"),
                 "--calib-tokens", "256", "--eval-tokens", "200", *extra])


def test_cli_converts_and_tools_load_the_result(run_files, capsys):
    out, js = run_files / "conv.pt", run_files / "conv.json"
    assert spikify_cli(run_files, "--out", str(out), "--json", str(js), "--bits", "3") == 0
    res = json.loads(js.read_text())
    assert res["avg_bits"] == pytest.approx(3.1) and res["bits_per_token_after"] > 0
    assert torch.load(out, weights_only=True)["spikify"]["bits"] == 3
    from spikegpt.analyze import main as analyze_main
    from spikegpt.evaluate import main as evaluate_main
    from spikegpt.generate import main as generate_main
    data = str(run_files / "data")
    assert evaluate_main(["--ckpt", str(out), "--data-dir", data, "--max-tokens", "200", "--json",
                          str(run_files / "ev.json")]) == 0
    ev = json.loads((run_files / "ev.json").read_text())
    assert ev["bits_per_token"] == pytest.approx(res["bits_per_token_after"], rel=0.05)
    assert generate_main(["--ckpt", str(out), "--prompt", "Spiking", "--max-new-tokens", "8", "--seed", "0"]) == 0
    rep_path = run_files / "an.json"
    assert analyze_main(["--ckpt", str(out), "--data-dir", data, "--tokens", "100", "--json", str(rep_path)]) == 0
    rep = json.loads(rep_path.read_text())
    code, paper = rep["conventions"]["code"]["modules"], rep["conventions"]["paper"]["modules"]
    assert code["head"]["ac"] > 0 and code["head"]["mac"] == 2 * 2 * 256 and paper["head"]["mac"] == 0
    assert len(rep["input_spikes"]) == 2 * 7 + 1
    capsys.readouterr()
    assert spikify_cli(run_files, "--out", str(run_files / "again.pt"), "--ckpt", str(out)) == 2
    assert "already converted" in capsys.readouterr().err and not (run_files / "again.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--calib-tokens", "100"], "too few"),
    (["--calib-tokens", "100000"], "too few calibration tokens"),
    (["--finetune-iters", "3"], "channel-static"),
])
def test_cli_bad_input_writes_nothing(run_files, capsys, flags, message):
    out = run_files / "bad.pt"
    assert spikify_cli(run_files, "--out", str(out), *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("flags", [["--salient-frac", "1.5"], ["--salient-frac", "-0.1"], ["--bits", "0"]])
def test_cli_out_of_range_flags(run_files, capsys, flags):
    with pytest.raises(SystemExit) as e:
        spikify_cli(run_files, "--out", str(run_files / "bad.pt"), *flags)
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err
    assert not (run_files / "bad.pt").exists()


def test_cli_refuses_existing_out(run_files, capsys):
    out = run_files / "exists.pt"
    out.write_bytes(b"keep me")
    assert spikify_cli(run_files, "--out", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert spikify_cli(run_files, "--out", str(out), "--overwrite", "--eval-tokens", "0") == 0
    assert is_converted(load(out))


def test_calibration_batches_cover_the_split():
    tokens = torch.arange(1000).numpy()
    batches = calibration_batches(tokens, 300, 8, batch_size=16)
    rows = torch.cat(batches)
    assert rows.shape == (38, 9) and rows[0, 0] == 0 and rows[-1, -1] == 999
    with pytest.raises(ValueError, match="need a split"):
        calibration_batches(tokens, 2000, 8)


def test_calibrate_collects_every_linear_input():
    model = tiny_model()
    stats = calibrate(model, random_batches(2), taylor=True)
    assert list(stats) == [name for name, _ in linear_layers(model)] and len(stats) == 2 * 7 + 1
    assert all(s.n == 2 * 4 * 8 for s in stats.values())
    assert all(s.sum_xgrad.abs().sum() > 0 for s in stats.values())
    assert all(p.grad is None for p in model.parameters())


def test_sweep_grid_report_and_plot(tmp_path, monkeypatch):
    from spikegpt.spikify import sweep
    monkeypatch.setattr(sweep, "UNIFORM_BITS", (2, 3, 4, 5))
    monkeypatch.setattr(sweep, "OBS_BITS", (3, 4))
    monkeypatch.setattr(sweep, "FRACS", (0.1,))
    monkeypatch.setattr(sweep, "EXTRA", (1,))
    model = tiny_model()
    batches = random_batches()
    idx = random_batches(1, seed=11)[0]

    def bits(m):
        with torch.no_grad():
            logits = m(idx[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1)))

    res = sweep.run_sweep(model, calibrate(model, batches), bits, "token-minmax", log=lambda s: None)
    assert not is_converted(model)  # the sweep leaves the model as it found it
    kinds = [(q["kind"], q["method"]) for q in res["points"]]
    assert kinds[:4] == [("uniform", "uniform")] * 4 and len(kinds) == 4 + 5 * 2 * 2
    q = next(q for q in res["points"] if q["kind"] == "obs" and q["bits"] == 4)
    assert q["avg_bits"] == pytest.approx(4.1) and q["avg_steps"] == pytest.approx(1.1)
    s = res["summary"]["b4_p0.1_a1"]
    assert s["best"] != "random" and s["by_method"][s["best"]] == min(v for m, v in s["by_method"].items()
                                                                     if m != "random")
    assert s["uniform_interp"] == pytest.approx(0.9 * res["points"][2]["bpc"] + 0.1 * res["points"][3]["bpc"])
    assert len(res["saliency_variation"]) == 15 and all(v["cov_channels"] > 0 for v in res["saliency_variation"])
    md = sweep.markdown(res)
    assert "| uniform b | 2 | 3 | 4 | 5 |" in md and "across channels" in md
    pytest.importorskip("matplotlib")
    sweep.plot([("tiny", res)], tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10000


def test_reference_checkpoint_converts(shared_reference):
    import spikegpt
    model = spikegpt.from_reference(shared_reference / "tiny_l2_v77.pth", shared_reference / "tiny_l2_v77.json")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 77, (4, model.config.ctx_len + 1), generator=g) for _ in range(2)]
    spikify(model, batches, SpikifyConfig(bits=4, salient_frac=0.1, extra_steps=1, saliency="taylor"))
    idx = batches[0][:2, :6]
    with torch.no_grad():
        want = model(idx)
    state, steps = model.initial_state(2), []
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)
        steps.append(logits)
    assert is_converted(model) and torch.equal(torch.stack(steps, 1), want)
