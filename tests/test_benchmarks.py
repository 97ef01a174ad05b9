"""The benchmarks stay runnable: each one's --smoke mode (tiny sizes, CPU, no result file), and the
GPU check's CPU rehearsal (--dry-run)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script,extra", [("bench_cpu_train.py", []), ("bench_train.py", []),
                                          ("profile_cpu_train.py", []), ("bench_generate.py", ["--no-write"])])
def test_benchmark_smoke(script, extra):
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *extra], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|" in out.stdout  # printed its table


def test_gpu_check_dry_run(tmp_path):
    """The one-command GPU check, rehearsed on the CPU: every part runs and every file is written."""
    out = tmp_path / "check"
    run = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"device", "commit", "date", "torch", "triton", "cuda", "dry_run", "finished", "total_seconds", "parts",
            "targets"} <= set(summary)
    assert summary["dry_run"] and summary["finished"] and summary["commit"]
    assert list(summary["parts"]) == ["tests", "kernels", "train", "generate"]
    for name, part in summary["parts"].items():
        assert part["status"] == "ok", part
        record = json.loads((out / f"{name}.json").read_text())
        assert record["result"], name  # the benchmark's own JSON (or the test counts) was read back
        assert (out / f"{name}.log").is_file()
    assert json.loads((out / "tests.json").read_text())["result"]["skipped"] > 0  # -m gpu ran (and skipped)
    names = [t["name"] for t in summary["targets"]]
    assert any(n.startswith("WKV fwd+bwd") for n in names) and any(n.startswith("LIF fwd+bwd") for n in names)
    assert any("WKV+LIF share" in n for n in names) and any(n.startswith("recurrent vs parallel") for n in names)
    graph_rows = [t for t in summary["targets"] if "CUDA graph" in t["name"]]
    assert [t["name"] for t in graph_rows] == ["CUDA graph step vs eager step, smoke batch 1",
                                               "CUDA graph step vs eager step, smoke batch 2",
                                               "batch-1 decoding with a CUDA graph"]
    assert all(t["pass"] is None and "not" in t["measured"] for t in graph_rows)  # a CPU captures nothing
    assert all(t["pass"] in (True, False, None) for t in summary["targets"])
    md = (out / "summary.md").read_text()
    assert "## Targets" in md and "Dry run" in md and "| kernels |" in md and ("PASS" in md or "FAIL" in md)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the scratch folder is gone
    again = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def _bench(name):
    """benchmarks/NAME.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check():
    return _bench("gpu_check")


def test_gpu_check_targets():
    """The verdicts on a GPU's results (which the dry run cannot produce): issue 17's thresholds."""
    gc = _gpu_check()
    kernel = {"impl": "triton", "pass": "fwd+bwd", "B": 12, "T": 1024, "dtype": "bfloat16", "ms": 1.0, "GBps": 1.0,
              "error": None}
    records = {
        "tests": {"result": {"tests": 6, "passed": 6, "failed": 0, "errors": 0, "skipped": 0, "not_passed": []}},
        "kernels": {"result": {"copy_GBps": 4000.0, "results": [
            {**kernel, "kernel": "wkv", "C": 512, "frac_copy": 0.71},
            {**kernel, "kernel": "lif", "C": 512, "frac_copy": 0.69},
            {**kernel, "kernel": "lif", "C": 768, "ms": None, "GBps": None, "frac_copy": None, "error": "boom"},
            {**kernel, "kernel": "wkv", "C": 512, "impl": "torch", "frac_copy": 0.01}]}},
        "train": {"result": {"rows": [
            {"config": "45m", "dtype": "bf16", "kernels": "torch", "compile": False, "mfu": 0.01, "tflops": 9.9,
             "peak_tflops": 989.0, "wkv_lif_share": 0.9},
            {"config": "45m", "dtype": "bf16", "kernels": "triton", "compile": False, "mfu": 0.36, "tflops": 356.0,
             "peak_tflops": 989.0, "wkv_lif_share": 0.16}]}},
        "generate": {"result": {
            "parity": [{"config": "45m", "parallel_kernels": "auto", "tol": 1e-4, "max_abs_err": 3e-6,
                        "firing_rate": 0.2, "ok": True}],
            "cuda_graph": [{"config": "45m", "batch": 1, "captured": True, "fallback": None, "bitwise_eager": True,
                            "max_abs_err_parallel": 3e-6, "tol": 1e-4, "ok": True},
                           {"config": "216m", "batch": 1, "captured": False, "fallback": "capture failed (X: y)",
                            "bitwise_eager": None, "max_abs_err_parallel": 3e-6, "tol": 1e-4, "ok": False}],
            "graph_speedup": [{"config": "45m", "weights": "fp32", "batch": 1, "graph_tokens_per_s": 900.0,
                               "eager_tokens_per_s": 150.0, "speedup": 6.0, "graph_over_read": 0.1},
                              {"config": "45m", "weights": "fp32", "batch": 16, "graph_tokens_per_s": 9.0,
                               "eager_tokens_per_s": 15.0, "speedup": 0.6, "graph_over_read": 0.1}]}},
    }
    verdict = {t["name"]: t["pass"] for t in gc.targets(records, dry=False, total_s=500.0)}
    assert verdict == {
        "GPU tests": True,
        "WKV fwd+bwd 12x1024x512 bfloat16": True,
        "LIF fwd+bwd 12x1024x512 bfloat16": False,
        "LIF fwd+bwd 12x1024x768 bfloat16": False,
        "45m bf16 training step (triton kernels): MFU": True,
        "45m bf16 training step (triton kernels): WKV+LIF share": False,
        "recurrent vs parallel logits, 45m (parallel kernels auto)": True,
        "CUDA graph step vs eager step, 45m batch 1": True,
        "CUDA graph step vs eager step, 216m batch 1": False,
        "batch-1 decoding with a CUDA graph, 45m fp32": True,
        "the whole check": False,
    }
    failed_parts = {"train": {"result": None}, "kernels": {"result": None}}
    assert all(t["pass"] is None for t in gc.targets(failed_parts, dry=False, total_s=None))


