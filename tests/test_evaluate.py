"""The whole-split evaluator and ``python -m spikegpt.evaluate``."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from spikegpt import ModelConfig, SpikeGPT
from spikegpt.checkpoint import save_model
from spikegpt.data import prepare_splits
from spikegpt.evaluate import evaluate_tokens
from spikegpt.tokenizer import ByteTokenizer

TEXT = "Every token after the first is predicted exactly once, whatever the window. " * 30


def uniform_model(V=256):
    model = SpikeGPT(ModelConfig(vocab_size=V, n_layer=1, n_embd=8))
    with torch.no_grad():
        model.head.weight.zero_()  # logits all zero: the uniform distribution
    return model.eval()


@pytest.mark.parametrize("window,streams,carry", [(7, 1, True), (16, 3, True), (5, 4, False), (64, 2, True)])
def test_uniform_model_gives_exactly_log_v(window, streams, carry):
    tokens = np.arange(1000) % 256
    r = evaluate_tokens(uniform_model(), tokens, window, carry, streams)
    assert r["predicted_tokens"] == 999
    # Exact up to fp32 rounding of log_softmax (ln 256 in fp32 is off by ~1e-7).
    assert r["loss"] == pytest.approx(math.log(256), abs=1e-6)
    assert r["bits_per_token"] == pytest.approx(8.0, abs=2e-6)


def test_every_token_predicted_once_and_parts_add_up():
    torch.manual_seed(0)
    model = SpikeGPT(ModelConfig(vocab_size=50, n_layer=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, 503)
    whole = evaluate_tokens(model, tokens, 32, True, streams=4)
    parts = [evaluate_tokens(model, tokens, 32, True, streams=2, part=(r, 2)) for r in range(2)]
    assert sum(p["predicted_tokens"] for p in parts) == whole["predicted_tokens"] == 502
    assert sum(p["nll_sum"] for p in parts) == pytest.approx(whole["nll_sum"], rel=1e-6)
    # One stream with state carried equals one parallel pass over the whole split.
    one = evaluate_tokens(model, tokens, 32, True, streams=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[None, :-1].astype(np.int64)))
    ref = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(tokens[1:].astype(np.int64)))
    assert one["loss"] == pytest.approx(ref.item(), rel=1e-5)


def test_cli_reports_units_and_refuses_vocab_mismatch(tmp_path):
    data = tmp_path / "data"
    prepare_splits(TEXT, data, vocab="byte", val_fraction=0.2)
    save_model(tmp_path / "uniform.pt", uniform_model(), tokenizer=ByteTokenizer())
    out = subprocess.run([sys.executable, "-m", "spikegpt.evaluate", "--ckpt", str(tmp_path / "uniform.pt"),
                          "--data-dir", str(data), "--json", str(tmp_path / "r.json"), "--window", "10"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["bits_per_byte"] == pytest.approx(8.0) and r["token_ppl"] == pytest.approx(256.0)
    assert r["stride"] == 10 and "carried" in r["context"]
    save_model(tmp_path / "v50.pt", uniform_model(50))
    out = subprocess.run([sys.executable, "-m", "spikegpt.evaluate", "--ckpt", str(tmp_path / "v50.pt"),
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "vocabulary mismatch" in out.stderr and "50" in out.stderr


def test_cli_picks_reference_settings(tmp_path, capsys):
    """A reference checkpoint records neither binary_embedding nor v_threshold: the evaluator takes
    both (the README's way to pick them is to compare these losses)."""
    from spikegpt.evaluate import main
    data = tmp_path / "data"
    prepare_splits(TEXT, data, vocab="byte", val_fraction=0.2)
    torch.manual_seed(0)
    model = SpikeGPT(ModelConfig(vocab_size=256, n_layer=2, n_embd=16))
    torch.save(model.state_dict(), tmp_path / "ref.pth")
    (tmp_path / "ref.json").write_text(json.dumps({"vocab_size": 256, "n_layer": 2, "n_embd": 16, "ctx_len": 32}))
    ref = ["--reference", str(tmp_path / "ref.pth"), "--reference-config", str(tmp_path / "ref.json"),
           "--data-dir", str(data), "--device", "cpu"]
    losses = {}
    for extra in ([], ["--no-binary-embedding"], ["--v-threshold", "0.01"]):
        assert main(ref + extra + ["--json", str(tmp_path / "r.json")]) == 0
        losses[" ".join(extra)] = json.loads((tmp_path / "r.json").read_text())["loss"]
    assert len(set(losses.values())) == 3, losses
    save_model(tmp_path / "ours.pt", model, tokenizer=ByteTokenizer())
    capsys.readouterr()
    assert main(["--ckpt", str(tmp_path / "ours.pt"), "--data-dir", str(data), "--no-binary-embedding"]) == 2
    assert "--reference imports only" in capsys.readouterr().err
