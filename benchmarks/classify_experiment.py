"""Sentence classification on MR (10-fold cross-validation) and SST-5 (test at the best dev epoch),
for (a) a SpikeGPT trained on the task alone and (b) one fine-tuned from a language model pre-trained
on the task's training sentences (unsupervised; never a dev or test sentence: for MR, one language
model per fold, on that fold's training part).  The vocabulary is, by default, a byte-level BPE trained
on each run's training sentences (``--vocab bpe``, the same for both variants of a run); ``--vocab
byte`` gives the byte-level models of ``results/classify-byte.json``.

    python benchmarks/classify_experiment.py [--tasks sst5 mr] [--variants scratch pretrained]
        [--mr-folds N] [--data-dir DIR] [--out benchmarks/results/classify.json]

Runs go one after another (SST-5 first, then MR fold by fold, alternating the variants), and the
results file is rewritten after each, so an interrupted experiment keeps what it finished; runs
already in the file are skipped, so the same command continues it.  Each run records its seconds and
the command that reproduces it; a markdown table goes next to the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spikegpt.checkpoint import load  # noqa: E402
from spikegpt.classify.data import fold_splits, read_examples  # noqa: E402
from spikegpt.classify.model import scratch_lm  # noqa: E402
from spikegpt.classify.train import ClassifyConfig, run_split  # noqa: E402
from spikegpt.data import prepare_splits  # noqa: E402
from spikegpt.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from spikegpt.tokenizer import train_bpe, unescape_bytes  # noqa: E402

PUBLISHED = {  # sentence-level test accuracy (%), from the literature
    "TextCNN (Kim 2014)": {"mr": 81.5, "sst5": 48.0},
    "TextSCNN (spiking, ICLR 2023)": {"mr": 75.45, "sst5": 41.63},
    "SpikeGPT 46M, no pre-training (paper)": {"mr": 69.23, "sst5": 37.69},
    "SpikeGPT 216M, pre-trained (paper)": {"mr": 85.63, "sst5": 51.27},
    "BERT": {"mr": 86.72, "sst5": 53.21},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=["sst5", "mr"], default=["sst5", "mr"])
    p.add_argument("--variants", nargs="+", choices=["scratch", "pretrained"], default=["scratch", "pretrained"])
    p.add_argument("--mr-folds", type=int, default=10, help="MR folds to run (of 10)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "classification"))
    p.add_argument("--work-dir", default=str(REPO / "out" / "classify_experiment"),
                   help="prepared pre-training text and language-model runs")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "classify.json"))
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--head-lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--pool", default="mean")
    p.add_argument("--lm-iters", type=int, default=1500, help="pre-training steps (batch 12 x 64 tokens)")
    p.add_argument("--vocab", choices=["byte", "bpe"], default="bpe",
                   help="bytes, or a byte-level BPE trained on each run's training sentences")
    p.add_argument("--bpe-vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="only rewrite the table from the results file")
    return p.parse_args(argv)


def pretrain(texts, name: str, args, log) -> tuple[Path, list[str], float]:
    """A language model trained on ``texts`` with train.py, in the vocabulary the scratch model of the
    same split would get (:func:`scratch_lm`): (run dir, command, seconds)."""
    work = Path(args.work_dir)
    vocab = "byte" if args.vocab == "byte" else f"bpe{args.bpe_vocab_size}"
    data_dir = work / f"{name}-text-{vocab}"
    run_dir = work / f"{name}-lm-{vocab}-{args.n_layer}x{args.n_embd}-{args.lm_iters}"
    start = time.perf_counter()
    if not (data_dir / "meta.json").is_file():
        if args.vocab == "bpe":  # valid UTF-8 as the BPE reads it: a non-UTF-8 byte is its Latin-1 character
            text, tokenizer = "\n".join(map(unescape_bytes, texts)) + "\n", train_bpe(texts, args.bpe_vocab_size)
        else:
            text, tokenizer = "\n".join(texts) + "\n", None
        prepare_splits(text, data_dir, args.vocab, tokenizer=tokenizer, val_fraction=0.02,
                       source=f"training sentences of {name}", overwrite=True)
    cmd = [sys.executable, str(REPO / "train.py"), "--data-dir", str(data_dir), "--out-dir", str(run_dir),
           "--preset", "tiny", "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd),
           "--max-iters", str(args.lm_iters), "--eval-interval", "0", "--eval-max-tokens", "16384",
           "--sample-tokens", "0", "--keep-checkpoints", "1", "--threads", str(args.threads), "--device", "cpu"]
    log(shown(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # a finished run returns at once, a cut one resumes
    return run_dir, cmd, time.perf_counter() - start


def shown(cmd) -> str:
    """A command line as recorded: paths inside the repository relative to it."""
    return " ".join(["python"] + [os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in cmd[1:]])


def one_run(key, name, train, dev, test, variant, args, results, log) -> None:
    """Fine-tune (or train from scratch) one classifier and store its result under ``key``."""
    if key in results["runs"]:
        log(f"{key}: done already")
        return
    cfg = ClassifyConfig(epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
                         max_len=args.max_len, pool=args.pool, progress=False)
    pre = None
    if variant == "pretrained":
        run_dir, cmd, seconds = pretrain([e.text for e in train], name, args, log)
        make_lm, pre = (lambda _train: load(run_dir)), {"command": shown(cmd), "seconds": seconds}
    else:
        make_lm = partial(scratch_lm, vocab=args.vocab, bpe_vocab_size=args.bpe_vocab_size, n_layer=args.n_layer,
                          n_embd=args.n_embd)
    log(f"{key}: {len(train)} train, {len(dev)} dev, {len(test)} test")
    result = run_split(make_lm, train, dev, test, cfg, torch.device("cpu"), log=log)
    result.pop("confusion")
    results["runs"][key] = {**result, "config": asdict(cfg), "pretraining": pre,
                            "command": " ".join(["python", "benchmarks/classify_experiment.py",
                                                 *sys.argv[1:]])}
    summarize(results, args)


def summarize(results, args) -> None:
    table = {}
    for task, n in (("sst5", 1), ("mr", 10)):
        for variant in ("scratch", "pretrained"):
            runs = [r for k, r in results["runs"].items() if k.startswith(f"{task}/{variant}")]
            if runs:
                acc = [100 * r["accuracy"] for r in runs]
                table[f"{task}/{variant}"] = {
                    "accuracy": statistics.fmean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "macro_f1": statistics.fmean(100 * r["macro_f1"] for r in runs), "runs": len(runs),
                    "of": n, "epochs": runs[0]["epochs"],
                    "seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
                    "pretraining_seconds": (statistics.fmean(r["pretraining"]["seconds"] for r in runs)
                                            if variant == "pretrained" else None),
                    "firing_rate_all": statistics.fmean(r["firing_rates"].get("all", 0.0) for r in runs)}
    results["table"] = table
    atomic_write_json(args.out, results)
    vocab = ("bytes" if args.vocab == "byte" else
             f"a {args.bpe_vocab_size}-token byte-level BPE trained on each run's training sentences")
    lines = [f"Sentence classification, {results['device']}, torch {results['torch']}; "
             f"model {args.n_layer} x {args.n_embd} SpikeGPT, {vocab}, max-len {args.max_len} tokens; test accuracy "
             "(%) at the best dev epoch (± the std over folds; macro-F1, epochs trained, seconds per fine-tuning run "
             "+ per language-model pre-training).", "",
             "| model | MR (10-fold CV) | SST-5 |", "|---|---:|---:|"]

    def cell(key):
        row = table.get(key)
        if row is None:
            return "not run"
        folds = f" ± {row['std']:.2f} (F1 {row['macro_f1']:.1f}, {row['runs']}/{row['of']} folds" if row["of"] > 1 \
            else f" (F1 {row['macro_f1']:.1f}"
        lm = f" + LM {row['pretraining_seconds']:.0f} s" if row.get("pretraining_seconds") is not None else ""
        return f"{row['accuracy']:.2f}{folds}, {row['epochs']} ep, {row['seconds_per_run']:.0f} s{lm})"
    lines += [f"| ours, task only | {cell('mr/scratch')} | {cell('sst5/scratch')} |",
              f"| ours, pre-trained on the training sentences | {cell('mr/pretrained')} | {cell('sst5/pretrained')} |"]
    lines += [f"| {name} (published) | {v['mr']} | {v['sst5']} |" for name, v in PUBLISHED.items()]
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir)

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    results.update(device=f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), {args.threads} torch thread(s)", torch=str(torch.__version__),
                   published=PUBLISHED)
    if args.report_only:
        summarize(results, args)
        return
    if "sst5" in args.tasks:
        sst = [read_examples(data / f"stsa.fine.{s}") for s in ("train", "dev", "test")]
        for variant in args.variants:
            one_run(f"sst5/{variant}", "sst5", *sst, variant, args, results, log)
    if "mr" in args.tasks:
        mr = read_examples(data / "rt-polarity.all")
        splits = fold_splits(mr, 10, ClassifyConfig.dev_fraction, ClassifyConfig.seed, "rt-polarity.all")
        for i, (train, dev, test) in enumerate(splits[:args.mr_folds]):
            for variant in args.variants:
                one_run(f"mr/{variant}/fold-{i + 1}", f"mr-fold-{i + 1}", train, dev, test, variant, args, results, log)


if __name__ == "__main__":
    main()