def _bench_generate():
    return _bench("bench_generate")


def test_bench_generate_times_cuda_graphs_on_cuda():
    """What the CPU smoke run cannot show: on CUDA every weight dtype is timed uncaptured and in a
    graph, and each captured run is set against its uncaptured twin."""
    import torch
    bg = _bench_generate()
    assert [m[0] for m in bg.modes(torch.device("cpu"), True)] == ["fp32", "fp32 exact", "bf16"]
    assert all(m[3] == "off" for m in bg.modes(torch.device("cpu"), True))
    assert [(m[0], m[3]) for m in bg.modes(torch.device("cuda"), True)] == [
        ("fp32", "off"), ("fp32 graph", "on"), ("bf16", "off"), ("bf16 graph", "on")]
    assert [m[0] for m in bg.modes(torch.device("cuda"), False)] == ["fp32", "fp32 graph"]
    run = {"config": "45m", "batch": 1, "decode_over_read": 0.1}
    runs = [{**run, "weights": "fp32", "cuda_graph": False, "tokens_per_s": 100.0},
            {**run, "weights": "fp32 graph", "cuda_graph": True, "tokens_per_s": 400.0, "decode_over_read": 0.4},
            {**run, "weights": "bf16 graph", "cuda_graph": False, "tokens_per_s": 90.0},  # capture failed
            {**run, "weights": "bf16", "cuda_graph": False, "tokens_per_s": 90.0}]
    assert bg.graph_speedup(runs) == [{"config": "45m", "weights": "fp32", "batch": 1, "graph_tokens_per_s": 400.0,
                                       "eager_tokens_per_s": 100.0, "speedup": 4.0, "graph_over_read": 0.4,
                                       "eager_over_read": 0.1}]


def test_bench_generate_sets_the_fused_step_against_the_unfused():
    bg = _bench_generate()
    run = {"config": "45m", "batch": 1}
    runs = [{**run, "weights": "fp32", "fused_step": True, "tokens_per_s": 90.0, "decode_over_read": 0.9},
            {**run, "weights": "fp32 unfused", "fused_step": False, "tokens_per_s": 60.0, "decode_over_read": 0.6},
            {**run, "weights": "bf16", "fused_step": True, "tokens_per_s": 120.0, "decode_over_read": 0.6}]
    assert bg.fused_speedup(runs) == [{"config": "45m", "batch": 1, "fused_tokens_per_s": 90.0,
                                       "unfused_tokens_per_s": 60.0, "speedup": 1.5, "fused_over_read": 0.9,
                                       "unfused_over_read": 0.6}]
    assert bg.fused_speedup(runs[:1] + runs[2:]) == []


