"""Datasets of the test tasks, read from the JSONL files beside this file (no download, no cache)."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _jsonl(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def rolling_docs(**_metadata) -> datasets.DatasetDict:
    return _jsonl("rolling.jsonl")


def choice_docs(**_metadata) -> datasets.DatasetDict:
    return _jsonl("choice.jsonl")
