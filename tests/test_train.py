"""The trainer: learning, exact resume (with kills, also during a save), user errors, the CLI."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import spikegpt
from spikegpt import train as train_mod
from spikegpt.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from spikegpt.data import prepare_splits

REPO = Path(__file__).resolve().parents[1]
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
        "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
        "of Light, it was the season of Darkness, it was the spring of hope, it was the winter of "
        "despair, we had everything before us, we had nothing before us. ") * 40


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "byte"
    prepare_splits(TEXT, d, vocab="byte", val_fraction=0.1)
    return d


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "char"
    prepare_splits(TEXT, d, vocab="char", val_fraction=0.1)
    return d


def small_args(data_dir, out_dir, *extra) -> list[str]:
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--n-layer", "2", "--n-embd", "32",
            "--ctx-len", "32", "--batch-size", "4", "--max-iters", "12", "--eval-interval", "0",
            "--log-interval", "1", "--checkpoint-interval", "3", "--sample-tokens", "0", "--lr", "3e-3",
            "--warmup-iters", "2", "--eval-max-tokens", "200", "--seed", "7", *extra]


def run_train(argv) -> dict:
    return train_mod.run(train_mod.build_parser().parse_args(argv))


def step_losses(out_dir) -> dict:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "final_eval" not in r}


def final_params(out_dir) -> dict:
    return read_checkpoint(out_dir)["model"]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_decreases_loss(byte_data, tmp_path):
    result = run_train(small_args(byte_data, tmp_path / "run", "--max-iters", "60"))
    losses = step_losses(tmp_path / "run")
    assert losses[60] < losses[1] - 1.0, (losses[1], losses[60])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_log, final = records[-2], records[-1]
    for record, prefix in ((train_log, "train_rate/"), (final, "rate/")):  # firing rates are logged
        assert {f"{prefix}att.1", f"{prefix}ffn.0", f"{prefix}emb", f"{prefix}all"} <= record.keys()
        assert 0.0 <= record[f"{prefix}all"] <= 1.0 and 0.3 < record[f"{prefix}emb"] < 0.7
    assert result["final_loss"] < 4.0
    assert result["final_bits_per_byte"] == pytest.approx(result["final_bits_per_token"])
    model = spikegpt.load(tmp_path / "run")
    assert not model.training and model.tokenizer.decode(model.tokenizer.encode("best of")) == "best of"


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs but `finally` blocks."""


def test_resume_after_kill_is_bitwise_exact(byte_data, tmp_path, monkeypatch):
    run_train(small_args(byte_data, tmp_path / "straight"))

    real_sample = train_mod.sample_batch

    def dying_sample(*a, step, **kw):
        if step == 7:  # after the checkpoint of step 6, in the middle of step 7
            raise Killed()
        return real_sample(*a, step=step, **kw)

    monkeypatch.setattr(train_mod, "sample_batch", dying_sample)
    with pytest.raises(Killed):
        run_train(small_args(byte_data, tmp_path / "resumed"))
    assert latest_checkpoint(tmp_path / "resumed").name == "ckpt-00000006.pt"
    monkeypatch.setattr(train_mod, "sample_batch", real_sample)
    run_train(small_args(byte_data, tmp_path / "resumed"))

    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"))
    assert step_losses(tmp_path / "straight") == step_losses(tmp_path / "resumed")


def test_kill_during_save_keeps_previous_checkpoint(byte_data, tmp_path, monkeypatch):
    run_train(small_args(byte_data, tmp_path / "straight"))
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *a, **kw):
        calls.append(obj["step"])
        if obj["step"] == 9:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise Killed()
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        run_train(small_args(byte_data, tmp_path / "resumed"))
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")][-1] == "ckpt-00000006.pt"
    run_train(small_args(byte_data, tmp_path / "resumed"))
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"))
    assert step_losses(tmp_path / "straight") == step_losses(tmp_path / "resumed")