def test_bench_generate_cuda_bookkeeping_with_a_stand_in_capture(monkeypatch, tmp_path, capsys):
    """bench_generate's CUDA rows, speedups, tables and graph checks, run on a CPU by giving the
    decoders a capture backend that re-runs the step (its timings mean nothing; the code path runs)."""
    import torch

    import spikegpt.recurrent
    from test_cuda_graph import ReplayByRerun
    bg = _bench_generate()
    monkeypatch.setattr(spikegpt.recurrent, "CudaGraphs", ReplayByRerun)
    cuda_modes = bg.modes
    monkeypatch.setattr(bg, "modes", lambda device, bf16: cuda_modes(torch.device("cuda"), bf16))
    result = bg.main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "g.json")])
    # (the model is on the CPU, where fp32 is also timed without the fused step ops)
    assert [(r["weights"], r["batch"], r["cuda_graph"]) for r in result["runs"]] == [
        (w, b, False) for b in (1, 16) for w in ("fp32", "fp32 unfused")] + [
        (w, b, w.endswith("graph")) for w in ("fp32 graph", "bf16", "bf16 graph") for b in (1, 16)]
    assert [(r["weights"], r["batch"]) for r in result["graph_speedup"]] == [
        ("fp32", 1), ("fp32", 16), ("bf16", 1), ("bf16", 16)]
    assert [(g["batch"], g["captured"], g["bitwise_eager"], g["ok"]) for g in result["cuda_graph"]] == [
        (1, True, True, True), (2, True, True, True)]
    md = (tmp_path / "g.md").read_text()
    assert "| smoke | fp32 graph | 1 |" in md and "CUDA graph vs uncaptured steps: smoke fp32 batch 1 " in md
    assert "| smoke | 8 x 1 | yes | yes |" in md
    assert any(r["weights"] == "fp32 graph" and "profile" in r for r in result["runs"])


def test_commit_of_a_copied_checkout(monkeypatch):
    """Without git metadata the results record the commit their runner names ($SPIKEGPT_COMMIT)."""
    common = _bench("common")

    def no_git(*args, **kwargs):
        raise OSError("git: not found")
    monkeypatch.setattr(common.subprocess, "run", no_git)
    monkeypatch.delenv(common.COMMIT_ENV, raising=False)
    assert common.git_commit() == "unknown"
    monkeypatch.setenv(common.COMMIT_ENV, "0123456789abcdef")
    assert common.git_commit() == "0123456" and common.git_commit(short=False) == "0123456789abcdef"


@pytest.mark.slow
def test_gpu_check_dry_run_from_a_copied_uninstalled_checkout(tmp_path):
    """As on a fresh GPU machine: the tracked files copied without git metadata, the package not
    installed (an editable install's finder hidden): every part still runs, with the commit named."""
    repo = BENCH.parent
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to copy the tracked files from")
    tree = tmp_path / "tree"
    for name in filter(None, files.decode().split("\0")):
        if (repo / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((repo / name).read_bytes())
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", "check", "--commit",
                          "0123456789abcdef"], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tree / "check" / "summary.json").read_text())
    assert summary["commit"] == "0123456789abcdef"
    assert all(part["status"] == "ok" for part in summary["parts"].values()), summary["parts"]
    assert json.loads((tree / "check" / "train.json").read_text())["result"]["commit"] == "0123456"


def test_bench_cpu_train_reports_side_by_side_ratios_and_the_step_breakdown():
    sys.path.insert(0, str(BENCH))
    from bench_cpu_train import main

    result = main(["--smoke"])
    rows = result["seconds_per_iter"]
    assert set(result["ratios"]) == {"spikegpt / transformer", "gif / spikegpt", "quant / spikegpt",
                                     "spikegpt-reference / transformer"}
    assert result["ratios"]["gif / spikegpt"] == rows["gif"] / rows["spikegpt"]
    for model in ("spikegpt", "transformer"):
        cats = result["breakdown"][model]["categories"]
        assert list(cats) == ["matmul", "neuron", "wkv", "other"]
        assert abs(sum(c["share"] for c in cats.values()) - 1) < 1e-9
        assert abs(sum(c["seconds"] for c in cats.values()) - rows[model]) < 1e-9 * rows[model]
        assert cats["matmul"]["seconds"] > 0
    spiking, gpt = result["breakdown"]["spikegpt"]["categories"], result["breakdown"]["transformer"]["categories"]
    assert spiking["neuron"]["seconds"] > 0 and spiking["wkv"]["seconds"] > 0
    assert gpt["neuron"]["seconds"] == 0 and gpt["wkv"]["seconds"] == 0
