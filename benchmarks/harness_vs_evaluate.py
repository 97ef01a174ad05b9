"""lm-eval (``--model spikegpt``) and ``python -m spikegpt.evaluate`` on the same held-out text (issue 16).

Trains a tiny model on the built-in corpus (Python standard-library docstrings) minus its last
``--heldout-chars`` characters, unless ``--ckpt`` names one; then scores that held-out text

* through lm-eval, as a local ``loglikelihood_rolling`` task (one document; word perplexity, byte
  perplexity, bits per byte), with the state carried across windows (``max_length`` unset) and in
  fixed windows of ``ctx_len`` tokens from the zero state (``max_length=ctx_len``);
* through ``python -m spikegpt.evaluate --streams 1`` on a prepared dataset whose val split is the
  start token followed by the same text, with and without ``--carry-state``.

The sums of log-likelihoods are compared directly; the evaluate rows' word and byte figures are
computed from its ``nll_sum`` with lm-eval's counts of the document's words and bytes (and its own
rate-form ``bits_per_byte`` is kept beside them).  Writes ``benchmarks/results/harness_vs_evaluate.json``.

    OMP_NUM_THREADS=1 python benchmarks/harness_vs_evaluate.py                 # trains ~2000 steps first
    python benchmarks/harness_vs_evaluate.py --ckpt runs/tiny --work-dir /tmp/h  # an existing byte model
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import git_commit  # noqa: E402
from spikegpt.data import extract_stdlib_docstrings, prepare_splits  # noqa: E402
from spikegpt.fileio import atomic_write_json  # noqa: E402

TASK = "heldout_rolling"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def split_corpus(heldout_chars: int) -> tuple[str, str]:
    """The corpus text, cut at the last paragraph break before its final ``heldout_chars`` characters."""
    text, _ = extract_stdlib_docstrings()
    cut = text.rfind("\n\n", 0, len(text) - heldout_chars) + 2
    return text[:cut], text[cut:]


def train(train_text: str, work: Path, iters: int) -> Path:
    data = work / "train-data"
    prepare_splits(train_text, data, "byte", val_fraction=0.05, source="stdlib docstrings minus the held-out text")
    run = work / "run"
    subprocess.run([sys.executable, "-m", "spikegpt.train", "--data-dir", str(data), "--out-dir", str(run),
                    "--preset", "tiny", "--max-iters", str(iters), "--device", "cpu", "--threads", "1",
                    "--eval-interval", "0", "--sample-tokens", "0"], check=True, cwd=REPO)
    return run


def lm_eval_run(ckpt: Path, task_dir: Path, **model_args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import spikegpt.harness  # noqa: F401  (registers the model type)

    args = ",".join(f"{k}={v}" for k, v in {"pretrained": ckpt, "device": "cpu", **model_args}.items())
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="spikegpt", model_args=args, tasks=[TASK], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    seconds = time.perf_counter() - t0
    r = out["results"][TASK]
    ll = sum(s["resps"][0][0] for s in out["samples"][TASK])
    return {"path": "lm-eval", "model_args": args.replace(str(ckpt), "CKPT"), "nll_sum": -ll, "word_perplexity": r["word_perplexity,none"],
            "byte_perplexity": r["byte_perplexity,none"], "bits_per_byte": r["bits_per_byte,none"], "seconds": seconds}


def evaluate_run(ckpt: Path, data: Path, window: int, carry: bool, work: Path, words: int, n_bytes: int) -> dict:
    out = work / f"evaluate-{'carry' if carry else 'reset'}.json"
    flags = ["--split", "val", "--streams", "1", "--window", str(window),
             "--carry-state" if carry else "--no-carry-state", "--device", "cpu"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spikegpt.evaluate", "--ckpt", str(ckpt), "--data-dir", str(data), *flags,
                    "--json", str(out)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    r = json.loads(out.read_text())
    nll = r["nll_sum"]
    return {"path": "spikegpt.evaluate", "flags": " ".join(flags),
            "nll_sum": nll, "predicted_tokens": r["predicted_tokens"], "word_perplexity": math.exp(nll / words),
            "byte_perplexity": math.exp(nll / n_bytes), "bits_per_byte": nll / n_bytes / math.log(2),
            "evaluate_bits_per_byte": r["bits_per_byte"], "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, help="a byte-vocabulary checkpoint or run directory (default: train one)")
    p.add_argument("--iters", type=int, default=2000, help="training steps of the tiny model")
    p.add_argument("--heldout-chars", type=int, default=20_000, help="size of the held-out text (about)")
    p.add_argument("--work-dir", type=Path, help="where the data, run and task go (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "harness_vs_evaluate.json")
    args = p.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="harness-vs-evaluate-"))
    work.mkdir(parents=True, exist_ok=True)

    train_text, held = split_corpus(args.heldout_chars)
    ckpt = args.ckpt or train(train_text, work, args.iters)
    import spikegpt
    model = spikegpt.load(ckpt)
    if model.tokenizer is None or model.tokenizer.kind != "byte":
        raise SystemExit("error: this benchmark prepares byte-level data: pass a byte-vocabulary checkpoint")
    ctx_len = model.config.ctx_len

    task_dir = work / "task"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "heldout.jsonl").write_text(json.dumps({"text": held}) + "\n", encoding="utf-8")
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=task_dir / "heldout.jsonl"))
    # the val split is the start token ("\n" for bytes) and the text: every byte of it is predicted
    evaluate_data = work / "evaluate-data"
    prepare_splits(train_text + "\n" + held, evaluate_data, "byte", overwrite=True,
                   split_sizes=[len(train_text.encode()), 1 + len(held.encode())])
    words, n_bytes = len(re.split(r"\s+", held)), len(held.encode())  # lm-eval's counts

    rows = [
        {"protocol": "carried state", **lm_eval_run(ckpt, task_dir, batch_size=1)},
        {"protocol": "carried state", **evaluate_run(ckpt, evaluate_data, ctx_len, True, work, words, n_bytes)},
        {"protocol": f"fixed {ctx_len}-token windows", **lm_eval_run(ckpt, task_dir, max_length=ctx_len, batch_size=16)},
        {"protocol": f"fixed {ctx_len}-token windows",
         **evaluate_run(ckpt, evaluate_data, ctx_len, False, work, words, n_bytes)},
    ]
    result = {
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
        "model": {"ckpt": "trained here" if args.ckpt is None else str(args.ckpt), "iters": args.iters if args.ckpt is None else None,
                  "parameters": model.num_params(), "ctx_len": ctx_len, "vocab": "byte 256"},
        "text": {"source": "the end of the built-in corpus (stdlib docstrings), held out of training",
                 "bytes": n_bytes, "words (lm-eval: re.split(r'\\s+'))": words},
        "rows": rows,
        "agreement": {"carried: |lm-eval - evaluate| / evaluate (nll_sum)": abs(rows[0]["nll_sum"] - rows[1]["nll_sum"]) / rows[1]["nll_sum"],
                      "fixed: lm-eval - evaluate (nll_sum, nats)": rows[2]["nll_sum"] - rows[3]["nll_sum"]},
    }
    atomic_write_json(args.out, result)
    print(f"{'path':<18} {'protocol':<26} {'nll_sum':>12} {'bits/byte':>10} {'byte ppl':>9} {'word ppl':>10}")
    for r in rows:
        print(f"{r['path']:<18} {r['protocol']:<26} {r['nll_sum']:>12.3f} {r['bits_per_byte']:>10.5f} "
              f"{r['byte_perplexity']:>9.4f} {r['word_perplexity']:>10.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
