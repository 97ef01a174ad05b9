"""The fused CPU ops of spikegpt.cpu against the references and the spec.

Tolerances: the neuron is bitwise ``ops.lif_torch`` (fp32 and fp64: spikes, membrane, both gradients);
GIF modes agree with an fp64 autograd reference of the spec written below to 1e-10; WKV agrees with
``ops.wkv_torch`` in fp64 to 1e-10 relative (values, state, all seven gradients), and in fp32 both
lie within 2e-5 (values; 2e-4 where k spans hundreds of nats) / 1e-4 of the largest gradient
(gradients) of the fp64 truth.
"""
import math
import warnings

import pytest
import torch

from spikegpt import cpu, ops


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu.available():
        pytest.skip(f"the fused CPU ops did not build here: {cpu.failure()}")


def _grads(out, inputs, cotangents):
    return torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, cotangents)), inputs, allow_unused=True)


# --------------------------------------------------------------------------------------------------
# LIF: bitwise the reference.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau,v_th,alpha", [(2.0, 1.0, 2.0), (1.7, 0.8, 3.0)])
@pytest.mark.parametrize("T", [1, 45])
def test_lif_is_bitwise_the_reference(dtype, tau, v_th, alpha, T):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, T, 37, generator=g, dtype=dtype) * 2).requires_grad_()
    v0 = torch.randn(3, 37, generator=g, dtype=dtype).requires_grad_()
    cot = (torch.randn(3, T, 37, generator=g, dtype=dtype), torch.randn(3, 37, generator=g, dtype=dtype))
    ref = ops.lif_torch(x, v0, tau, v_th, alpha)
    got = cpu.lif(x, v0, tau, v_th, alpha)
    for a, b in zip(got + _grads(got, (x, v0), cot), ref + _grads(ref, (x, v0), cot)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert 0.05 < ref[0].mean() < 0.95


def test_lif_fires_exactly_at_threshold_and_from_bf16():
    x = torch.tensor([[[2.0, 1.9999999, 0.5]]])  # h = x / 2: exactly, just under, far under v_th = 1
    s, _ = cpu.lif(x)
    assert s.flatten().tolist() == [1.0, 0.0, 0.0]
    xb = (torch.randn(2, 9, 5) * 2).bfloat16()
    for a, b in zip(cpu.lif(xb), ops.lif_torch(xb)):
        assert a.dtype == b.dtype and torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# GIF: an fp64 autograd reference of the spec (issue #13), surrogates as custom backward passes.
# --------------------------------------------------------------------------------------------------
def _sg(z, alpha):
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * z) ** 2)


class _Count(torch.autograd.Function):
    """s = clip(floor(h/theta), 0, L) / sign(h) min(floor(|h|/theta), L), surrogate backward."""

    @staticmethod
    def forward(ctx, h, theta, L, bipolar, surrogate, alpha):
        ctx.save_for_backward(h, theta)
        ctx.c = (L, bipolar, surrogate, alpha)
        if bipolar:
            return torch.sign(h) * torch.clamp(torch.floor(h.abs() / theta), max=L)
        return torch.clamp(torch.floor(h / theta), 0, L)

    @staticmethod
    def backward(ctx, g):
        h, th = ctx.saved_tensors
        L, bipolar, surrogate, alpha = ctx.c
        if surrogate == "ste":
            inside = (((h.abs() if bipolar else h) < (L + 1) * th) & ((h >= 0) | bipolar)).to(h.dtype)
            dh, dth = inside / th, -inside * h / th ** 2
        else:
            ks = range(1, L + 1)
            dh = sum(_sg(h - k * th, alpha) for k in ks)
            dth = sum(-k * _sg(h - k * th, alpha) for k in ks)
            if bipolar:
                dh = dh + sum(_sg(h + k * th, alpha) for k in ks)
                dth = dth + sum(k * _sg(h + k * th, alpha) for k in ks)
        return g * dh, (g * dth).sum(), None, None, None, None


