"""Fine-tuning and evaluation of a sentence classifier.

Protocol: train for ``epochs`` epochs, measure dev accuracy after each, keep the weights of the best
dev epoch (the earliest on ties) and evaluate the test set once, with those weights: the reported
test accuracy is never chosen by looking at the test set.  Cross-validation repeats this per fold,
its dev set carved from the fold's training part, and reports the mean and standard deviation.

Training batches are grouped by length (shuffled buckets of similar lengths, right-padded);
evaluation batches hold sentences of exactly one length, so no pad token is run at all there and the
test set's firing rates count real tokens only.
"""
from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from itertools import groupby

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..spikes import firing_rates, record_spikes
from .data import check_labels, fold_splits, label_set
from .model import PAD_ID, SentenceClassifier, save_classifier


@dataclass
class ClassifyConfig:
    epochs: int = 5
    lr: float = 1e-3  # the language model's parameters
    head_lr: float | None = None  # the linear head's (None: lr)
    batch_size: int = 32
    max_len: int = 128  # tokens; longer sentences are truncated
    seed: int = 1337
    dropout: float = 0.1  # on the pooled features
    pool: str = "mean"
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of the steps with a linear warm-up, then linear decay to 0
    grad_clip: float = 1.0
    dev_fraction: float = 0.1  # carved from training when there is no dev file
    dtype: str = "fp32"
    progress: bool = True


# --------------------------------------------------------------------------------------------------
# Metrics and model selection.
# --------------------------------------------------------------------------------------------------
def scores(y_true, y_pred, n_classes: int) -> dict:
    """Accuracy, macro-F1 (the mean over classes of 2TP / (2TP + FP + FN), 0 for a class never
    predicted nor present) and the confusion matrix (rows: gold, columns: predicted)."""
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        confusion[t][p] += 1
    f1 = []
    for c in range(n_classes):
        tp = confusion[c][c]
        denom = sum(confusion[c]) + sum(row[c] for row in confusion)
        f1.append(2 * tp / denom if denom else 0.0)
    n = max(len(y_true), 1)
    return {"accuracy": sum(confusion[c][c] for c in range(n_classes)) / n,
            "macro_f1": sum(f1) / n_classes, "confusion": confusion}


def best_epoch(dev_accuracies) -> int:
    """The 1-based epoch of the highest dev accuracy, the earliest on ties."""
    return max(range(len(dev_accuracies)), key=lambda i: (dev_accuracies[i], -i)) + 1


# --------------------------------------------------------------------------------------------------
# Tokens and batches.
# --------------------------------------------------------------------------------------------------
def encode(clf: SentenceClassifier, examples, max_len: int):
    """(token id lists truncated to ``max_len``, label ids, how many were truncated)."""
    index = {label: i for i, label in enumerate(clf.labels)}
    ids, truncated = [], 0
    for e in examples:
        t = clf.encode(e.text) or [PAD_ID]
        truncated += len(t) > max_len
        ids.append(t[:max_len])
    return ids, [index[e.label] for e in examples], truncated


