"""Careless and hostile use of the tools: nothing lost, one clear line, no traceback."""
import fcntl
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import spikegpt
from spikegpt import train as train_mod
from spikegpt.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, read_checkpoint, save_model
from spikegpt.data import prepare_splits
from spikegpt.rundir import RunLock

from test_train import TEXT, small_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "byte"
    prepare_splits(TEXT, d, vocab="byte", val_fraction=0.1)
    return d


def user_error(main, argv, capsys) -> str:
    """Run a tool's ``main``: it must end with status 2 and exactly one ``error:`` line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def snapshot(out_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------------------------
# Data loss.
# ----------------------------------------------------------------------------------------------
def test_a_run_directory_is_owned_by_one_run(byte_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        err = user_error(train_mod.main, small_args(byte_data, out), capsys)
    assert "is in use by process" in err and "--out-dir" in err
    assert list_checkpoints(out) == []


def test_a_killed_owner_releases_the_run_directory(byte_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with open(out / ".lock") as f:
        with pytest.raises(OSError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.kill()
    holder.wait()
    assert train_mod.main(small_args(byte_data, out, "--max-iters", "3")) == 0
    assert latest_checkpoint(out).name == "ckpt-00000003.pt"


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose update poisons the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_fifth_step(monkeypatch):
    real_forward = spikegpt.SpikeGPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                return out[0], _NanGrad.apply(out[1])
        return out

    monkeypatch.setattr(spikegpt.SpikeGPT, "forward", poisoned)


@pytest.mark.parametrize("clip", ["0", "1.0"])
def test_non_finite_weights_are_never_checkpointed(byte_data, tmp_path, capsys, monkeypatch, clip):
    poison_fifth_step(monkeypatch)
    out = tmp_path / "run"
    err = user_error(train_mod.main, small_args(byte_data, out, "--checkpoint-interval", "1", "--keep-checkpoints",
                                                "1", "--grad-clip", clip), capsys)
    assert "at step 5" in err or "after step 5" in err
    assert "ckpt-00000004.pt" in err
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000004.pt"]
    assert all(torch.isfinite(t).all() for t in read_checkpoint(out)["model"].values())


def test_resume_path_of_another_run_never_destroys_this_one(byte_data, tmp_path, capsys):
    assert train_mod.main(small_args(byte_data, tmp_path / "a", "--max-iters", "6")) == 0
    assert train_mod.main(small_args(byte_data, tmp_path / "b")) == 0
    before = snapshot(tmp_path / "b")
    capsys.readouterr()
    err = user_error(train_mod.main, small_args(byte_data, tmp_path / "b", "--resume",
                                                str(tmp_path / "a" / "ckpt-00000003.pt")), capsys)
    assert "ckpt-00000012.pt" in err and "empty --out-dir" in err
    assert snapshot(tmp_path / "b") == before


def test_convert_never_replaces_a_training_checkpoint(byte_data, tmp_path, capsys):
    from spikegpt.convert import main as convert_main
    assert train_mod.main(small_args(byte_data, tmp_path / "run", "--max-iters", "3")) == 0
    target = latest_checkpoint(tmp_path / "run")
    model = spikegpt.load(target)
    torch.save(model.state_dict(), tmp_path / "ref.pth")
    (tmp_path / "ref.json").write_text(json.dumps({"vocab_size": 256, "n_layer": 2, "n_embd": 32}))
    base = [str(tmp_path / "ref.pth"), "--config", str(tmp_path / "ref.json"), "--out", str(target)]
    original = target.read_bytes()
    capsys.readouterr()
    assert "--overwrite" in user_error(convert_main, base, capsys)
    assert "training checkpoint" in user_error(convert_main, base + ["--overwrite"], capsys)
    assert target.read_bytes() == original
    assert "directory" in user_error(convert_main, base[:-1] + [str(tmp_path)], capsys)
    assert convert_main(base[:-1] + [str(tmp_path / "converted.pt")]) == 0


# ----------------------------------------------------------------------------------------------
# Flags: refused at parse time, one usage line.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--batch-size", "0"), ("--grad-accum", "0"), ("--grad-accum", "-2"), ("--lr", "nan"), ("--lr", "0"),
    ("--min-lr", "-1"), ("--threads", "-1"), ("--grad-clip", "nan"), ("--eval-split", "bogus"),
    ("--dropout", "1"), ("--max-iters", "0"), ("--n-embd", "0"), ("--eval-iters", "0"), ("--seed", "x"),
    ("--keep-checkpoints", "-1"), ("--tau", "-2"), ("--log-interval", "0")])
def test_train_flags_are_validated_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.build_parser().parse_args(["--data-dir", "d", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


@pytest.mark.parametrize("module,argv", [
    ("spikegpt.evaluate", ["--ckpt", "x", "--data-dir", "d", "--window", "-1"]),
    ("spikegpt.evaluate", ["--ckpt", "x", "--data-dir", "d", "--streams", "0"]),
    ("spikegpt.analyze", ["--ckpt", "x", "--tokens", "0"]),
    ("spikegpt.generate", ["--ckpt", "x", "--top-p", "1.5"]),
    ("spikegpt.generate", ["--ckpt", "x", "--temperature", "-1"]),
    ("spikegpt.generate", ["--ckpt", "x", "--num-samples", "0"]),
    ("spikegpt.convert", ["x.pth", "--config", "c", "--out", "o", "--v-threshold", "0"]),
])
def test_other_tools_validate_flags(module, argv, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).build_parser().parse_args(argv)
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_bad_device_is_one_line(byte_data, tmp_path, capsys):
    err = user_error(train_mod.main, small_args(byte_data, tmp_path / "run", "--device", "bogus"), capsys)
    assert "--device bogus" in err


# ----------------------------------------------------------------------------------------------
# Files: full disk, wrong kinds, torn logs, foreign files.
# ----------------------------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint(byte_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train_mod.main(small_args(byte_data, out, "--max-iters", "3")) == 0
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 6:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    err = user_error(train_mod.main, small_args(byte_data, out, "--max-iters", "6"), capsys)
    assert "ckpt-00000006.pt" in err and "intact" in err and "inline_container" not in err.split(":")[0]
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000003.pt"]
    assert not list(out.glob(".ckpt-*"))


def test_out_dir_that_is_a_file(byte_data, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    err = user_error(train_mod.main, small_args(byte_data, tmp_path / "f"), capsys)
    assert "is a file" in err and (tmp_path / "f").read_text() == "mine"


def test_foreign_config_json_is_never_overwritten(byte_data, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    err = user_error(train_mod.main, small_args(byte_data, out), capsys)
    assert "not a spikegpt run" in err
    assert (out / "config.json").read_text() == '{"my": "settings"}'


def test_torn_metrics_line_is_dropped_on_resume(byte_data, tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(small_args(byte_data, out, "--max-iters", "3")) == 0
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "loss": 1.2\x00\x00\x00')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_mod.main(small_args(byte_data, out, "--max-iters", "6")) == 0
    assert any("torn or corrupt" in str(w.message) for w in caught)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "final_eval" not in r] == [1, 2, 3, 4, 5, 6]


def test_logs_of_runs_do_not_mix(byte_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a run that died before a checkpoint
    with pytest.warns(UserWarning, match="moved to metrics.jsonl.1"):
        assert train_mod.main(small_args(byte_data, out, "--max-iters", "3")) == 0
    assert (out / "metrics.jsonl.1").read_text() == '{"step": 1, "loss": 9.0}\n'
    assert train_mod.main(small_args(byte_data, out, "--max-iters", "3")) == 0  # resume a finished run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("final_eval" in r for r in records) == 1
    assert [r["step"] for r in records if "loss" in r and "final_eval" not in r] == [1, 2, 3]


def test_init_from_contradicting_a_run_to_resume(byte_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_mod.main(small_args(byte_data, out, "--max-iters", "3")) == 0
    capsys.readouterr()
    err = user_error(train_mod.main, small_args(byte_data, out, "--init-from", str(out)), capsys)
    assert "--init-from" in err and "new --out-dir" in err


# ----------------------------------------------------------------------------------------------
# Checkpoints that are not what they claim.
# ----------------------------------------------------------------------------------------------
def test_random_bytes_are_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "x.pt")


def test_checkpoint_without_model_or_with_misfit_tensors(tmp_path):
    model = spikegpt.SpikeGPT(spikegpt.ModelConfig(n_layer=1, n_embd=16))
    save_model(tmp_path / "m.pt", model)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "model"}, tmp_path / "nomodel.pt")
    with pytest.raises(CheckpointError, match="without model"):
        spikegpt.load(tmp_path / "nomodel.pt")
    ckpt["model_config"]["n_embd"] = 32
    torch.save(ckpt, tmp_path / "misfit.pt")
    with pytest.raises(CheckpointError, match="do not fit its config"):
        spikegpt.load(tmp_path / "misfit.pt")


# ----------------------------------------------------------------------------------------------
# Models meeting data they were not trained on; interrupted generation.
# ----------------------------------------------------------------------------------------------
def test_evaluate_refuses_a_dataset_with_another_char_mapping(tmp_path, capsys):
    from spikegpt.evaluate import main as evaluate_main
    from spikegpt.tokenizer import tokenizer_from_dict
    prepare_splits("abcabcabc" * 50, tmp_path / "abc", vocab="char", val_fraction=0.2)
    prepare_splits("xyzxyzxyz" * 50, tmp_path / "xyz", vocab="char", val_fraction=0.2)
    meta = json.loads((tmp_path / "abc" / "meta.json").read_text())
    model = spikegpt.SpikeGPT(spikegpt.ModelConfig(vocab_size=meta["vocab_size"], n_layer=1, n_embd=16))
    save_model(tmp_path / "m.pt", model, tokenizer=tokenizer_from_dict(meta["tokenizer"]))
    assert evaluate_main(["--ckpt", str(tmp_path / "m.pt"), "--data-dir", str(tmp_path / "abc")]) == 0
    capsys.readouterr()
    err = user_error(evaluate_main, ["--ckpt", str(tmp_path / "m.pt"), "--data-dir", str(tmp_path / "xyz")], capsys)
    assert "tokenized differently" in err


def test_generate_prints_what_it_has_on_ctrl_c(tmp_path, capsys, monkeypatch):
    from spikegpt import generate as generate_mod
    from spikegpt.recurrent import RecurrentDecoder
    from spikegpt.tokenizer import ByteTokenizer
    model = spikegpt.SpikeGPT(spikegpt.ModelConfig(n_layer=1, n_embd=16))
    save_model(tmp_path / "m.pt", model, tokenizer=ByteTokenizer())
    real_step, calls = RecurrentDecoder.step, {"n": 0}

    def interrupted(self, tokens, state):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, tokens, state)

    monkeypatch.setattr(RecurrentDecoder, "step", interrupted)
    status = generate_mod.main(["--ckpt", str(tmp_path / "m.pt"), "--prompt", "ab", "--max-new-tokens", "50",
                                "--seed", "1", "--temperature", "0"])
    captured = capsys.readouterr()
    assert status == 130 and "interrupted" in captured.err and "Traceback" not in captured.err
    assert captured.out.startswith("ab") and len(captured.out.encode("utf-8", "surrogateescape")) >= 2 + 1


def test_thread_default_leaves_busy_cores_alone(monkeypatch):
    from spikegpt.cli import default_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for load, expected in ((0.0, 4), (1.2, 3), (2.0, 2), (3.6, 1), (9.0, 1)):
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load))
        assert default_threads() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() is None  # the user's OpenMP setting wins


def test_checkpoints_recording_the_old_init_field_still_load(tmp_path):
    model = spikegpt.SpikeGPT(spikegpt.ModelConfig(n_layer=1, n_embd=16))
    save_model(tmp_path / "m.pt", model)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["model_config"]["init"] = "reference"
    torch.save(ckpt, tmp_path / "old.pt")
    assert spikegpt.load(tmp_path / "old.pt").config == model.config