class _Fired(torch.autograd.Function):
    """F = 1[s != 0] (first level), with the first level's surrogate."""

    @staticmethod
    def forward(ctx, h, theta, bipolar, surrogate, alpha):
        ctx.save_for_backward(h, theta)
        ctx.c = (bipolar, surrogate, alpha)
        return ((h.abs() if bipolar else h) >= theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, th = ctx.saved_tensors
        bipolar, surrogate, alpha = ctx.c
        if surrogate == "ste":
            inside = (((h.abs() if bipolar else h) < 2 * th) & ((h >= 0) | bipolar)).to(h.dtype)
            dh = inside * (torch.sign(h) if bipolar else 1) / th
            dth = -inside * (h.abs() if bipolar else h) / th ** 2
        elif bipolar:
            dh = _sg(h - th, alpha) - _sg(h + th, alpha)
            dth = -(_sg(h - th, alpha) + _sg(h + th, alpha))
        else:
            dh, dth = _sg(h - th, alpha), -_sg(h - th, alpha)
        return g * dh, (g * dth).sum(), None, None, None


def gif_spec(x, v0, theta, tau, L, bipolar, reset, surrogate, alpha):
    v, ys = v0, []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / tau
        s = _Count.apply(h, theta, L, bipolar, surrogate, alpha)
        ys.append(theta * s)
        if reset == "hard":
            v = h * (1 - _Fired.apply(h, theta, bipolar, surrogate, alpha))
        elif reset == "soft":
            v = h - theta * s
        else:
            v = torch.zeros_like(h)
    return torch.stack(ys, 1), v


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("bipolar", [False, True])
@pytest.mark.parametrize("reset", ["hard", "soft", "zero"])
@pytest.mark.parametrize("surrogate", ["atan", "ste"])
def test_gif_matches_the_spec_in_fp64(levels, bipolar, reset, surrogate):
    g = torch.Generator().manual_seed(levels + 2 * bipolar)
    x = (torch.randn(2, 23, 11, generator=g, dtype=torch.float64) * 3).requires_grad_()
    v0 = torch.randn(2, 11, generator=g, dtype=torch.float64).requires_grad_()
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    cot = (torch.randn(2, 23, 11, generator=g, dtype=torch.float64), torch.randn(2, 11, generator=g, dtype=torch.float64))
    args = (1.6, levels, bipolar, reset, surrogate, 2.5)
    got = cpu.gif(x, v0, theta, *args)
    want = gif_spec(x, v0, theta, *args)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(got, (x, v0, theta), cot), _grads(want, (x, v0, theta), cot)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[0].abs().max() > theta * min(levels, 2) - 1e-9  # several levels are reached


def test_gif_at_one_level_is_lif_and_levels_reach_their_boundaries():
    x = (torch.randn(3, 30, 8) * 2).requires_grad_()
    a, b = cpu.gif(x, levels=1), cpu.lif(x)
    cot = (torch.randn(3, 30, 8), torch.randn(3, 8))
    for p, q in zip(a + _grads(a, (x,), cot), b + _grads(b, (x,), cot)):
        assert torch.equal(p, q)
    theta = 0.5  # h exactly k theta (h = x / tau, first token, v0 = 0) reaches level k
    h = torch.tensor([-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
    y, _ = cpu.gif(2 * h[None, None], theta=theta, levels=3)
    assert (y.flatten() / theta).tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 3]
    y, _ = cpu.gif(2 * h[None, None], theta=theta, levels=3, bipolar=True)
    assert (y.flatten() / theta).tolist() == [-3, -2, -1, 0, 0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="levels >= 1"):
        cpu.gif(x, levels=0)


# --------------------------------------------------------------------------------------------------
# WKV.
# --------------------------------------------------------------------------------------------------
def _wkv_inputs(dtype, B=3, T=70, C=13, empty=False, k_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(C, generator=g, dtype=dtype))
    u = torch.randn(C, generator=g, dtype=dtype)
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    if empty:
        state = ops.empty_wkv_state(B, C)
        state = tuple(s.to(dtype) for s in state)
    else:
        state = (torch.randn(B, C, generator=g, dtype=dtype), torch.rand(B, C, generator=g, dtype=dtype) + 0.5,
                 torch.randn(B, C, generator=g, dtype=dtype))
    leaves = [t.clone().requires_grad_() for t in (w, u, k, v, *state)]
    cot = (torch.randn(B, T, C, generator=g, dtype=dtype), torch.randn(B, C, generator=g, dtype=dtype),
           torch.randn(B, C, generator=g, dtype=dtype))
    return leaves, cot


def _run_wkv(fn, leaves, cot):
    w, u, k, v, p, q, o = leaves
    y, (p1, q1, o1) = fn(w, u, k, v, (p, q, o))
    assert torch.equal(q1, torch.ones_like(q1))
    grads = _grads((y, p1, o1), leaves, cot)
    return [y, p1, o1, *[torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]]


@pytest.mark.parametrize("T,empty", [(1, True), (70, False), (70, True), (5, False)])
def test_wkv_matches_the_reference_in_fp64(T, empty):
    leaves, cot = _wkv_inputs(torch.float64, T=T, empty=empty)
    got, want = _run_wkv(cpu.wkv, leaves, cot), _run_wkv(ops.wkv_torch, leaves, cot)
    for name, a, b in zip("y p o gw gu gk gv gp0 gq0 go0".split(), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("k_scale,value_tol", [(2.0, 2e-5), (40.0, 2e-4)])
def test_wkv_fp32_is_close_to_the_fp64_truth(k_scale, value_tol):
    """k_scale 40: k spans hundreds of nats, where the reference recomputes in fp64 and the fused scan's
    fp32 exponent differences (of numbers ~100) cost ~1e-5 relative each: values to 2e-4 there."""
    leaves64, cot64 = _wkv_inputs(torch.float64, k_scale=k_scale, seed=1)
    truth = _run_wkv(ops.wkv_torch, leaves64, cot64)
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    cot = tuple(c.float() for c in cot64)
    for fn in (cpu.wkv, ops.wkv_torch):
        out = _run_wkv(fn, leaves, cot)
        for name, a, b in zip("y p o gw gu gk gv gp0 gq0 go0".split(), out, truth):
            assert a.dtype == torch.float32, name
            scale = max(1.0, b.abs().max().item()) if name in "ypo" else b.abs().max().item()
            tol = value_tol if name in "ypo" else 1e-4
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale, msg=f"{fn.__name__} {name}")


def test_wkv_from_the_empty_state_has_finite_state_gradients_and_bf16_runs():
    leaves, cot = _wkv_inputs(torch.float32, T=9, empty=True)
    out = _run_wkv(cpu.wkv, leaves, cot)
    assert all(torch.isfinite(t).all() for t in out)
    assert torch.equal(out[-3], torch.zeros_like(out[-3])) and torch.equal(out[-1], torch.zeros_like(out[-1]))
    w, u, k, v = (t.detach() for t in leaves[:4])
    yb, state = cpu.wkv(w, u, k.bfloat16(), v.bfloat16())
    yr, _ = ops.wkv_torch(w, u, k.bfloat16(), v.bfloat16())
    assert yb.dtype == torch.bfloat16 and state[0].dtype == torch.float32
    torch.testing.assert_close(yb.float(), yr.float(), rtol=0, atol=2e-2)


# --------------------------------------------------------------------------------------------------
# Token-shift mixes.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_token_shift_mix_is_the_model_expression(dtype, tol):
    from spikegpt.model import token_shift

    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 9, 16, generator=g, dtype=dtype).requires_grad_()
    last = torch.randn(3, 16, generator=g, dtype=dtype).requires_grad_()
    mus = [torch.rand(1, 1, 16, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]
    cot = torch.randn(3, 3, 9, 16, generator=g, dtype=dtype)
    zs = token_shift(z, last)
    want = torch.stack([z * mu + zs * (1 - mu) for mu in mus])
    got = cpu.token_shift_mix(z, last, torch.stack(mus))
    assert torch.equal(got, want)
    for a, b in zip(_grads((got,), (z, last, *mus), (cot,)), _grads((want,), (z, last, *mus), (cot,))):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_square_is_bitwise_the_reference(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 96, generator=g, dtype=dtype) * 3
    x[0, 0, :4] = torch.tensor([0.0, -0.0, float("nan"), 1e-30], dtype=dtype)
    x = x.requires_grad_()
    cot = torch.randn(5, 7, 96, generator=g, dtype=dtype)
    want, got = ops.relu_square_torch(x), cpu.relu_square(x)
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    (gw,), (gg,) = _grads((want,), (x,), (cot,)), _grads((got,), (x,), (cot,))
    assert torch.equal(gg.nan_to_num(), gw.nan_to_num()) and torch.equal(gg.isnan(), gw.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_gate_is_bitwise_the_reference(dtype):
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(4, 9, 80, generator=g, dtype=dtype) * 6).requires_grad_()
    y = torch.randn(4, 9, 80, generator=g, dtype=dtype).requires_grad_()
    cot = torch.randn(4, 9, 80, generator=g, dtype=dtype)
    want, got = ops.sigmoid_gate_torch(a, y), cpu.sigmoid_gate(a, y)
    assert torch.equal(got, want)
    assert all(torch.equal(x, w) for x, w in zip(_grads((got,), (a, y), (cot,)), _grads((want,), (a, y), (cot,))))


def test_the_model_runs_its_mixes_squared_relu_and_gates_fused_bitwise(monkeypatch):
    """With only the mixes, the squared ReLU and the gates fused (WKV and the neuron on their
    references), the model's logits and loss are bitwise those of ``--kernels torch``; its gradients
    agree to 1e-5 of the largest."""
    from spikegpt import ModelConfig, SpikeGPT

    cfg = ModelConfig(vocab_size=11, n_layer=2, n_embd=16, ctx_len=8, dropout=0.0)
    torch.manual_seed(0)
    model = SpikeGPT(cfg).train()
    idx, tgt = torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8))

    def run():
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, tgt)
        loss.backward()
        return logits, loss, [p.grad.clone() for p in model.parameters()]

    with ops.use_backend("torch"):
        want = run()
    monkeypatch.setattr(ops, "wkv", lambda *a: ops.wkv_torch(*a))
    monkeypatch.setattr(ops, "lif", lambda *a: ops.lif_torch(*a))
    with ops.use_backend("auto"):
        z = torch.randn(3, 8, 16, requires_grad=True)
        assert type(ops.token_shift_mix(z, z[:, 0], [model.blocks[0].att.time_mix_k])[0].grad_fn).__name__ \
            == "UnbindBackward0"
        assert type(ops.relu_square(z).grad_fn).__name__ == "_ReluSquareBackward"
        assert type(ops.sigmoid_gate(z, z).grad_fn).__name__ == "_SigmoidGateBackward"
        got = run()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


