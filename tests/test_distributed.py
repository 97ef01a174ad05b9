"""Multi-process training with torchrun (gloo on CPU) equals one process with more accumulation, and
the spike records summed over processes equal those of one process that saw every batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikegpt import ModelConfig, SpikeGPT
from spikegpt.checkpoint import read_checkpoint
from spikegpt.data import prepare_splits, sample_offsets
from spikegpt.spikes import record_spikes

REPO = Path(__file__).resolve().parents[1]
TEXT = ("A spiking neuron integrates its input and fires when its membrane crosses a threshold; "
        "the language model reads one token per time step. ") * 60


def common(data, out):
    return ["--data-dir", str(data), "--out-dir", str(out), "--n-layer", "2", "--n-embd", "32", "--ctx-len", "24",
            "--batch-size", "3", "--max-iters", "3", "--dropout", "0", "--eval-interval", "2", "--eval-iters", "3",
            "--log-interval", "1", "--sample-tokens", "0", "--eval-max-tokens", "300", "--device", "cpu",
            "--seed", "5", "--threads", "1"]


def test_two_processes_equal_one_with_double_accumulation(tmp_path):
    data = tmp_path / "data"
    prepare_splits(TEXT, data, vocab="byte", val_fraction=0.1)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train.py"), *common(data, tmp_path / "ddp"), "--grad-accum", "1"],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 6 sequences = 3 per device x 1 accumulation x 2 processes" in two.stdout
    one = subprocess.run([sys.executable, str(REPO / "train.py"), *common(data, tmp_path / "single"),
                          "--grad-accum", "2"], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = read_checkpoint(tmp_path / "ddp")["model"], read_checkpoint(tmp_path / "single")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # Only rank 0 writes: one set of checkpoints, one metrics file with one record per step.
    steps = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
             and "final_eval" not in line]
    assert len(steps) == 3
    # Firing rates cover the whole global batch (all ranks' spikes), as in the single process.
    records = {}
    for run in ("ddp", "single"):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        records[run] = {k: v for r in lines for k, v in r.items() if k.startswith(("rate/", "train_rate/"))
                        for k in [f"{r.get('step')}:{r.get('final_eval', '')}:{k}"]}
    assert records["ddp"] and records["ddp"].keys() == records["single"].keys()
    for k, v in records["ddp"].items():
        assert v == pytest.approx(records["single"][k], abs=1e-9), k


@pytest.mark.parametrize("accum", [1, 4])
def test_ranks_never_draw_the_same_windows(accum):
    for step in range(20):
        rank0 = [tuple(sample_offsets(10_000, 8, 64, 1, step, micro_step=0 * accum + m)) for m in range(accum)]
        rank1 = [tuple(sample_offsets(10_000, 8, 64, 1, step, micro_step=1 * accum + m)) for m in range(accum)]
        assert not set(rank0) & set(rank1)


RANK_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from spikegpt import ModelConfig, SpikeGPT
from spikegpt.spikes import all_reduce_spike_stats, record_spikes
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(0)
m = SpikeGPT(ModelConfig(vocab_size=50, n_layer=2, n_embd=8, ctx_len=16, neuron="gif", levels=2,
                         polarity="bipolar", v_threshold=0.1)).eval()
idx = torch.randint(0, 50, (2, 12 + 4 * rank), generator=torch.Generator().manual_seed(rank))
with torch.no_grad(), record_spikes(m):
    m(idx)
all_reduce_spike_stats(m)
torch.save({"records": [(n.spike_counts, n.spike_abs, n.level_counts, n.spike_steps)
                        for b in m.blocks for n in (b.lif1, b.lif2)],
            "emb": (m.emb.spike_ones, m.emb.spike_elems)}, out)
dist.destroy_process_group()
"""


def test_all_reduce_sums_every_spike_record(tmp_path):
    """Two gloo ranks record different batches; after the all-reduce each holds the records of one
    process that ran both batches: spike counts, sums of |s|, level counts, steps, embedding ones."""
    init = f"file://{tmp_path / 'init'}"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), init, str(tmp_path / f"{r}.pt")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    torch.manual_seed(0)
    m = SpikeGPT(ModelConfig(vocab_size=50, n_layer=2, n_embd=8, ctx_len=16, neuron="gif", levels=2,
                             polarity="bipolar", v_threshold=0.1)).eval()
    with torch.no_grad(), record_spikes(m):
        for rank in (0, 1):
            m(torch.randint(0, 50, (2, 12 + 4 * rank), generator=torch.Generator().manual_seed(rank)))
    single = [(n.spike_counts, n.spike_abs, n.level_counts, n.spike_steps) for b in m.blocks for n in (b.lif1, b.lif2)]
    assert any(int(s[1].sum()) > int(s[0].sum()) for s in single)  # multi-level: |s| > 1 somewhere
    for r in (0, 1):
        got = torch.load(tmp_path / f"{r}.pt")
        for (c, a, h, steps), (c1, a1, h1, steps1) in zip(got["records"], single):
            assert torch.equal(c, c1) and torch.equal(a, a1) and torch.equal(h, h1)
            assert steps == steps1 == 2 * 12 + 2 * 16
        assert got["emb"] == (float(m.emb.spike_ones), m.emb.spike_elems)
