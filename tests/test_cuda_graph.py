"""The recurrent step captured in a CUDA graph (spikegpt.recurrent, issue 17).

On a CPU the capture backend is replaced by a stand-in whose "replay" re-runs the captured closure:
like a graph, it reads only the static buffers, so these tests check the wrapper's logic (inputs
copied in, outputs copied out, one graph per batch size, recapture after a parameter change, the
fallback).  The GPU test checks the real thing: a replayed graph gives bitwise the eager step."""
import warnings

import pytest
import torch

from spikegpt import ops
from spikegpt.recurrent import CudaGraphs, RecurrentDecoder
from test_recurrent import spiking_model

CUDA = torch.cuda.is_available()


class ReplayByRerun:
    """A capture backend for CPUs: warm-up run, then the closure itself as the replay."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.captures = 0

    def unavailable(self, device):
        return None

    def capture(self, run, device):
        run()
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
        self.captures += 1
        return run


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def decode(decoder, model, idx):
    """Logits and states of every step from the initial state; checks that no input is modified."""
    state = model.initial_state(idx.shape[0], device=idx.device)
    logits, states = [], []
    for t in range(idx.shape[1]):
        given, before = state, state.clone()
        out, state = decoder.step(idx[:, t], given)
        assert torch.equal(given, before)  # the input state is untouched
        logits.append(out)
        states.append(state)
    return torch.stack(logits, 1), torch.stack(states)


def test_graph_wrapper_equals_the_eager_step():
    """Static buffers in and out, per batch size, across prompts: bitwise the uncaptured step, and
    outputs never alias (the logits of earlier steps survive later replays)."""
    model = spiking_model(2, 37)
    backend = ReplayByRerun()
    graphed = RecurrentDecoder(model, graph_backend=backend)
    eager = RecurrentDecoder(model, cuda_graph="off", script=False)
    assert graphed.graph_fallback is None and eager.graph_fallback == "cuda_graph='off'"
    gen = torch.Generator().manual_seed(0)
    for batch, captures in [(1, 1), (3, 2), (1, 2)]:  # back to batch 1: its graph is reused
        idx = torch.randint(0, 37, (batch, 10), generator=gen)
        got, want = decode(graphed, model, idx), decode(eager, model, idx)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert backend.captures == graphed.graph_captures == captures
    assert graphed.graph_fallback is None


def test_graphs_follow_parameters_and_spike_collection():
    model = spiking_model(2, 37)
    backend = ReplayByRerun()
    graphed = RecurrentDecoder(model, graph_backend=backend)
    eager = RecurrentDecoder(model, cuda_graph="off")
    idx = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(1))
    decode(graphed, model, idx)
    with torch.no_grad():
        model.blocks[0].att.time_decay.add_(0.5)  # in place: same storage, new values to precompute
    got, want = decode(graphed, model, idx), decode(eager, model, idx)
    assert torch.equal(got[0], want[0]) and graphed.graph_captures == 2
    graphed.collect_spikes = eager.collect_spikes = True
    got, want = decode(graphed, model, idx), decode(eager, model, idx)
    assert torch.equal(got[0], want[0]) and graphed.graph_captures == 3
    assert graphed.spike_counts.sum() > 0 and torch.equal(graphed.spike_counts, eager.spike_counts)
    assert graphed.spike_steps == eager.spike_steps == 2 * 6


def test_graphs_per_batch_size_are_bounded():
    model = spiking_model(1, 37, n_embd=16)
    graphed = RecurrentDecoder(model, graph_backend=ReplayByRerun())
    for batch in range(1, 7):
        graphed.step(torch.zeros(batch, dtype=torch.long), model.initial_state(batch))
    assert graphed.graph_captures == 6 and len(graphed._graphs) == 4


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_capture_failure_falls_back(mode):
    """A capture error: the step runs uncaptured, with the reason recorded; 'on' warns once."""
    model = spiking_model(2, 37)
    graphed = RecurrentDecoder(model, cuda_graph=mode, graph_backend=ReplayByRerun(fail=True))
    eager = RecurrentDecoder(model, cuda_graph="off")
    idx = torch.randint(0, 37, (1, 5), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = decode(graphed, model, idx)
    assert torch.equal(got[0], decode(eager, model, idx)[0])
    assert graphed.graph_fallback == "capture failed (RuntimeError: operation not permitted when stream is capturing)"
    assert graphed.graph_captures == 0
    assert [str(w.message) for w in caught] == ([] if mode == "auto" else
                                                [f"CUDA graph {graphed.graph_fallback}; decoding without it"])


def test_cpu_model_without_graphs():
    """With torch.cuda's backend a CPU model decodes uncaptured ('auto'), and 'on' is refused."""
    model = spiking_model(1, 37, n_embd=16)
    dec = RecurrentDecoder(model)
    dec.step(torch.zeros(1, dtype=torch.long), model.initial_state(1))
    assert dec.graph_fallback == "CUDA graphs need a CUDA device, the model is on cpu" and dec.graph_captures == 0
    assert CudaGraphs().unavailable(torch.device("cuda")) is None
    with pytest.raises(ValueError, match="cuda_graph='on': CUDA graphs need a CUDA device, the model is on cpu; "
                                         "use 'auto' or 'off'"):
        RecurrentDecoder(model, cuda_graph="on")
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        RecurrentDecoder(model, cuda_graph="yes")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("weights", [None, torch.bfloat16], ids=["fp32", "bf16-weights"])
def test_cuda_graph_is_bitwise_the_eager_step(weights):
    """On a GPU: torch.cuda's graphs capture, and their replays are bitwise the eager step (same
    kernels), at batch 1 and 4, across prompts, with neurons firing; and within the recurrent
    tolerance of the parallel path."""
    model = spiking_model(3, 97, n_embd=64).cuda()
    graphed = RecurrentDecoder(model, weights, cuda_graph="on")
    eager = RecurrentDecoder(model, weights, cuda_graph="off", script=False)
    eager.collect_spikes = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch in (1, 4, 1):
        idx = torch.randint(0, 97, (batch, 12), device="cuda", generator=gen)
        got, want = decode(graphed, model, idx), decode(eager, model, idx)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if weights is None:
            with torch.no_grad(), ops.use_backend("torch"):  # the reference kernels, whose arithmetic the step mirrors
                parallel = model(idx)
            assert (got[0] - parallel).abs().max() <= 1e-4
    assert graphed.graph_fallback is None and graphed.graph_captures == 2
    assert eager.spike_counts.sum() > 0