# --------------------------------------------------------------------------------------------------
# Dispatch, determinism, fallback.
# --------------------------------------------------------------------------------------------------
def test_auto_runs_cpu_tensors_fused_and_torch_keeps_the_references():
    x = torch.randn(2, 6, 4, requires_grad=True)
    k, v = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 6, 4)
    w, u = -torch.rand(4), torch.randn(4)
    with ops.use_backend("auto"):
        assert type(ops.lif(x)[0].grad_fn).__name__ == "_NeuronBackward"
        assert type(ops.wkv(w, u, k, v)[0].grad_fn).__name__ == "_WKVBackward"
        assert type(ops.wkv(w, u, k[:, :1], v[:, :1])[0].grad_fn).__name__ != "_WKVBackward"  # one token
    with ops.use_backend("torch"):
        assert type(ops.lif(x)[0].grad_fn).__name__ == "_LIFBackward"
        assert type(ops.wkv(w, u, k, v)[0].grad_fn).__name__ != "_WKVBackward"


def test_results_do_not_depend_on_the_thread_count():
    leaves, cot = _wkv_inputs(torch.float32, B=5, T=20, C=16)
    x = (torch.randn(5, 20, 16) * 2).requires_grad_()
    theta = torch.tensor(0.6, requires_grad=True)

    def run():
        gif = cpu.gif(x, None, theta, 2.0, 3, True, "soft", "atan", 2.0)
        return _run_wkv(cpu.wkv, leaves, cot) + list(gif) + list(_grads(gif, (x, theta), (x.detach(), 0 * gif[1])))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_a_failed_build_warns_once_and_leaves_the_references(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setattr(cpp_extension, "get_cxx_compiler", lambda: "no-such-compiler-for-spikegpt")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler \(no-such-compiler-for-spikegpt\)"):
        assert not cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu.available()
        x = torch.randn(2, 5, 3)
        assert type(ops.lif(x.requires_grad_())[0].grad_fn).__name__ == "_LIFBackward"
    with pytest.raises(RuntimeError, match="fused CPU ops unavailable"):
        cpu.lif(x)


def test_bench_cpu_ops_smoke():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_cpu_ops import main

    result = main(["--smoke", "--shapes", "tiny"])
    row = result["shapes"]["tiny"]
    assert set(row["seconds_per_step"]) == {"spikegpt-reference", "spikegpt-fused", "transformer"}
    assert all(t > 0 for op in row["op_ms_forward_backward"].values() for t in op.values())


# --------------------------------------------------------------------------------------------------
# GIF: the fused neuron against ops.gif_torch, the model's own reference.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels,bipolar,reset,surrogate", [
    (1, False, "hard", "atan"), (4, True, "soft", "atan"), (2, False, "soft", "ste"), (8, True, "hard", "ste"),
    (4, True, "zero", "atan")])
def test_gif_is_the_model_reference(dtype, levels, bipolar, reset, surrogate):
    """Values, membrane, grad x and grad v0 bitwise; the threshold gradient (a sum over every element,
    in another order) to 1e-5 relative."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 33, 19, generator=g, dtype=dtype) * 2).requires_grad_()
    v0 = torch.randn(2, 19, generator=g, dtype=dtype).requires_grad_()
    theta = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    cot = (torch.randn(2, 33, 19, generator=g, dtype=dtype), torch.randn(2, 19, generator=g, dtype=dtype))
    ref = ops.gif_torch(x, v0, theta, 2.0, levels, bipolar, reset, surrogate, 2.0)
    got = cpu.gif(x, v0, theta, 2.0, levels, bipolar, reset, surrogate, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    gr = _grads(ref, (x, v0, theta), cot)
    gg = _grads(got, (x, v0, theta), cot)
    assert torch.equal(gg[0], gr[0]) and torch.equal(gg[1], gr[1])
    assert torch.allclose(gg[2], gr[2], rtol=1e-5, atol=1e-6 * gr[0].abs().max().item())
