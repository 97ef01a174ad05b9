"""The model and the reference ops against docs/model.md §1-3, and the golden reference checkpoints."""
import json
import math

import numpy as np
import pytest
import torch

import spikegpt
from spikegpt import ModelConfig, SpikeGPT, ops
from spikegpt.checkpoint import CheckpointError
from spikegpt.state import WKV_O

REFERENCE_MODELS = ["tiny_l2_v77", "tiny_l8_v97"]


# ----------------------------------------------------------------------------------------------
# WKV against its O(T^2) definition, in fp64.
# ----------------------------------------------------------------------------------------------
def wkv_definition(w, u, k, v, state=None):
    """The docs/model.md §2 formula, term by term; the state (p, q, o) is a token before t = 0."""
    B, T, C = k.shape
    y = torch.empty_like(k)
    for t in range(T):
        lags = (t - 1 - torch.arange(t, dtype=k.dtype))[None, :, None]
        expo = [lags * w + k[:, :t], (u + k[:, t])[:, None]]
        vals = [v[:, :t], v[:, t:t + 1]]
        if state is not None:
            p, q, o = state
            expo.append((t * w + o)[:, None])
            vals.append(None)
        m = torch.cat([e for e in expo], 1).amax(1, keepdim=True)
        num = sum((torch.exp(e - m) * x).sum(1) for e, x in zip(expo[:2], vals[:2]))
        den = sum(torch.exp(e - m).sum(1) for e in expo[:2])
        if state is not None:
            num = num + torch.exp(expo[2] - m)[:, 0] * p
            den = den + torch.exp(expo[2] - m)[:, 0] * q
        y[:, t] = num / den
    return y


def random_wkv_inputs(B, T, C, k_scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(C, generator=g, dtype=dtype))
    u = torch.randn(C, generator=g, dtype=dtype)
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    return w, u, k, v


@pytest.mark.parametrize("B,T,C,k_scale", [(1, 1, 3, 1.0), (2, 37, 5, 1.0), (1, 100, 4, 5.0),
                                           (2, 70, 3, 40.0), (2, 70, 3, 400.0)])
def test_wkv_matches_definition_fp64(B, T, C, k_scale):
    # k_scale 400 spans far more than fp32/fp64 exponents without the max trick.
    w, u, k, v = random_wkv_inputs(B, T, C, k_scale)
    y, _ = ops.wkv_torch(w, u, k, v)
    torch.testing.assert_close(y, wkv_definition(w, u, k, v), rtol=1e-12, atol=1e-12)


def test_wkv_fp32_close_to_fp64():
    w, u, k, v = random_wkv_inputs(3, 200, 16, 3.0)
    y32, _ = ops.wkv_torch(w.float(), u.float(), k.float(), v.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), wkv_definition(w, u, k, v), rtol=0, atol=2e-5)


@pytest.mark.parametrize("cuts", [[1], [5, 6], [31, 32, 33], [64]])
def test_wkv_chunked_with_state_equals_one_shot(cuts):
    w, u, k, v = random_wkv_inputs(2, 100, 6, 3.0)
    y_full, (p, q, o) = ops.wkv_torch(w, u, k, v)
    ys, state, bounds = [], None, [0, *cuts, 100]
    for a, b in zip(bounds, bounds[1:]):
        y, state = ops.wkv_torch(w, u, k[:, a:b], v[:, a:b], state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-12, atol=1e-12)
    # Same state up to its scale: p e^o and q e^o agree.
    torch.testing.assert_close(state[0] * torch.exp(state[2] - o), p, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[1] * torch.exp(state[2] - o), q, rtol=1e-10, atol=1e-12)


def test_wkv_state_is_a_token_before_the_sequence():
    w, u, k, v = random_wkv_inputs(2, 20, 4, 2.0)
    g = torch.Generator().manual_seed(1)
    state = (torch.randn(2, 4, generator=g, dtype=torch.float64), torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.1,
             torch.randn(2, 4, generator=g, dtype=torch.float64))
    y, _ = ops.wkv_torch(w, u, k, v, state)
    torch.testing.assert_close(y, wkv_definition(w, u, k, v, state), rtol=1e-12, atol=1e-12)


