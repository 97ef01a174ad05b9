"""Sentence-classification data: file formats, the label set, and stratified K-fold splits.

Formats (detected from the first line unless ``fmt`` names one):

``label-sentence``  one example per line, ``LABEL SENTENCE`` (the label, one space, the sentence): the
                    Kim (2014) files such as ``stsa.fine.train`` and ``rt-polarity.all``;
``tsv``             GLUE style: a header naming a ``sentence`` and a ``label`` column, tab-separated;
``csv``             a header naming a ``text`` and a ``label`` column (read with the csv module);
``pair``            two or more files with one class each (``pos.txt neg.txt``); a class is named by
                    the dot-separated parts in which the file names differ (``rt-polarity.pos`` ->
                    ``pos``).

Labels are strings; the label set is sorted numerically when every label is an integer, otherwise
alphabetically.  Every problem is a :class:`DataError` naming the file and line.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from .. import data

FORMATS = ("label-sentence", "tsv", "csv", "pair")


class DataError(data.DataError):
    """A problem with a classification file; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    where: str  # "file:line", for messages


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an existing data file")
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    if not text.strip():
        raise DataError(f"{path}: empty file; pass a file with one labelled sentence per line")
    return text.splitlines()


def detect_format(path) -> str:
    """``tsv``, ``csv`` or ``label-sentence``, from the first non-blank line of ``path``."""
    path = Path(path)
    first = next(line for line in _lines(path) if line.strip())
    if "\t" in first and {"sentence", "label"} <= {c.strip().lower() for c in first.split("\t")}:
        return "tsv"
    header = next(csv.reader([first]))
    if {"text", "label"} <= {c.strip().lower() for c in header}:
        return "csv"
    return "label-sentence"


def _read_label_sentence(path: Path) -> list[Example]:
    out = []
    for i, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        if not text.strip():
            raise DataError(f"{path}:{i}: cannot parse {line[:60]!r}: expected 'LABEL SENTENCE' "
                            "(a label, one space, the sentence); fix the line or pass --format")
        out.append(Example(text.strip(), label, f"{path}:{i}"))
    return out


def _read_table(path: Path, rows, text_col: str, what: str) -> list[Example]:
    header = [c.strip().lower() for c in next(rows)]
    if text_col not in header or "label" not in header:
        raise DataError(f"{path}:1: the header {header} lacks a {text_col!r} or 'label' column; "
                        f"a {what} file needs both (or pass another --format)")
    t, y = header.index(text_col), header.index("label")
    out = []
    for i, row in enumerate(rows, 2):
        i = getattr(rows, "line_num", i)  # a CSV row may span lines
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(header) or not row[t].strip() or not row[y].strip():
            raise DataError(f"{path}:{i}: cannot parse a {what} row with {len(row)} field(s) (the "
                            f"header has {len(header)}, {text_col!r} and 'label' non-empty); fix the line")
        out.append(Example(row[t].strip(), row[y].strip(), f"{path}:{i}"))
    return out


def _read_tsv(path: Path) -> list[Example]:
    return _read_table(path, (line.split("\t") for line in _lines(path)), "sentence", "TSV")


def _read_csv(path: Path) -> list[Example]:
    _lines(path)  # the missing/empty-file messages
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = csv.reader(f)
        try:
            return _read_table(path, rows, "text", "CSV")
        except csv.Error as e:
            raise DataError(f"{path}:{rows.line_num}: not valid CSV ({e}); fix the line") from None


def pair_labels(paths) -> list[str]:
    """Class names of one-class files: the dot-separated name parts in which they differ."""
    parts = [Path(p).name.split(".") for p in paths]
    if len({len(p) for p in parts}) == 1:
        differ = [j for j in range(len(parts[0])) if len({p[j] for p in parts}) > 1]
        names = [".".join(p[j] for j in differ) for p in parts]
    else:
        names = [Path(p).name for p in paths]
    if len(set(names)) != len(names) or not all(names):
        names = [str(i) for i in range(len(paths))]
    return names


def read_examples(paths, fmt: str | None = None) -> list[Example]:
    """The examples of one file (any format) or of several one-class files (``pair``)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if fmt not in (None, *FORMATS):
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if len(paths) > 1 or fmt == "pair":
        if len(paths) < 2 or fmt not in (None, "pair"):
            raise DataError("--format pair takes two or more one-class files (pos.txt neg.txt); "
                            "other formats take one file")
        out = []
        for path, label in zip(paths, pair_labels(paths)):
            out += [Example(line.strip(), label, f"{path}:{i}")
                    for i, line in enumerate(_lines(path), 1) if line.strip()]
        return out
    path = paths[0]
    fmt = fmt or detect_format(path)
    out = {"label-sentence": _read_label_sentence, "tsv": _read_tsv, "csv": _read_csv}[fmt](path)
    if not out:
        raise DataError(f"{path}: no examples (only a header or blank lines); pass a file with data")
    return out


def label_set(examples) -> list[str]:
    labels = {e.label for e in examples}
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def check_labels(examples, labels, train_name: str) -> None:
    """Every label of ``examples`` (a dev or test set) is one that training has seen."""
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise DataError(f"{e.where}: label {e.label!r} does not occur in the training data "
                            f"({train_name}, labels {labels}); fix the label or the file")


def stratified_split(examples, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(rest, carved): ``fraction`` of each class (at least one example) carved out, seeded."""
    rng = random.Random(seed)
    rest, carved = [], []
    for label in label_set(examples):
        members = [e for e in examples if e.label == label]
        rng.shuffle(members)
        k = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        carved += members[:k]
        rest += members[k:]
    return rest, carved


def kfold(examples, k: int, seed: int) -> list[list[Example]]:
    """``k`` stratified folds: each class shuffled (seeded) and dealt round-robin, so that fold sizes
    differ by at most one per class."""
    if k < 2:
        raise DataError(f"--folds {k}: cross-validation needs at least 2 folds")
    rng = random.Random(seed)
    folds = [[] for _ in range(k)]
    start = 0
    for label in label_set(examples):
        members = [e for e in examples if e.label == label]
        rng.shuffle(members)
        for j, e in enumerate(members):
            folds[(start + j) % k].append(e)
        start += len(members)
    return folds


def fold_splits(examples, k: int, dev_fraction: float, seed: int, source: str):
    """[(train, dev, test)] of K-fold cross-validation: fold i is the test set, the dev set is carved
    (stratified) from the other folds.  Every class must have an example in every part."""
    labels = label_set(examples)
    folds = kfold(examples, k, seed)
    out = []
    for i, test in enumerate(folds):
        train, dev = stratified_split([e for j, f in enumerate(folds) if j != i for e in f], dev_fraction,
                                      seed + i)
        for part, name in ((train, "training part"), (dev, "dev part"), (test, "test fold")):
            missing = [c for c in labels if c not in {e.label for e in part}]
            if missing:
                lines = [e.where.rsplit(":", 1)[1] for e in examples if e.label == missing[0]]
                raise DataError(f"{source}: class {missing[0]!r} has no example in the {name} of fold "
                                f"{i + 1}/{k} (it has {len(lines)} example(s), at lines "
                                f"{', '.join(lines[:5])}); use fewer --folds or add examples")
        out.append((train, dev, test))
    return out
