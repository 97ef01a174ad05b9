"""One command that measures this project on a GPU and writes every result into one folder (issue 17).

    python benchmarks/gpu_check.py --out gpu-check-h100          # a CUDA machine: at most 8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/check    # the same script on a CPU, seconds

It installs nothing: the project's own requirements (``pip install -e ".[test]"``) are all it needs,
and it runs from a source checkout that was never installed (the checkout goes on every part's
``PYTHONPATH``).  Where the checkout has no git metadata (a copied working tree), ``--commit HASH``
names the commit that the results record (every part's too).
Each part runs as a subprocess with its own time budget, so a failure or a hang loses only that part:

* ``tests``: ``python -m pytest -m gpu -q``, the GPU tests;
* ``kernels``: ``bench_kernels.py`` at the 45m and 216m shapes (batch 12, ctx 1024, C 512 / 768), fp32
  and bf16, Triton vs the PyTorch reference: bandwidth counting minimum bytes, as a fraction of the
  device's copy bandwidth measured in the same run;
* ``train``: ``bench_train.py``, 45m and 216m, bf16, Triton vs reference kernels: tokens/s, MFU, peak
  memory, the WKV+LIF share of the step;
* ``generate``: ``bench_generate.py`` on CUDA: tokens/s at batch 1 and 16, uncaptured and with the
  step captured in a CUDA graph, parity of the recurrent logits with the parallel path, and the graph's
  replays bitwise the uncaptured eager step.

Into ``--out DIR`` (a new or empty folder; ``--overwrite`` replaces the files of an earlier check) it
writes, each file atomically: per part ``PART.json`` (command, exit status, seconds, and the
benchmark's own JSON under ``result``), ``PART.log`` (its output) and ``PART.md`` (its table, where it
has one); after every part ``summary.json`` and ``summary.md``: device, commit, date, torch / triton /
CUDA versions, each part's status, and the targets of issue 17 with PASS or FAIL (WKV and LIF
forward+backward >= 70% of copy bandwidth; the 45m bf16 step >= 35% MFU with WKV+LIF <= 15% of it;
batch-1 decoding with a CUDA graph faster than without, its logits bitwise the eager step's).

``--dry-run`` runs the same parts on the CPU (CUDA hidden from them) at tiny sizes: the kernels in
Triton's interpreter, the training step on the reference kernels only (the interpreter takes seconds
per kernel call), generation on the CPU (where nothing is captured in a CUDA graph: its rows say so
and their verdicts are "not measured").  It exercises every code path that does not need CUDA, and
the test suite runs it; its numbers say nothing about speed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]  # a checkout that was never pip-installed
from common import COMMIT_ENV, git_commit, header  # noqa: E402

from spikegpt.fileio import atomic_write_json, atomic_write_text  # noqa: E402

BENCH = REPO / "benchmarks"
TIME_LIMIT_S = 480  # the whole check, on one H100/H200
# Targets of issue 17 (from the kernel notes).
KERNEL_COPY_FRACTION = 0.70  # WKV and LIF forward+backward, minimum bytes, vs a device copy
MFU_TARGET = 0.35  # 45m bf16 training step
SHARE_TARGET = 0.15  # WKV+LIF share of that step
# The training row the step targets apply to, on a GPU and in a dry run.
MAIN_TRAIN = {False: {"config": "45m", "dtype": "bf16", "kernels": "triton"},
              True: {"config": "smoke", "dtype": "fp32", "kernels": "torch"}}


def parts(dry: bool, scratch: Path) -> list[dict]:
    """The check's parts in run order: name, what it measures, time budget (s), command, and the
    file its benchmark writes (read back into PART.json)."""
    py = sys.executable
    out = {name: scratch / f"{name}.json" for name in ("kernels", "train", "generate")}
    return [
        {"name": "tests", "what": "GPU tests (python -m pytest -m gpu)", "budget": 60 if dry else 100,
         "argv": [py, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", f"--junitxml={scratch / 'tests.xml'}"],
         "output": scratch / "tests.xml"},
        {"name": "kernels", "what": "WKV and LIF kernels, Triton vs reference, bandwidth vs copy",
         "budget": 60 if dry else 110,
         "argv": [py, str(BENCH / "bench_kernels.py"), "--out", str(out["kernels"]),
                  *(["--smoke"] if dry else ["--shapes", "12x1024x512,12x1024x768", "--dtypes", "fp32,bf16",
                                             "--compile-ref", "none"])],
         "output": out["kernels"]},
        {"name": "train", "what": "training step, 45m and 216m, bf16, Triton vs reference kernels",
         "budget": 60 if dry else 150,
         "argv": [py, str(BENCH / "bench_train.py"), "--out", str(out["train"]),
                  *(["--smoke"] if dry else ["--presets", "45m,216m", "--dtypes", "bf16", "--backends",
                                             "triton,torch", "--compile", "off", "--iters", "10"])],
         "output": out["train"]},
        {"name": "generate", "what": "recurrent generation, batch 1 and 16, with and without a CUDA graph, "
                                     "parity with the parallel path",
         "budget": 60 if dry else 90,
         "argv": [py, str(BENCH / "bench_generate.py"), "--out", str(out["generate"]),
                  *(["--smoke", "--device", "cpu"] if dry else ["--device", "cuda", "--configs", "45m,216m",
                                                                "--batches", "1,16", "--prefill-len", "512"])],
         "output": out["generate"]},
    ]


# --------------------------------------------------------------------------------------------------
# Running a part.
# --------------------------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the part, then whatever it left behind (it leads its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # stuck in the kernel (a GPU driver call): leave it, go on
        pass


def run_logged(name: str, argv: list[str], env: dict, timeout: float, log_path: Path):
    """Run ``argv`` from the repository root with its output in ``log_path`` (and echoed, prefixed
    with the part's name); returns (exit status, timed out?, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                print(f"  [{name}] {line}", end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on Ctrl-C; after a normal exit this stops any process the part left behind
            _kill_group(proc)
        reader.join(timeout=10)
    return (None if timed_out else proc.returncode), timed_out, time.monotonic() - t0


def junit_counts(path: Path) -> dict:
    """Passed / failed / errors / skipped of a pytest ``--junitxml`` report, and the tests that did not pass."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": n["tests"], "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"], "not_passed": bad}


def read_output(part: dict):
    """The part's result (its benchmark's JSON, or the test counts) and its table, where it wrote them."""
    path = part["output"]
    if not path.is_file():
        return None, None
    try:
        if part["name"] == "tests":
            return junit_counts(path), None
        md = path.with_suffix(".md")
        return json.loads(path.read_text()), (md.read_text() if md.is_file() else None)
    except (ValueError, ET.ParseError) as e:  # a part killed while writing (the benchmarks' own files)
        return {"unreadable": f"{type(e).__name__}: {e}"}, None


def run_part(part: dict, out: Path, scratch: Path, env: dict, deadline: float) -> dict:
    name = part["name"]
    record = {"part": name, "what": part["what"], "command": shlex.join(part["argv"]), "budget_s": part["budget"],
              "status": None, "returncode": None, "seconds": 0.0, "log": None, "markdown": None, "result": None,
              "reason": None}
    timeout = min(part["budget"], deadline - time.monotonic())
    if timeout < 10:
        record.update(status="skipped", reason="the check's time limit is spent")
    elif name == "tests" and importlib.util.find_spec("pytest") is None:
        record.update(status="skipped", reason='pytest is not installed: pip install -e ".[test]"')
    else:
        print(f"[{name}] {part['what']} (at most {timeout:.0f} s)", flush=True)
        log = scratch / f"{name}.log"
        rc, timed_out, seconds = run_logged(name, part["argv"], env, timeout, log)
        atomic_write_text(out / f"{name}.log", log.read_text(encoding="utf-8", errors="replace"))
        result, markdown = read_output(part)
        if markdown is not None:
            atomic_write_text(out / f"{name}.md", markdown)
        status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
        record.update(status=status, returncode=rc, seconds=round(seconds, 1), log=f"{name}.log",
                      markdown=None if markdown is None else f"{name}.md", result=result,
                      reason={"timeout": f"killed after {timeout:.0f} s", "failed": f"exit status {rc}: see {name}.log",
                              "ok": None}[status])
        print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
    atomic_write_json(out / f"{name}.json", record)
    return record


# --------------------------------------------------------------------------------------------------
# The targets.
# --------------------------------------------------------------------------------------------------
def _target(name, target, measured, ok):
    return {"name": name, "target": target, "measured": measured, "pass": ok}


def targets(records: dict, dry: bool, total_s: float | None) -> list[dict]:
    """Issue 17's targets (and the check's own), each PASS (True), FAIL (False) or not measured (None)."""
    rows = []
    tests = records.get("tests")
    if tests is not None:
        r = tests["result"] if tests["result"] and "passed" in tests["result"] else None
        rows.append(_target("GPU tests", "all pass", "not run" if r is None else
                            f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped",
                            None if r is None else r["passed"] > 0 and r["failed"] + r["errors"] == 0))
    kernels = records.get("kernels")
    if kernels is not None:
        res = kernels["result"] or {}
        found = [r for r in res.get("results", []) if r["impl"] == "triton" and r["pass"] == "fwd+bwd"]
        for r in found:
            label = f"{r['kernel'].upper()} fwd+bwd {r['B']}x{r['T']}x{r['C']} {r['dtype']}"
            if r["ms"] is None:
                rows.append(_target(label, f">= {KERNEL_COPY_FRACTION:.0%} of copy bandwidth", r["error"], False))
            else:
                rows.append(_target(label, f">= {KERNEL_COPY_FRACTION:.0%} of copy bandwidth",
                                    f"{r['frac_copy']:.1%} ({r['GBps']:.0f} of {res['copy_GBps']:.0f} GB/s)",
                                    r["frac_copy"] >= KERNEL_COPY_FRACTION))
        if not found:
            rows.append(_target("WKV and LIF fwd+bwd (Triton)", f">= {KERNEL_COPY_FRACTION:.0%} of copy bandwidth",
                                "not measured", None))
    train = records.get("train")
    if train is not None:
        want = MAIN_TRAIN[dry]
        row = next((r for r in (train["result"] or {}).get("rows", [])
                    if all(r.get(k) == v for k, v in want.items()) and not r.get("compile")), None)
        label = f"{want['config']} {want['dtype']} training step ({want['kernels']} kernels)"
        if row is None or "error" in row:
            measured = "not measured" if row is None else row["error"]
            rows += [_target(f"{label}: MFU", f">= {MFU_TARGET:.0%}", measured, None if row is None else False),
                     _target(f"{label}: WKV+LIF share", f"<= {SHARE_TARGET:.0%}", measured,
                             None if row is None else False)]
        else:
            mfu = row["mfu"]
            rows += [_target(f"{label}: MFU", f">= {MFU_TARGET:.0%}",
                             "no peak TFLOP/s known for this device" if mfu is None else
                             f"{mfu:.1%} ({row['tflops']:.0f} TFLOP/s of {row['peak_tflops']:.0f})",
                             None if mfu is None else mfu >= MFU_TARGET),
                     _target(f"{label}: WKV+LIF share", f"<= {SHARE_TARGET:.0%}", f"{row['wkv_lif_share']:.1%}",
                             row["wkv_lif_share"] <= SHARE_TARGET)]
    gen = records.get("generate")
    if gen is not None:
        par = (gen["result"] or {}).get("parity", [])
        for r in par:
            rows.append(_target(f"recurrent vs parallel logits, {r['config']} "
                                f"(parallel kernels {r['parallel_kernels']})",
                                f"max abs diff <= {r['tol']:g}",
                                f"{r['max_abs_err']:.2e} (firing rate {r['firing_rate']:.2f})", r["ok"]))
        if not par:
            rows.append(_target("recurrent vs parallel logits", "within tolerance", "not measured", None))
        graphs = (gen["result"] or {}).get("cuda_graph", [])
        for g in graphs:
            rows.append(_target(f"CUDA graph step vs eager step, {g['config']} batch {g['batch']}",
                                f"captured, bitwise, max abs diff to parallel <= {g['tol']:g}",
                                f"bitwise {'yes' if g['bitwise_eager'] else 'NO'}, {g['max_abs_err_parallel']:.2e}"
                                if g["captured"] else f"not captured: {g['fallback']}", g["ok"]))
        if not graphs:
            rows.append(_target("CUDA graph step vs eager step", "captured, bitwise", "not measured", None))
        speed = [r for r in (gen["result"] or {}).get("graph_speedup", []) if r["batch"] == 1 and r["weights"] == "fp32"]
        for r in speed:
            rows.append(_target(f"batch-1 decoding with a CUDA graph, {r['config']} fp32", "faster than uncaptured",
                                f"{r['graph_tokens_per_s']:.0f} vs {r['eager_tokens_per_s']:.0f} tokens/s "
                                f"({r['speedup']:.1f}x; {r['graph_over_read']:.2f} of the weight-read rate)",
                                r["speedup"] > 1))
        if not speed:
            rows.append(_target("batch-1 decoding with a CUDA graph", "faster than uncaptured", "not measured", None))
    if total_s is not None:
        rows.append(_target("the whole check", f"<= {TIME_LIMIT_S} s", f"{total_s:.0f} s", total_s <= TIME_LIMIT_S))
    return rows


def machine(dry: bool) -> dict:
    device = torch.device("cpu" if dry else "cuda")
    info = header(device) | {"commit": git_commit(short=False), "dry_run": dry, "cuda": torch.version.cuda}
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = None
    if not dry:
        props = torch.cuda.get_device_properties(device)
        info |= {"device_memory_gib": round(props.total_memory / 2**30, 1), "device_count": torch.cuda.device_count()}
    return info


def markdown(summary: dict) -> str:
    mark = {True: "PASS", False: "FAIL", None: "not measured"}
    lines = [f"# GPU check: {summary['device']}", "",
             f"commit `{summary['commit']}`, {summary['date']}, torch {summary['torch']}, triton {summary['triton']}, "
             f"CUDA {summary['cuda']}, python {summary['python']}; "
             + ("finished" if summary["finished"] else "in progress") + f", {summary['total_seconds']:.0f} s."]
    if summary["dry_run"]:
        lines += ["", "**Dry run**: CPU, tiny sizes. The numbers and verdicts below only show that the check "
                  "runs; they say nothing about a GPU."]
    lines += ["", "| part | what | status | seconds | files |", "|---|---|---|---:|---|"]
    for r in summary["parts"].values():
        files = ", ".join(f for f in (f"{r['part']}.json", r["log"], r["markdown"]) if f)
        status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
        lines.append(f"| {r['part']} | {r['what']} | {status} | {r['seconds']:.0f} | {files} |")
    lines += ["", "## Targets", "", "| check | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['target']} | {t['measured']} | {mark[t['pass']]} |" for t in summary["targets"]]
    for name, r in summary["parts"].items():
        if r["markdown"]:  # the part's own table, its headings one level down
            text = (summary["out"] / r["markdown"]).read_text().strip()
            lines += ["", f"## {name}", ""] + [("##" + t if t.startswith("#") else t) for t in text.splitlines()]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, info: dict, records: dict, dry: bool, t0: float, finished: bool) -> dict:
    total = time.monotonic() - t0
    summary = info | {"finished": finished, "total_seconds": round(total, 1), "time_limit_s": TIME_LIMIT_S,
                      "parts": {n: {k: v for k, v in r.items() if k != "result"} for n, r in records.items()},
                      "targets": targets(records, dry, total if finished else None)}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", markdown(summary | {"out": out}))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for what each part measures.")
    p.add_argument("--out", required=True, help="folder for every result (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier check in --out")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds: checks that the script runs")
    p.add_argument("--parts", default="tests,kernels,train,generate", help="comma-separated subset, run in this order")
    p.add_argument("--commit", default=None, help="the commit the results record, where the checkout has no git "
                                                  "metadata (default: git's HEAD, else $" + COMMIT_ENV + ")")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()  # the parts run from the repository root
    known = [q["name"] for q in parts(args.dry_run, out)]
    chosen = args.parts.split(",")
    if not set(chosen) <= set(known):
        raise SystemExit(f"gpu_check.py: error: unknown part(s) {sorted(set(chosen) - set(known))}; "
                         f"choose from {known}")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"gpu_check.py: error: --out {out} is a file: name a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"gpu_check.py: error: --out {out} is not empty: pass --overwrite, or name a new folder")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: no CUDA device here: run it on a GPU machine, or pass --dry-run")

    t0 = time.monotonic()
    deadline = t0 + TIME_LIMIT_S - 10  # room for the summary
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / f".scratch-{os.getpid()}"  # the benchmarks' own (non-atomic) files, removed at the end
    scratch.mkdir()
    if args.commit:
        os.environ[COMMIT_ENV] = args.commit  # for git_commit, here and in every part
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if args.dry_run:
        env |= {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    else:
        env.pop("TRITON_INTERPRET", None)  # the interpreter would time Python, not the GPU
    info = machine(args.dry_run)
    print(f"GPU check on {info['device']}, commit {info['commit']}, into {out}", flush=True)
    records = {}
    try:
        for part in parts(args.dry_run, scratch):
            if part["name"] in chosen:
                records[part["name"]] = run_part(part, out, scratch, env, deadline)
                write_summary(out, info, records, args.dry_run, t0, finished=False)
        summary = write_summary(out, info, records, args.dry_run, t0, finished=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nwrote {out / 'summary.md'} and {out / 'summary.json'} in {summary['total_seconds']:.0f} s")
    for t in summary["targets"]:
        print(f"  {t['name']}: {t['measured']} (target {t['target']}): "
              + {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]])
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
