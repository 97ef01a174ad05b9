"""Multi-level GIF neurons (issue 13): the PyTorch reference against autograd of the formulas, the
L = 1 equivalence with the LIF, level boundaries, the model and config plumbing, and the Triton kernel
(in Triton's interpreter without a GPU) against the fp64 reference."""
import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

import spikegpt
from spikegpt import ModelConfig, SpikeGPT, ops
from spikegpt.spikes import record_spikes
from spikegpt.checkpoint import save_model

CONFIGS = list(itertools.product([1, 2, 3], [False, True], ["hard", "soft", "zero"], ["atan", "ste"]))
CONFIG_IDS = [f"L{L}-{'bi' if b else 'uni'}-{r}-{s}" for L, b, r, s in CONFIGS]


def smooth(z, alpha):
    """A function whose derivative is the arctan surrogate: ``arctan(pi/2 alpha z) / pi``."""
    return torch.atan(math.pi / 2 * alpha * z) / math.pi


def straight_through(hard, soft):
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass."""
    return hard + (soft - soft.detach())


def gif_by_formula(x, v0, theta, tau, L, bipolar, reset, surrogate, alpha=2.0):
    """The issue's equations step by step, differentiated by autograd through surrogate functions."""
    v, ys = v0, []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / tau
        a = h.abs() if bipolar else h
        count = torch.clamp(torch.floor(a.detach() / theta.detach()), 0, L)
        s_hard = count * torch.sign(h.detach()) if bipolar else count
        fired = (s_hard != 0).to(h.dtype)
        if surrogate == "atan":
            ks = torch.arange(1, L + 1, dtype=h.dtype)
            s_soft = smooth(h[..., None] - ks * theta, alpha).sum(-1)
            f_soft = smooth(h - theta, alpha)
            if bipolar:
                s_soft = s_soft + smooth(h[..., None] + ks * theta, alpha).sum(-1)
                f_soft = f_soft - smooth(h + theta, alpha)
        else:
            inside = (a < (L + 1) * theta) & (bipolar | (h >= 0))
            s_soft = h / theta * inside.detach()
            inside1 = (a < 2 * theta) & (bipolar | (h >= 0))
            f_soft = a / theta * inside1.detach()
        s = straight_through(s_hard, s_soft)
        ys.append(theta * s)
        if reset == "hard":
            v = h * (1 - straight_through(fired, f_soft))
        elif reset == "soft":
            v = h - theta * s
        else:
            v = torch.zeros_like(h)
    return torch.stack(ys, 1), v


def inputs(B=2, T=23, C=5, seed=0, scale=2.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64) * scale
    v0 = torch.randn(B, C, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    gv = torch.randn(B, C, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, v0, gy, gv)]


def grads(fn, x, v0, theta, gy, gv, **kw):
    x, v0, theta = (t.detach().clone().requires_grad_() for t in (x, v0, theta))
    y, v = fn(x, v0, theta, **kw)
    gx, gv0, gth = torch.autograd.grad((y * gy).sum() + (v * gv).sum(), (x, v0, theta))
    return y.detach(), v.detach(), gx, gv0, gth