def train_batches(lengths, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled buckets of 50 batches, each sorted by length and cut into batches; batch order shuffled."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bucket = 50 * batch_size
    batches = []
    for s in range(0, len(order), bucket):
        part = sorted(order[s:s + bucket], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(lengths, batch_size: int) -> list[list[int]]:
    """Batches of sentences of one length each (no padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = []
    for _, group in groupby(order, key=lambda i: lengths[i]):
        group = list(group)
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    return batches


def collate(ids, batch, device):
    """(tokens (B, T) right-padded with PAD_ID, lengths (B,)) on ``device``."""
    lengths = torch.tensor([len(ids[i]) for i in batch])
    tokens = torch.full((len(batch), int(lengths.max())), PAD_ID, dtype=torch.long)
    for row, i in enumerate(batch):
        tokens[row, :len(ids[i])] = torch.tensor(ids[i])
    return tokens.to(device), lengths.to(device)


def autocast_for(dtype: str, device: torch.device):
    """A context factory for the forward pass: fp32 (none), bf16, or fp16 (CUDA only); auto = bf16
    on a GPU that supports it, else fp32."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext
    if dtype == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return lambda: torch.autocast(device.type, dtype=half)


@torch.no_grad()
def predict_proba(clf: SentenceClassifier, ids, batch_size: int, device, autocast=contextlib.nullcontext):
    """Class probabilities (N, n_classes), in the order of ``ids``."""
    was_training = clf.training
    clf.eval()
    probs = torch.zeros(len(ids), len(clf.labels))
    for batch in eval_batches([len(t) for t in ids], batch_size):
        with autocast():
            logits = clf(*collate(ids, batch, device))
        probs[batch] = torch.softmax(logits.float(), -1).cpu()
    clf.train(was_training)
    return probs


def evaluate(clf, ids, y, batch_size: int, device, autocast=contextlib.nullcontext, rates: bool = False) -> dict:
    """Scores of ``clf`` on encoded sentences, with the firing rates measured on them if ``rates``."""
    with record_spikes(clf.lm) if rates else contextlib.nullcontext():
        pred = predict_proba(clf, ids, batch_size, device, autocast).argmax(-1).tolist()
    out = scores(y, pred, len(clf.labels))
    if rates:
        out["firing_rates"] = firing_rates(clf.lm)
    return out


# --------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------
def fit(clf: SentenceClassifier, train, dev, cfg: ClassifyConfig, device, log=print) -> list[dict]:
    """Train on encoded ``train = (ids, y)``, select on ``dev``; leaves ``clf`` at the best dev epoch.
    Returns the per-epoch history."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    autocast = autocast_for(cfg.dtype, device)
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    opt = torch.optim.AdamW([{"params": clf.lm_parameters(), "lr": cfg.lr},
                             {"params": clf.head_parameters(), "lr": head_lr}], weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train[0]) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
    history, best_state = [], None
    for epoch in range(1, cfg.epochs + 1):
        clf.train()
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(train_batches([len(t) for t in train[0]], cfg.batch_size, rng), desc=f"epoch {epoch}",
                   disable=not cfg.progress, leave=False, dynamic_ncols=True)
        for batch in bar:
            tokens, lengths = collate(train[0], batch, device)
            target = torch.tensor([train[1][i] for i in batch], device=device)
            with autocast():
                logits = clf(tokens, lengths)
            loss = F.cross_entropy(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(clf.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(-1) == target).sum())
            seen += len(batch)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        dev_acc = evaluate(clf, *dev, cfg.batch_size, device, autocast)["accuracy"]
        history.append({"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "dev_accuracy": dev_acc, "seconds": time.perf_counter() - start})
        log(f"epoch {epoch}: train loss {loss_sum / seen:.4f} acc {100 * correct / seen:.2f}%, "
            f"dev acc {100 * dev_acc:.2f}% ({history[-1]['seconds']:.0f}s)")
        if best_epoch([h["dev_accuracy"] for h in history]) == epoch:
            best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
    clf.load_state_dict(best_state)
    return history


def run_split(make_lm, train, dev, test, cfg: ClassifyConfig, device, labels=None, out_dir=None,
              log=print) -> dict:
    """Train on example lists ``train``/``dev``, test on ``test`` at the best dev epoch.

    ``make_lm(train_examples)`` returns the language model to fine-tune (with its tokenizer); the
    result is the JSON dict of one run (accuracy, macro_f1, dev_accuracy, epochs, best_epoch, ...)."""
    start = time.perf_counter()
    labels = labels or label_set(train)
    for part in (dev, test):
        check_labels(part, labels, train[0].where.rsplit(":", 1)[0])
    torch.manual_seed(cfg.seed)
    clf = SentenceClassifier(make_lm(train), labels, cfg.pool, cfg.dropout).to(device)
    encoded, truncated = {}, {}
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        ids, y, n = encode(clf, part, cfg.max_len)
        encoded[name], truncated[name] = (ids, y), n
        if n:
            log(f"{name}: {n} of {len(part)} sentences longer than --max-len {cfg.max_len} tokens were truncated")
    history = fit(clf, encoded["train"], encoded["dev"], cfg, device, log)
    best = best_epoch([h["dev_accuracy"] for h in history])
    test_scores = evaluate(clf, *encoded["test"], cfg.batch_size, device, autocast_for(cfg.dtype, device),
                           rates=True)
    result = {"accuracy": test_scores["accuracy"], "macro_f1": test_scores["macro_f1"],
              "dev_accuracy": history[best - 1]["dev_accuracy"], "epochs": cfg.epochs, "best_epoch": best,
              "history": history, "confusion": test_scores["confusion"],
              "firing_rates": test_scores["firing_rates"], "labels": labels,
              "n_train": len(train), "n_dev": len(dev), "n_test": len(test), "truncated": truncated,
              "seconds": time.perf_counter() - start}
    log(f"test at best dev epoch {best}: accuracy {100 * result['accuracy']:.2f}%, "
        f"macro-F1 {100 * result['macro_f1']:.2f}%")
    if out_dir is not None:
        path = save_classifier(clf, out_dir, {"metrics": {k: result[k] for k in ("accuracy", "macro_f1",
                                                                                  "dev_accuracy", "best_epoch")},
                                              "max_len": cfg.max_len, "classify_config": asdict(cfg)})
        log(f"saved {path}")
    return result


def cross_validate(make_lm, examples, k: int, cfg: ClassifyConfig, device, source: str, max_folds=None,
                   out_dir=None, log=print) -> dict:
    """K-fold cross-validation (the first ``max_folds`` folds only, if given): the per-fold results,
    and their mean and standard deviation (over the folds run)."""
    labels = label_set(examples)
    splits = fold_splits(examples, k, cfg.dev_fraction, cfg.seed, source)[:max_folds]
    folds = []
    for i, (train, dev, test) in enumerate(splits):
        log(f"fold {i + 1}/{k}: {len(train)} train, {len(dev)} dev, {len(test)} test")
        folds.append(run_split(make_lm, train, dev, test, cfg, device, labels,
                               None if out_dir is None else f"{out_dir}/fold-{i + 1}", log))
    acc = [f["accuracy"] for f in folds]
    keys = set.intersection(*(set(f["firing_rates"]) for f in folds))
    result = {"accuracy": statistics.fmean(acc), "macro_f1": statistics.fmean(f["macro_f1"] for f in folds),
              "dev_accuracy": statistics.fmean(f["dev_accuracy"] for f in folds), "epochs": cfg.epochs,
              "best_epoch": [f["best_epoch"] for f in folds], "folds": folds, "mean": statistics.fmean(acc),
              "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "folds_run": len(folds), "folds_total": k,
              "firing_rates": {key: statistics.fmean(f["firing_rates"][key] for f in folds) for key in sorted(keys)},
              "labels": labels}
    log(f"{len(folds)}/{k} folds: accuracy {100 * result['mean']:.2f} +- {100 * result['std']:.2f}%")
    return result