def test_sigkill_of_a_real_process_then_resume(byte_data, tmp_path):
    """SIGKILL a training process at an arbitrary moment (checkpoints every step, so often during
    a save), resume it, and get the parameters of the uninterrupted run."""
    argv = small_args(byte_data, tmp_path / "killed", "--max-iters", "150", "--checkpoint-interval", "1",
                      "--n-layer", "1", "--n-embd", "16", "--ctx-len", "16")
    straight = small_args(byte_data, tmp_path / "straight", *argv[argv.index("--max-iters"):])
    cmd = [sys.executable, str(REPO / "train.py")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd + argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list_checkpoints(tmp_path / "killed")) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(tmp_path / "killed")
    assert killed_at is not None and killed_at.name != "ckpt-00000150.pt", "the run ended before the kill"
    subprocess.run(cmd + argv, env=env, check=True, capture_output=True)
    subprocess.run(cmd + straight, env=env, check=True, capture_output=True)
    assert_same_params(final_params(tmp_path / "straight"), final_params(tmp_path / "killed"))
    assert step_losses(tmp_path / "straight") == step_losses(tmp_path / "killed")


# ----------------------------------------------------------------------------------------------
# Errors a user can make: one clear message, exit code 2, nothing lost.
# ----------------------------------------------------------------------------------------------
def cli_error(argv, capsys) -> str:
    assert train_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_data_dir(tmp_path, capsys):
    err = cli_error(small_args(tmp_path / "nope", tmp_path / "run"), capsys)
    assert "does not exist" in err and "prepare_text.py" in err


def test_context_longer_than_split(byte_data, tmp_path, capsys):
    err = cli_error(small_args(byte_data, tmp_path / "run", "--ctx-len", "100000"), capsys)
    assert "--ctx-len" in err and "tokens" in err


def test_vocab_mismatch_on_resume(byte_data, char_data, tmp_path, capsys):
    run_train(small_args(byte_data, tmp_path / "run", "--max-iters", "3"))
    err = cli_error(small_args(char_data, tmp_path / "run", "--max-iters", "6"), capsys)
    assert "vocab" in err and "256" in err
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-00000003.pt"


def test_architecture_flags_contradicting_checkpoint(byte_data, tmp_path, capsys):
    run_train(small_args(byte_data, tmp_path / "run", "--max-iters", "3"))
    err = cli_error(small_args(byte_data, tmp_path / "run", "--max-iters", "6", "--n-layer", "3"), capsys)
    assert "n_layer=3 (checkpoint: 2)" in err


def test_corrupt_checkpoint_is_reported_and_kept(byte_data, tmp_path, capsys):
    run_train(small_args(byte_data, tmp_path / "run", "--max-iters", "3"))
    ckpt = latest_checkpoint(tmp_path / "run")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    err = cli_error(small_args(byte_data, tmp_path / "run", "--max-iters", "6"), capsys)
    assert "corrupt or truncated" in err and ckpt.name in err
    assert ckpt.stat().st_size == len(data) // 2  # left for the user to inspect


def test_resume_never_refuses_to_overwrite(byte_data, tmp_path, capsys):
    run_train(small_args(byte_data, tmp_path / "run", "--max-iters", "3"))
    err = cli_error(small_args(byte_data, tmp_path / "run", "--resume", "never"), capsys)
    assert "--resume auto" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(byte_data, tmp_path, capsys, monkeypatch):
    real_forward = spikegpt.SpikeGPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(spikegpt.SpikeGPT, "forward", poisoned)
    err = cli_error(small_args(byte_data, tmp_path / "run"), capsys)
    assert "at step 5" in err and "ckpt-00000003.pt" in err
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt-00000003.pt"]


# ----------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------
def test_cli_smoke(byte_data, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "train.py"), *small_args(byte_data, tmp_path / "run"),
                          "--max-iters", "4", "--keep-checkpoints", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "final val" in out.stdout
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt-00000004.pt"]
    ckpt = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["tokens_seen"] == 4 * 4 * 32
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_config"]["n_layer"] == 2


def test_cli_help_lists_contract_flags():
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True)
    for flag in ["--data-dir", "--preset", "--n-layer", "--n-embd", "--ctx-len", "--batch-size", "--grad-accum",
                 "--max-iters", "--lr", "--min-lr", "--warmup-iters", "--weight-decay", "--grad-clip",
                 "--eval-interval", "--eval-iters", "--out-dir", "--resume", "--seed", "--device", "--dtype",
                 "--wandb-mode", "--log-interval", "--eval-carry-state", "--kernels"]:
        assert flag in out.stdout, flag