# --------------------------------------------------------------------------------------------------
# The reference.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,bipolar,reset,surrogate", CONFIGS, ids=CONFIG_IDS)
def test_reference_matches_autograd_of_the_formulas(L, bipolar, reset, surrogate):
    x, v0, gy, gv = inputs(seed=L)
    theta = torch.tensor(0.7, dtype=torch.float64)
    kw = dict(tau=2.0, levels=L, bipolar=bipolar, reset=reset, surrogate=surrogate, alpha=2.0)
    got = grads(lambda x, v0, th, **k: ops.gif_torch(x, v0, th, **k), x, v0, theta, gy, gv, **kw)
    want = grads(lambda x, v0, th, tau, levels, **k: gif_by_formula(x, v0, th, tau, levels, **k),
                 x, v0, theta, gy, gv, **kw)
    for name, a, b in zip(["y", "v_last", "grad x", "grad v0", "grad theta"], got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    counts = got[0] / 0.7
    assert set(counts.round().unique().tolist()) == set(range(-L if bipolar else 0, L + 1))


def test_level_one_unipolar_hard_atan_is_bitwise_lif():
    x, v0, gy, gv = inputs(B=3, T=40, C=7, seed=3, dtype=torch.float32)
    x, v0 = x.requires_grad_(), v0.requires_grad_()
    s, v = ops.lif_torch(x, v0)
    want = torch.autograd.grad((s * gy).sum() + (v * gv).sum(), (x, v0))
    y, w = ops.gif_torch(x, v0, 1.0, levels=1, bipolar=False, reset="hard", surrogate="atan")
    got = torch.autograd.grad((y * gy).sum() + (w * gv).sum(), (x, v0))
    assert 0.1 < s.mean() < 0.9
    assert torch.equal(y, s) and torch.equal(w, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_level_one_spikes_where_the_lif_does_at_any_threshold():
    x, v0, _, _ = inputs(B=3, T=40, C=7, seed=4, dtype=torch.float32)
    s, v = ops.lif_torch(x, v0, v_threshold=0.7)
    y, w = ops.gif_torch(x, v0, 0.7, levels=1)
    assert torch.equal(y != 0, s != 0) and torch.equal(w, v)


@pytest.mark.parametrize("bipolar", [False, True])
def test_spikes_exactly_at_level_boundaries(bipolar):
    """With v0 = 0 and tau = 2 the first membrane is x / 2: put it exactly on k theta and one ulp below."""
    theta, L = 0.25, 3
    k = torch.arange(1, L + 2, dtype=torch.float32)
    at = k * theta
    below = torch.nextafter(at, torch.zeros_like(at))
    h = torch.cat([at, below, -at, -below]) if bipolar else torch.cat([at, below])
    y, _ = ops.gif_torch((2 * h).view(1, 1, -1), None, theta, levels=L, bipolar=bipolar)
    counts = (y / theta).view(-1)
    want_at, want_below = k.clamp(max=L), (k - 1).clamp(max=L)
    want = torch.cat([want_at, want_below] + ([-want_at, -want_below] if bipolar else []))
    assert torch.equal(counts, want)
    y, _ = ops.gif_torch((-2 * h).view(1, 1, -1), None, theta, levels=L, bipolar=bipolar)
    assert torch.equal((y / theta).view(-1), -want if bipolar else torch.zeros_like(want))


@pytest.mark.parametrize("reset", ["hard", "soft", "zero"])
def test_chunked_calls_with_carried_membrane_equal_one_call(reset):
    x, _, _, _ = inputs(B=2, T=40, C=6, seed=5, dtype=torch.float32)
    kw = dict(theta=0.6, levels=3, bipolar=True, reset=reset)
    y, v = ops.gif_torch(x, **kw)
    y1, v1 = ops.gif_torch(x[:, :17], **kw)
    y2, v2 = ops.gif_torch(x[:, 17:], v1, **kw)
    assert torch.equal(torch.cat([y1, y2], 1), y) and torch.equal(v2, v)


def test_quant_has_no_temporal_integration():
    x, _, _, _ = inputs(B=1, T=12, C=4, seed=6, dtype=torch.float32)
    y, v = ops.gif_torch(x, None, 0.5, levels=4, bipolar=True, reset="zero")
    y_one_by_one = torch.cat([ops.gif_torch(x[:, t:t + 1], None, 0.5, levels=4, bipolar=True, reset="zero")[0]
                              for t in range(12)], 1)
    assert torch.equal(y, y_one_by_one) and torch.equal(v, torch.zeros_like(v))


def test_reference_validates_its_arguments():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="levels must be >= 1"):
        ops.gif_torch(x, levels=0)
    with pytest.raises(ValueError, match="unknown GIF reset"):
        ops.gif_torch(x, reset="none")
    with pytest.raises(ValueError, match="unknown GIF surrogate"):
        ops.gif_torch(x, surrogate="sigmoid")


# --------------------------------------------------------------------------------------------------
# Config, model, checkpoints, CLI.
# --------------------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    from spikegpt.config import GIF_DEFAULTS
    assert ModelConfig().neuron == "lif" and ModelConfig().levels is None
    gif = ModelConfig(neuron="gif")
    assert {k: getattr(gif, k) for k in GIF_DEFAULTS} == GIF_DEFAULTS
    quant = ModelConfig(neuron="quant", levels=2)
    assert quant.levels == 2 and quant.reset is None and quant.polarity == GIF_DEFAULTS["polarity"]
    assert ModelConfig.from_dict(gif.to_dict()) == gif
    old = {k: v for k, v in ModelConfig().to_dict().items()
           if k not in ("neuron", "levels", "polarity", "reset", "surrogate", "learn_threshold")}
    assert ModelConfig.from_dict(old).neuron == "lif"
    # The default threshold: the LIF's for lif, a twin and one level; the finer GIF step for L > 1.
    from spikegpt.config import GIF_THRESHOLD, LIF_THRESHOLD
    assert GIF_THRESHOLD < LIF_THRESHOLD
    assert ModelConfig().v_threshold == ModelConfig(spiking=False).v_threshold == LIF_THRESHOLD
    assert ModelConfig(neuron="gif", levels=1).v_threshold == LIF_THRESHOLD
    assert gif.v_threshold == quant.v_threshold == ModelConfig(neuron="gif", levels=8).v_threshold == GIF_THRESHOLD
    assert ModelConfig(neuron="gif", v_threshold=0.7).v_threshold == 0.7
    recorded = {**gif.to_dict(), "v_threshold": 1.0}  # a GIF checkpoint written before the finer default
    assert ModelConfig.from_dict(recorded).v_threshold == 1.0
    for kw, match in [(dict(neuron="gif", levels=0), "--levels 0.*use --levels 1 or more"),
                      (dict(levels=2), "--levels: they configure --neuron gif.*add --neuron gif"),
                      (dict(learn_threshold=True), "--learn-threshold.*add --neuron gif"),
                      (dict(neuron="quant", reset="soft"), "nothing to reset; drop --reset"),
                      (dict(neuron="gif", spiking=False), "--no-spike.*drop one"),
                      (dict(neuron="spiky"), "use --neuron with one of lif, gif, quant"),
                      (dict(neuron="gif", polarity="tripolar"), "pick one of those"),
                      (dict(neuron="gif", v_threshold=0.0), "must be > 0")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**kw)


def small(**kw):
    torch.manual_seed(0)
    model = SpikeGPT(ModelConfig(vocab_size=50, n_layer=2, n_embd=16, dropout=0.0, **kw))
    with torch.no_grad():  # drive the neurons above threshold
        for name, p in model.named_parameters():
            if name.endswith(("att.output.weight", "ffn.value.weight")):
                p.mul_(8.0)
    return model


def test_model_gif_level_one_is_bitwise_the_lif_model():
    idx = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    out = []
    for kw in [dict(), dict(neuron="gif", levels=1, polarity="unipolar", reset="hard", surrogate="atan")]:
        model = small(**kw).train()
        _, loss = model(idx, idx)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_records_levels_counts_and_magnitudes():
    model = small(neuron="gif", levels=2, polarity="bipolar", reset="soft", v_threshold=0.25).eval()
    idx = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_spikes(model):
        model(idx)
    n = model.blocks[1].lif2
    assert n.level_values == (-2, -1, 0, 1, 2) and n.spike_steps == 33
    assert int(n.level_counts.sum()) == 33 * 16
    nonzero = int(n.level_counts.sum() - n.level_counts[2])
    assert int(n.spike_counts.sum()) == nonzero > 0
    weights = torch.tensor([2, 1, 0, 1, 2])
    assert int(n.spike_abs.sum()) == int((n.level_counts * weights).sum()) > nonzero
    lif = small().eval()
    with torch.no_grad(), record_spikes(lif):
        lif(idx)
    b = lif.blocks[0].lif1
    assert b.level_values == (0, 1) and torch.equal(b.spike_abs, b.spike_counts)
    assert int(b.level_counts[1]) == int(b.spike_counts.sum())


def test_learnable_threshold_has_the_lsq_gradient_scale_and_survives_a_checkpoint(tmp_path):
    model = small(neuron="gif", levels=4, learn_threshold=True).train()
    names = [n for n, _ in model.named_parameters() if n.endswith("threshold")]
    assert len(names) == 4 and model.num_params() == model.config.n_params
    idx = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    _, loss = model(idx, idx)
    loss.backward()
    n = model.blocks[0].lif1
    assert n.threshold_grad_scale == 1 / math.sqrt(16 * 4)
    assert n.threshold.grad is not None and n.threshold.grad != 0
    with torch.no_grad():
        n.threshold.fill_(0.8)
    save_model(tmp_path / "gif.pt", model.eval())
    loaded = spikegpt.load(tmp_path / "gif.pt")
    assert loaded.config == model.config and loaded.blocks[0].lif1.threshold.item() == pytest.approx(0.8)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_a_threshold_that_learns_to_zero_stops_training_with_one_message():
    from spikegpt.train import TrainingError, check_thresholds
    model = small(neuron="gif", learn_threshold=True)
    check_thresholds(model, 0)
    with torch.no_grad():
        model.blocks[1].lif2.threshold.fill_(-0.1)
    with pytest.raises(TrainingError, match=r"blocks\.1\.lif2\.threshold = -0\.1.*drop --learn-threshold"):
        check_thresholds(model, 41)


@pytest.mark.parametrize("argv,match", [(["--neuron", "gif", "--levels", "0"], "use --levels 1 or more"),
                                        (["--polarity", "bipolar"], "add --neuron gif")])
def test_train_refuses_illegal_neuron_flags_in_one_line(tmp_path, capsys, argv, match):
    from spikegpt import train
    code = train.main(argv + ["--out-dir", str(tmp_path / "run"), "--max-iters", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert match in err


def test_reference_checkpoints_load_as_lif(shared_reference):
    model = spikegpt.from_reference(shared_reference / "tiny_l8_v97.pth", shared_reference / "tiny_l8_v97.json")
    assert model.config.neuron == "lif" and model.config.levels is None


# --------------------------------------------------------------------------------------------------
# The Triton kernel (interpreter on CPU).
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton", reason="Triton is not installed: the GIF kernel cannot be tested")
    try:
        from spikegpt import kernels as k
    except ImportError:  # source tree without the spikegpt.kernels mapping
        d = Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location("spikegpt.kernels", d / "__init__.py",
                                                      submodule_search_locations=[str(d)])
        k = importlib.util.module_from_spec(spec)
        sys.modules["spikegpt.kernels"] = k
        spec.loader.exec_module(k)
    return k


def near_boundary(x, v0, theta, tau, L, bipolar, reset, eps=1e-5):
    """Neurons whose fp64 membrane came within eps of a level threshold at or before a step (fp32
    rounding may legitimately flip a level there)."""
    ys, _ = ops.gif_torch(x.double(), v0.double(), theta, tau, L, bipolar, reset)
    v, hit, out = v0.double(), torch.zeros_like(v0, dtype=torch.bool), []
    for t in range(x.shape[1]):
        h = v + (x[:, t].double() - v) / tau
        a = h.abs() if bipolar else h
        k = torch.arange(1, L + 1, dtype=torch.float64)
        hit |= ((a[..., None] - k * theta).abs() <= eps).any(-1)
        out.append(hit.clone())
        s = ys[:, t] / theta
        v = torch.where(s != 0, 0.0, h) if reset == "hard" else h - theta * s if reset == "soft" else 0 * h
    return torch.stack(out, 1)


KERNEL_CONFIGS = [(1, False, "hard", "atan"), (2, True, "soft", "atan"), (3, False, "soft", "ste"),
                  (2, True, "hard", "ste"), (4, True, "zero", "atan"), (2, False, "hard", "atan")]


@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 19, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("L,bipolar,reset,surrogate", KERNEL_CONFIGS,
                         ids=[f"L{c[0]}-{'bi' if c[1] else 'uni'}-{c[2]}-{c[3]}" for c in KERNEL_CONFIGS])
def test_kernel_matches_fp64_reference(kernels, shape, L, bipolar, reset, surrogate):
    x, v0, gy, gv = inputs(*shape, seed=sum(shape) + L, scale=2.0)
    theta = torch.tensor(0.6, dtype=torch.float64)
    kw = dict(tau=2.0, levels=L, bipolar=bipolar, reset=reset, surrogate=surrogate, alpha=2.0)
    near = near_boundary(x, v0, 0.6, 2.0, L, bipolar, reset)
    if near.any():
        pytest.skip("a membrane came within 1e-5 of a level threshold; pick another seed")
    got = grads(kernels.gif, x.float(), v0.float(), theta.float(), gy.float(), gv.float(), **kw)
    want = grads(ops.gif_torch, x, v0, theta, gy, gv, **kw)
    assert got[0].dtype == torch.float32
    assert torch.equal((got[0].double() / 0.6).round(), (want[0] / 0.6).round()), "levels differ"
    for name, a, b in zip(["y", "v_last", "grad x", "grad v0", "grad theta"], got, want):
        atol = 1e-4 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_kernel_level_one_equals_the_lif_kernel_and_chunks_carry(kernels):
    x, v0, gy, gv = inputs(2, 29, 6, seed=11, dtype=torch.float32)
    x, v0 = x.requires_grad_(), v0.requires_grad_()
    s, v = kernels.lif(x, v0)
    want = torch.autograd.grad((s * gy).sum() + (v * gv).sum(), (x, v0))
    y, w = kernels.gif(x, v0, 1.0)
    got = torch.autograd.grad((y * gy).sum() + (w * gv).sum(), (x, v0))
    assert torch.equal(y, s) and torch.equal(w, v)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    kw = dict(theta=0.6, levels=3, bipolar=True, reset="soft")
    xd = x.detach()
    y1, v1 = kernels.gif(xd[:, :11], v0.detach(), **kw)
    y2, v2 = kernels.gif(xd[:, 11:], v1, **kw)
    y_all, v_all = kernels.gif(xd, v0.detach(), **kw)
    assert torch.equal(torch.cat([y1, y2], 1), y_all) and torch.equal(v2, v_all)


def test_kernel_threshold_gradient_is_deterministic_and_bf16_runs(kernels):
    x, v0, gy, gv = inputs(2, 9, 40, seed=12, dtype=torch.float32)  # two channel blocks
    theta = torch.tensor(0.5)
    kw = dict(levels=2, bipolar=True, reset="soft")
    runs = [grads(kernels.gif, x, v0, theta, gy, gv, **kw)[4] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    xb = x.bfloat16().requires_grad_()
    y, v = kernels.gif(xb, None, 0.5, **kw)
    y.float().sum().backward()
    assert y.dtype == xb.grad.dtype == torch.bfloat16 and v.dtype == torch.float32
    assert torch.isfinite(xb.grad.float()).all()
    y_ref, _ = ops.gif_torch(xb.detach().double(), None, 0.5, **kw)
    assert (y.double() != y_ref).float().mean() < 0.02  # bf16 rounding of the membrane input only


def test_dispatcher_sends_gif_to_the_kernel(kernels):
    x, v0, _, _ = inputs(1, 9, 5, dtype=torch.float32)
    kw = dict(theta=0.6, levels=2, bipolar=True, reset="soft")
    assert torch.equal(ops.gif(x, v0, backend="triton", **kw)[0], ops.gif(x, v0, backend="torch", **kw)[0])


def test_kernel_custom_op_opcheck(kernels):
    x, v0, _, _ = inputs(1, 5, 3, dtype=torch.float32)
    torch.library.opcheck(torch.ops.spikegpt.gif_forward, (x, v0, torch.tensor(0.6), 2.0, 2, True, "soft", "atan", 2.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --------------------------------------------------------------------------------------------------
# The experiment script.
# --------------------------------------------------------------------------------------------------
def _sweep():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gif_sweep.py"
    spec = importlib.util.spec_from_file_location("gif_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_arms_map_to_train_flags_and_results_append(tmp_path):
    sweep = _sweep()
    assert sweep.arm_flags("lif") == [] and sweep.arm_flags("twin") == ["--no-spike"]
    assert sweep.arm_flags("gif-L4-bipolar-soft-learn") == [
        "--neuron", "gif", "--levels", "4", "--polarity", "bipolar", "--reset", "soft", "--surrogate", "atan",
        "--learn-threshold"]
    assert sweep.arm_flags("gif-L2-unipolar-hard-th0.5-ste")[-4:] == ["--surrogate", "ste", "--v-threshold", "0.5"]
    assert sweep.arm_flags("quant-L2-unipolar")[:4] == ["--neuron", "quant", "--levels", "2"]
    for bad in ("gif-L2-bipolar", "quant-Lx-bipolar", "lifx", "gif-L2-bipolar-soft-thx", "ste"):
        with pytest.raises(SystemExit, match="unknown arm"):
            sweep.arm_flags(bad)
    assert len(set(sweep.DEFAULT_ARMS)) == len(sweep.DEFAULT_ARMS) == 2 + 12 + 6 + 2
    results = tmp_path / "r.jsonl"
    sweep.append_result(results, {"text": "builtin", "arm": "lif", "bpc": 2.2})
    sweep.append_result(results, {"text": "builtin", "arm": "twin", "bpc": 2.0})
    assert [r["arm"] for r in sweep.read_results(results)] == ["lif", "twin"]


def test_sweep_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    sweep = _sweep()
    records = [{"text": "builtin", "arm": a, "bpc": b, "effective_bits": e, "max_iters": 10}
               for a, b, e in [("lif", 2.2, 0.8), ("twin", 2.0, None), ("gif-L2-bipolar-soft", 2.1, 2.0),
                               ("quant-L2-bipolar", 2.15, 2.0)]]
    sweep.plot(records, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kw", [dict(neuron="gif", levels=2, polarity="bipolar", reset="soft", v_threshold=0.25),
                                dict(neuron="quant", levels=4, polarity="unipolar", binary_embedding=False), dict()])
def test_sweep_spike_statistics_are_sum_of_magnitude_times_fan_out(tmp_path, kw):
    """The sweep's numbers from the library equal a direct count over the records: synaptic operations
    = sum over spike-driven inputs of mean |s| x fan-out (TimeMix W_k W_v W_r W_o read the embedding's
    ones at layer 0 (MACs if it is real-valued) and the previous ChannelMix after; ChannelMix W_k W_r
    W_v read the TimeMix spikes; the head the last ChannelMix; each residual add has fan-out 1)."""
    from spikegpt.data import open_split, prepare_splits

    prepare_splits("Spikes carry a count of events per token. " * 40, tmp_path / "data", vocab="byte")
    torch.manual_seed(0)
    model = SpikeGPT(ModelConfig(vocab_size=256, n_layer=2, n_embd=16, ctx_len=32, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("att.output.weight", "ffn.value.weight")):
                p.mul_(8.0)
    save_model(tmp_path / "m.pt", model)
    stats = _sweep().spike_statistics(tmp_path / "m.pt", str(tmp_path / "data"), 160, 4)
    model = spikegpt.load(tmp_path / "m.pt")
    tokens = torch.as_tensor(open_split(str(tmp_path / "data"), "val")[:160].astype("int64")).view(4, 40)
    with torch.no_grad(), record_spikes(model) as m:
        m(tokens)
    C, F, V = 16, 64, 256
    neurons = [(b.lif1, b.lif2) for b in m.blocks]
    mean_abs = [(float(a.spike_abs.sum()) / (160 * C), float(f.spike_abs.sum()) / (160 * C)) for a, f in neurons]
    emb = float(m.emb.spike_ones) / m.emb.spike_elems if m.config.binary_embedding else None
    synops = 0.0
    for l, (att, ffn) in enumerate(mean_abs):
        att_in = emb if l == 0 else mean_abs[l - 1][1]
        synops += 0 if att_in is None else 4 * C * C * att_in  # W_k, W_v, W_r, W_o
        synops += (C * F + C * C + F * C) * att + C * att + C * ffn  # W_k, W_r, W_v; two residual adds
    synops += V * C * mean_abs[-1][1]
    assert stats["synops_per_token"] == pytest.approx(synops, rel=1e-12)
    assert stats["mean_abs_s"] == pytest.approx(sum(a + f for a, f in mean_abs) / 4, rel=1e-12)
    counts = sum(n.level_counts for pair in neurons for n in pair)
    assert list(stats["level_histogram"].values()) == counts.tolist() and sum(counts.tolist()) == 4 * 160 * C
    zero = m.blocks[0].lif1.level_values.index(0)
    assert stats["firing_rate"] == pytest.approx(1 - float(counts[zero]) / (4 * 160 * C), rel=1e-12)
    assert 0 < stats["effective_bits"] <= math.log2(len(counts))
