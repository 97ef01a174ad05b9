"""The benchmarks stay runnable: each one's --smoke mode (tiny sizes, CPU, no result file), and the
GPU check's CPU rehearsal (--dry-run)."""
import importlib.util
import json
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
    assert all(t["pass"] in (True, False, None) for t in summary["targets"])
    md = (out / "summary.md").read_text()
    assert "## Targets" in md and "Dry run" in md and "| kernels |" in md and ("PASS" in md or "FAIL" in md)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the scratch folder is gone
    again = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        "generate": {"result": {"parity": [{"config": "45m", "parallel_kernels": "auto", "tol": 1e-4,
                                            "max_abs_err": 3e-6, "firing_rate": 0.2, "ok": True}]}},
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
        "the whole check": False,
    }
    failed_parts = {"train": {"result": None}, "kernels": {"result": None}}
    assert all(t["pass"] is None for t in gc.targets(failed_parts, dry=False, total_s=None))


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