def test_wkv_gradients_gradcheck():
    w, u, k, v = random_wkv_inputs(2, 9, 3, 1.0)
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    q0 = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.1
    o0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (w, u, k, v, p0, q0, o0)]

    def f(w, u, k, v, p0, q0, o0):
        y, (p, q, o) = ops.wkv_torch(w, u, k, v, (p0, q0, o0), chunk=4)
        return y, p * torch.exp(o), q * torch.exp(o)

    assert torch.autograd.gradcheck(f, inputs)


def test_time_decay_gradient_is_grad_w_times_w():
    w, u, k, v = random_wkv_inputs(2, 12, 3)
    decay = torch.log(-w).requires_grad_()
    w_leaf = (-torch.exp(decay)).detach().requires_grad_()
    ops.wkv_torch(-torch.exp(decay), u, k, v)[0].sum().backward()
    ops.wkv_torch(w_leaf, u, k, v)[0].sum().backward()
    torch.testing.assert_close(decay.grad, w_leaf.grad * w_leaf.detach())


# ----------------------------------------------------------------------------------------------
# LIF and the spike function.
# ----------------------------------------------------------------------------------------------
def lif_by_formula(x, v0, tau=2.0, v_th=1.0):
    v, spikes, hs = v0.clone(), [], []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / tau
        s = (h >= v_th).to(x.dtype)
        v = h * (1 - s)
        spikes.append(s)
        hs.append(h)
    return torch.stack(spikes, 1), v, torch.stack(hs, 1)


def test_lif_forward_matches_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 7, generator=g, dtype=torch.float64) * 2
    v0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    s, v_last = ops.lif_torch(x, v0)
    s_ref, v_ref, _ = lif_by_formula(x, v0)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(v_last, v_ref)
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    assert 0.05 < s.mean() < 0.95


