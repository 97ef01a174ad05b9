"""``python -m spikegpt.classify``: fine-tune and evaluate SpikeGPT as a sentence classifier.

    python -m spikegpt.classify [train] --train F --dev F --test F [--init-from CKPT] [--json OUT] [--out-dir DIR]
    python -m spikegpt.classify [train] --data F [F ...] --folds 10 [--max-folds N]
    python -m spikegpt.classify predict --ckpt DIR "a sentence" ...      (or sentences on stdin)
    python -m spikegpt.classify evaluate --ckpt DIR --test F [--json OUT]

``train`` (the default) fine-tunes a language model of ours (``--init-from``) or a reference one
(``--reference`` with ``--reference-config``), or trains one from scratch (``--preset`` and the
architecture flags, ``--vocab byte|char|bpe``).  The test accuracy reported is the one at the best dev
epoch.  ``--json`` writes ``{"accuracy", "macro_f1", "dev_accuracy", "epochs", "best_epoch",
"history", "firing_rates", ...}``, with ``"folds"``, ``"mean"`` and ``"std"`` under ``--folds``.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial

from ..cli import (UserError, add_device_arg, add_dtype_arg, add_kernels_arg, add_threads_arg, load_model,
                   new_parser, nonneg_float, positive_float, positive_int, probability, run_cli, setup_runtime,
                   unit_interval, write_json)
from ..config import LIF_THRESHOLD, PRESETS, ModelConfig, preset
from .data import FORMATS, check_labels, read_examples, stratified_split
from .model import POOLS, VOCABS, load_classifier, scratch_lm
from .train import ClassifyConfig, autocast_for, cross_validate, encode, evaluate, predict_proba, run_split

COMMANDS = ("train", "predict", "evaluate")


def build_parser():
    p = new_parser("python -m spikegpt.classify", "Fine-tune and evaluate SpikeGPT as a sentence "
                   "classifier (the subcommand defaults to train).")
    sub = p.add_subparsers(dest="command", required=True)
    kw = {"formatter_class": p.formatter_class}
    c, m = ClassifyConfig(), ModelConfig()

    t = sub.add_parser("train", help="train and evaluate a classifier", **kw)
    g = t.add_argument_group("data")
    g.add_argument("--train", nargs="+", metavar="F", help="training file (or one-class files)")
    g.add_argument("--dev", nargs="+", metavar="F", help="dev file (default: --dev-fraction of --train)")
    g.add_argument("--test", nargs="+", metavar="F", help="test file")
    g.add_argument("--data", nargs="+", metavar="F", help="a set without a split, for --folds")
    g.add_argument("--folds", type=positive_int, help="K-fold cross-validation of --data")
    g.add_argument("--max-folds", type=positive_int, help="run only the first N of the --folds folds")
    g.add_argument("--dev-fraction", type=probability, default=c.dev_fraction,
                   help="share of the training part carved (stratified) as the dev set when none is given")
    g.add_argument("--format", choices=FORMATS, help="input format (default: detected)")
    g = t.add_argument_group("model")
    g.add_argument("--init-from", metavar="CKPT", help="fine-tune this language model of ours (file or run directory)")
    g.add_argument("--reference", metavar="PTH", help="fine-tune a reference SpikeGPT state dict (.pth)")
    g.add_argument("--reference-config", metavar="JSON", help="the reference model's config JSON")
    g.add_argument("--tokenizer", help="override the language model's tokenizer: 'byte' or a tokenizer JSON")
    g.add_argument("--binary-embedding", dest="binary_embedding", action="store_true", default=None,
                   help="reference import: binarise the embedding")
    g.add_argument("--no-binary-embedding", dest="binary_embedding", action="store_false",
                   help="reference import: feed E[idx] itself")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="from scratch: architecture preset")
    g.add_argument("--n-layer", type=positive_int, help="from scratch: blocks (default: the preset's)")
    g.add_argument("--n-embd", type=positive_int, help="from scratch: width (default: the preset's)")
    g.add_argument("--ffn-mult", type=positive_int, help=f"from scratch: FFN width / n_embd (default {m.ffn_mult})")
    g.add_argument("--lm-dropout", type=unit_interval, help=f"from scratch: residual dropout (default {m.dropout})")
    g.add_argument("--tau", type=positive_float, help=f"from scratch: LIF time constant (default {m.tau})")
    g.add_argument("--v-threshold", type=positive_float,
                   help=f"threshold: from scratch (default {LIF_THRESHOLD}), or a reference import's")
    g.add_argument("--no-spike", dest="spiking", action="store_false", default=None,
                   help="from scratch: the non-spiking RWKV twin (ablation)")
    g.add_argument("--vocab", choices=VOCABS, default="byte",
                   help="from scratch: bytes, the characters of the training sentences, or a byte-level "
                        "BPE trained on them")
    g.add_argument("--bpe-vocab-size", type=positive_int,
                   help="from scratch with --vocab bpe: tokens of the BPE, at least 257 (default 4096)")
    g = t.add_argument_group("classifier and training")
    g.add_argument("--pool", choices=POOLS, default=c.pool, help="mean over the real tokens, or the last one")
    g.add_argument("--dropout", type=unit_interval, default=c.dropout, help="dropout on the pooled features")
    g.add_argument("--epochs", type=positive_int, default=c.epochs)
    g.add_argument("--lr", type=positive_float, default=c.lr, help="learning rate of the language model")
    g.add_argument("--head-lr", type=positive_float, help="learning rate of the linear head (default: --lr)")
    g.add_argument("--weight-decay", type=nonneg_float, default=c.weight_decay, help="AdamW weight decay")
    g.add_argument("--batch-size", type=positive_int, default=c.batch_size)
    g.add_argument("--max-len", type=positive_int, default=c.max_len, help="tokens; longer sentences are truncated")
    g.add_argument("--seed", type=int, default=c.seed, help="seed of init, dropout, batches and folds")
    g.add_argument("--json", metavar="OUT", help="write the results here")
    g.add_argument("--out-dir", help="keep the classifier (classifier.pt; fold-K/ per fold) here")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _runtime_args(t)

    pr = sub.add_parser("predict", help="label sentences with a saved classifier", **kw)
    pr.add_argument("--ckpt", required=True, help="a classifier: the --out-dir of a train run, or its file")
    pr.add_argument("sentences", nargs="*", help="sentences to label (default: one per line on stdin)")
    pr.add_argument("--batch-size", type=positive_int, default=c.batch_size)
    _runtime_args(pr)

    ev = sub.add_parser("evaluate", help="score a saved classifier on a labelled file", **kw)
    ev.add_argument("--ckpt", required=True, help="a classifier: the --out-dir of a train run, or its file")
    ev.add_argument("--test", nargs="+", required=True, metavar="F", help="labelled file (or one-class files)")
    ev.add_argument("--format", choices=FORMATS, help="input format (default: detected)")
    ev.add_argument("--batch-size", type=positive_int, default=c.batch_size)
    ev.add_argument("--json", metavar="OUT", help="write the scores here")
    _runtime_args(ev)
    return p


def _runtime_args(p) -> None:
    add_device_arg(p)
    add_dtype_arg(p)
    add_threads_arg(p)
    add_kernels_arg(p)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _make_lm(args):
    """``make_lm(train_examples)`` for run_split: the pre-trained model, or a fresh one."""
    if args.init_from or args.reference:
        names = argparse.Namespace(ckpt=args.init_from, reference=args.reference, tokenizer=args.tokenizer,
                                   reference_config=args.reference_config,
                                   binary_embedding=args.binary_embedding, v_threshold=args.v_threshold)
        return lambda _train: load_model(names, "cpu")
    if args.bpe_vocab_size is not None and args.vocab != "bpe":
        raise UserError("--bpe-vocab-size sizes the BPE of --vocab bpe: add --vocab bpe or drop it")
    if args.vocab == "bpe" and args.bpe_vocab_size is not None and args.bpe_vocab_size < 257:
        raise UserError(f"--bpe-vocab-size {args.bpe_vocab_size}: a byte-level BPE needs at least 257 tokens "
                        "(256 bytes and <|endoftext|>)")
    arch = {k: getattr(args, k) for k in ("n_layer", "n_embd", "ffn_mult", "tau", "v_threshold", "spiking")}
    arch["dropout"] = args.lm_dropout
    if args.spiking is False:
        arch["binary_embedding"] = False
    model_over = {k: v for k, v in preset(args.preset)[0].items() if k in ("n_layer", "n_embd", "ffn_mult")}
    arch = {**model_over, **{k: v for k, v in arch.items() if v is not None}}
    return partial(scratch_lm, vocab=args.vocab, bpe_vocab_size=args.bpe_vocab_size or 4096, **arch)


def _train(args, device) -> None:
    if (args.data is None) == (args.train is None):
        raise UserError("pass either --train (with --test, and --dev or --dev-fraction) or --data with --folds")
    if (args.data is None) != (args.folds is None) or (args.max_folds and not args.folds):
        raise UserError("--data goes with --folds K (cross-validation); a split dataset takes --train/--dev/--test")
    if args.train and not args.test:
        raise UserError("--train needs --test (the set the accuracy is reported on)")
    if args.max_folds and args.max_folds > args.folds:
        raise UserError(f"--max-folds {args.max_folds} is more than --folds {args.folds}")
    cfg = ClassifyConfig(epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
                         max_len=args.max_len, seed=args.seed, dropout=args.dropout, pool=args.pool,
                         weight_decay=args.weight_decay, dev_fraction=args.dev_fraction, dtype=args.dtype,
                         progress=args.progress)
    make_lm = _make_lm(args)
    if args.data:
        result = cross_validate(make_lm, read_examples(args.data, args.format), args.folds, cfg, device,
                                " ".join(args.data), args.max_folds, args.out_dir, _say)
    else:
        train = read_examples(args.train, args.format)
        if args.dev:
            dev = read_examples(args.dev, args.format)
        else:
            train, dev = stratified_split(train, cfg.dev_fraction, cfg.seed)
        result = run_split(make_lm, train, dev, read_examples(args.test, args.format), cfg, device,
                           out_dir=args.out_dir, log=_say)
    print(f"accuracy {100 * result['accuracy']:.2f}%  macro-F1 {100 * result['macro_f1']:.2f}%"
          + (f"  ({result['folds_run']}/{result['folds_total']} folds, std {100 * result['std']:.2f})"
             if "folds" in result else f"  (best dev epoch {result['best_epoch']})"))
    if args.json:
        write_json(args.json, result)


def _predict(args, device) -> None:
    clf, _ = load_classifier(args.ckpt, device)
    sentences = args.sentences or [line.strip() for line in sys.stdin if line.strip()]
    if not sentences:
        raise UserError("no sentences: pass them as arguments or one per line on stdin")
    ids = [clf.encode(s) or [0] for s in sentences]
    probs = predict_proba(clf, ids, args.batch_size, device, autocast_for(args.dtype, device))
    for s, p in zip(sentences, probs):
        k = int(p.argmax())
        others = " ".join(f"{label}={float(q):.3f}" for label, q in zip(clf.labels, p))
        print(f"{clf.labels[k]}\t{float(p[k]):.3f}\t{others}\t{s}")


def _evaluate(args, device) -> None:
    clf, ckpt = load_classifier(args.ckpt, device)
    test = read_examples(args.test, args.format)
    check_labels(test, clf.labels, f"the classifier {args.ckpt}")
    ids, y, truncated = encode(clf, test, ckpt.get("max_len", 10 ** 9))
    out = evaluate(clf, ids, y, args.batch_size, device, autocast_for(args.dtype, device), rates=True)
    out.update(n_test=len(test), truncated=truncated, labels=clf.labels)
    print(f"accuracy {100 * out['accuracy']:.2f}%  macro-F1 {100 * out['macro_f1']:.2f}%  on {len(test)} sentences")
    if args.json:
        write_json(args.json, out)


def run(args) -> None:
    device = setup_runtime(args)
    {"train": _train, "predict": _predict, "evaluate": _evaluate}[args.command](args, device)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(argv) and argv[i] == "--debug":
        i += 1
    if i == len(argv) or argv[i] not in (*COMMANDS, "-h", "--help"):
        argv.insert(i, "train")
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