def test_grad_accum_matches_bigger_batch(byte_data, tmp_path):
    """Two micro-batches of 4 give the mean gradient of their 8 sequences (dropout off)."""
    common = ["--dropout", "0", "--max-iters", "1", "--grad-clip", "0"]
    run_train(small_args(byte_data, tmp_path / "accum", *common, "--grad-accum", "2"))
    model = spikegpt.load(tmp_path / "accum")
    assert model is not None  # the run completes; the equivalence itself is checked below
    torch.manual_seed(7)
    ref = spikegpt.SpikeGPT(model.config)
    x0, y0 = train_mod.sample_batch(train_mod.open_split(byte_data, "train"), 4, 32, seed=7, step=0, micro_step=0)
    x1, y1 = train_mod.sample_batch(train_mod.open_split(byte_data, "train"), 4, 32, seed=7, step=0, micro_step=1)
    ref.train()
    opt = train_mod.make_optimizer(ref, train_mod.TrainConfig(lr=3e-3))
    for g in opt.param_groups:
        g["lr"] = train_mod.learning_rate(0, train_mod.TrainConfig(lr=3e-3, warmup_iters=2, max_iters=1, min_lr=1e-4))
    (ref(x0, y0)[1] / 2).backward()
    (ref(x1, y1)[1] / 2).backward()
    opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)


def test_wandb_offline_needs_no_network(byte_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional dependency (pip install -e '.[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_train(small_args(byte_data, tmp_path / "run", "--max-iters", "2", "--wandb-mode", "offline"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run was written"


def test_init_from_starts_a_new_run_from_the_weights(byte_data, tmp_path):
    run_train(small_args(byte_data, tmp_path / "base", "--max-iters", "3"))
    base = final_params(tmp_path / "base")
    run_train(small_args(byte_data, tmp_path / "tuned", "--max-iters", "2", "--lr", "1e-5",
                         "--init-from", str(tmp_path / "base")))
    tuned = read_checkpoint(tmp_path / "tuned")
    assert tuned["step"] == 2 and tuned["train_config"]["lr"] == 1e-5
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["init_from"].endswith("ckpt-00000003.pt")
    # A small learning rate moves the weights only a little away from the base model's.
    drift = max((tuned["model"][k] - base[k]).abs().max().item() for k in base)
    assert 0 < drift < 1e-3


def test_gif_training_logs_mean_abs_and_effective_bits(byte_data, tmp_path):
    run_train(small_args(byte_data, tmp_path / "gif", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                         "--neuron", "gif", "--levels", "2", "--v-threshold", "0.05"))
    records = [json.loads(line) for line in (tmp_path / "gif" / "metrics.jsonl").read_text().splitlines()]
    train_log = [r for r in records if "loss" in r and "final_eval" not in r][-1]
    val, final = [r for r in records if "val_loss" in r][-1], records[-1]
    for record, prefix in ((train_log, "train_"), (val, ""), (final, "")):
        keys = {f"{prefix}{f}/{k}" for f in ("mean_abs_s", "effective_bits") for k in ("att.0", "ffn.1", "all")}
        assert keys <= record.keys()
        assert record[f"{prefix}mean_abs_s/all"] >= record[f"{prefix}rate/all"] > 0
        assert 0 < record[f"{prefix}effective_bits/all"] <= math.log2(5)  # levels -2..2


def test_periodic_evaluation_of_a_real_valued_embedding(byte_data, tmp_path, capsys):
    # A model without embedding spikes (e.g. a reference import with --no-binary-embedding): the
    # evaluation line reports the branches' rates only.
    from spikegpt.checkpoint import save_model
    torch.manual_seed(0)
    lm = spikegpt.SpikeGPT(spikegpt.ModelConfig(n_layer=2, n_embd=32, ctx_len=32, binary_embedding=False))
    save_model(tmp_path / "base" / "ckpt-00000000.pt", lm)
    run_train(small_args(byte_data, tmp_path / "real", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                         "--init-from", str(tmp_path / "base")))
    line = [ln for ln in capsys.readouterr().out.splitlines() if "firing rate att" in ln][-1]
    assert " ffn " in line and " emb " not in line