def test_lif_backward_matches_autograd_of_the_surrogate_formula():
    """Autograd through the formula with H replaced by the surrogate-gradient spike function and
    the reset NOT detached gives the hand-written backward's gradients."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 30, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    v0 = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    gs = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    gv = torch.randn(2, 5, generator=g, dtype=torch.float64)

    s, v_last = ops.lif_torch(x, v0, tau=2.0, v_threshold=1.0, alpha=2.0)
    gx, gv0 = torch.autograd.grad((s * gs).sum() + (v_last * gv).sum(), (x, v0))

    v, outs = v0, []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / 2.0
        spike = ops.spike(h - 1.0, 2.0)
        v = h * (1 - spike)
        outs.append(spike)
    gx_ref, gv0_ref = torch.autograd.grad((torch.stack(outs, 1) * gs).sum() + (v * gv).sum(), (x, v0))
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv0, gv0_ref)


def test_lif_chunked_with_state_equals_one_shot():
    x = torch.randn(2, 40, 6) * 2
    s, v = ops.lif_torch(x)
    s1, v1 = ops.lif_torch(x[:, :17])
    s2, v2 = ops.lif_torch(x[:, 17:], v1)
    assert torch.equal(torch.cat([s1, s2], 1), s) and torch.equal(v2, v)


def test_spike_surrogate_gradient():
    z = torch.linspace(-2, 2, 41, dtype=torch.float64).requires_grad_()
    s = ops.spike(z, alpha=2.0)
    assert torch.equal(s, (z >= 0).double())
    (g,) = torch.autograd.grad(s.sum(), z)
    # d/dz [arctan(pi/2 alpha z)/pi + 1/2], by autograd of the smooth function itself.
    zz = z.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad((torch.atan(math.pi / 2 * 2.0 * zz) / math.pi + 0.5).sum(), zz)
    torch.testing.assert_close(g, g_ref)


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------
def tiny_model(**kw) -> SpikeGPT:
    torch.manual_seed(0)
    return SpikeGPT(ModelConfig(**{"vocab_size": 61, "n_layer": 3, "n_embd": 24, **kw})).eval()


def test_parameter_count_formula():
    for cfg in [ModelConfig(vocab_size=77, n_layer=2, n_embd=32), ModelConfig(vocab_size=256, n_layer=12, n_embd=512)]:
        C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
        assert SpikeGPT(cfg).num_params() == 2 * V * C + L * (13 * C * C + 11 * C) + 4 * C == cfg.n_params


def test_time_parameter_init():
    m = SpikeGPT(ModelConfig(vocab_size=10, n_layer=3, n_embd=8))
    att, C, L = m.blocks[1].att, 8, 3
    c = torch.arange(C, dtype=torch.float64)
    torch.testing.assert_close(att.time_decay.double(), -5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * 1 / (L - 1)))
    torch.testing.assert_close(att.time_first.double(), math.log(0.3) + 0.5 * (((c + 1) % 3) - 1))
    torch.testing.assert_close(att.time_mix_v.double().flatten(), (c / C) ** (1 - 1 / L) + 0.3 * 0.5)
    SpikeGPT(ModelConfig(vocab_size=10, n_layer=1, n_embd=1))  # L = 1 and C = 1 are guarded


def test_model_is_causal():
    m = tiny_model()
    idx = torch.randint(0, 61, (2, 30))
    other = idx.clone()
    other[:, 20:] = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        a, b = m(idx), m(other)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_forward_from_state_equals_one_pass():
    m = tiny_model()
    idx = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        full, state_full = m(idx, return_state=True)
        first, state = m(idx[:, :13], return_state=True)
        second, state = m(idx[:, 13:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=0, atol=1e-5)
    assert state.shape == (3, 7, 2, 24) and state.dtype == torch.float32


def test_initial_state_layout():
    s = tiny_model().initial_state(4)
    assert s.shape == (3, 7, 4, 24)
    assert (s[:, WKV_O] == ops.EMPTY_EXP).all() and (s[:, :WKV_O - 2] == 0).all()


def test_loss_and_l2wrap_gradient():
    m = tiny_model(dropout=0.0).train()
    idx, tgt = torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8))
    logits, loss = m(idx, tgt)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, 61), tgt.view(-1)))
    g_wrapped = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    g_plain = torch.autograd.grad(torch.nn.functional.cross_entropy(logits.view(-1, 61), tgt.view(-1)), logits)[0]
    extra = g_wrapped - g_plain
    top, arg = logits.max(-1)
    expected = torch.zeros_like(logits).scatter_(-1, arg[..., None], top[..., None] * 1e-4 / 16)
    torch.testing.assert_close(extra, expected)


def test_no_spike_ablation_is_plain_rwkv():
    m = tiny_model(spiking=False, binary_embedding=False)
    idx = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        out = m(idx)
    assert torch.isfinite(out).all()
    assert m.num_params() == tiny_model().num_params()


def test_dropout_only_in_training():
    m = tiny_model(dropout=0.5)
    idx = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        assert torch.equal(m(idx), m(idx))
        m.train()
        assert not torch.equal(m(idx), m(idx))


# ----------------------------------------------------------------------------------------------
# Golden files of the reference implementation.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_reference_checkpoint_logits(shared_reference, name):
    model = spikegpt.from_reference(shared_reference / f"{name}.pth", shared_reference / f"{name}.json")
    io = np.load(shared_reference / f"{name}_io.npz")
    with torch.no_grad():
        logits, loss = model(torch.from_numpy(io["idx"]), torch.from_numpy(io["targets"]))
    err = (logits - torch.from_numpy(io["logits"])).abs().max().item()
    assert err <= 1e-4, f"max abs logit error {err}"
    assert abs(loss.item() - float(io["loss"])) <= 1e-5


def test_reference_config_mismatch_is_refused(shared_reference, tmp_path):
    cfg = json.loads((shared_reference / "tiny_l8_v97.json").read_text())
    cfg["n_layer"] = 6
    with pytest.raises(CheckpointError, match="8 layers but the config says n_layer=6"):
        spikegpt.from_reference(shared_reference / "tiny_l8_v97.pth", cfg)
    cfg = {**cfg, "n_layer": 8, "vocab_size": 77}
    with pytest.raises(CheckpointError, match="vocabulary is 97"):
        spikegpt.from_reference(shared_reference / "tiny_l8_v97.pth", cfg)


def test_backend_selection():
    x = torch.randn(1, 5, 3)
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
        s, _ = ops.lif(x)
    assert ops.get_backend() == "auto"
    assert torch.equal(s, ops.lif_torch(x)[0])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_backend("cuda")
