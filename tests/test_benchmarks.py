"""The benchmarks stay runnable: each one's --smoke mode (tiny sizes, CPU, no result file)."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script,extra", [("bench_cpu_train.py", []), ("bench_train.py", []),
                                          ("bench_generate.py", ["--no-write"])])
def test_benchmark_smoke(script, extra):
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *extra], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|" in out.stdout  # printed its table
