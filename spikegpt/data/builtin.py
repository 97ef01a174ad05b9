"""The built-in corpus: English prose from the standard library's docstrings (``docs/data.md``,
"The built-in corpus"), so that training works out of the box without downloads.

:func:`default_corpus_dir` builds it once per Python version (a byte-vocabulary dataset) and caches it.
"""
from __future__ import annotations

import ast
import hashlib
import os
import secrets
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .format import DataError
from .reading import check_dataset
from .text import prepare_splits

__all__ = ["DEFAULT_CORPUS_MAX_BYTES", "extract_stdlib_docstrings", "default_corpus_dir"]

#: Cap on the default corpus text, in UTF-8 bytes.
DEFAULT_CORPUS_MAX_BYTES = 4_000_000
#: Prose rule: at least this many characters ...
DOCSTRING_MIN_CHARS = 200
#: ... of which at least this fraction are letters (str.isalpha) or whitespace.
DOCSTRING_MIN_PROSE_FRACTION = 0.8
#: Directories of the standard library that are skipped (tests, third-party packages, caches).
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
#: Bump when the extraction rule changes (cached corpora with another version are rebuilt).
_CORPUS_BUILDER_VERSION = 1
_CORPUS_NAME = "python-stdlib-docstrings"


_STMT_CONTAINERS = (ast.stmt, ast.excepthandler, ast.match_case)


def _docstrings_in_order(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order (depth-first)."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    # Docstring holders are statements, nested only in statement lists (bodies, else/finally blocks,
    # except handlers, match cases): no need to visit expressions.
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, _STMT_CONTAINERS):
            yield from _docstrings_in_order(child)


def _looks_like_prose(doc: str) -> bool:
    if len(doc) < DOCSTRING_MIN_CHARS:
        return False
    prose = sum(1 for c in doc if c.isalpha() or c.isspace())
    return prose >= DOCSTRING_MIN_PROSE_FRACTION * len(doc)


def extract_stdlib_docstrings(stdlib_dir: str | os.PathLike[str] | None = None,
                              max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> tuple[str, int]:
    """Deterministically collect English prose from the standard library's docstrings.

    Rule: walk ``stdlib_dir`` (default ``sysconfig.get_paths()["stdlib"]``) in sorted order, skipping
    directories named ``test``, ``tests``, ``idle_test``, ``site-packages``, ``dist-packages`` and
    ``__pycache__`` and files named ``test_*.py``; parse each ``.py`` file with :mod:`ast` (files that
    fail to parse are skipped); take module, class and function docstrings in source order
    (``ast.get_docstring(clean=True)``); keep those with at least :data:`DOCSTRING_MIN_CHARS` characters
    of which at least :data:`DOCSTRING_MIN_PROSE_FRACTION` are letters or whitespace; drop exact
    duplicates (first kept); join with blank lines, ending with a newline; stop before the docstring
    that would take the text over ``max_bytes`` UTF-8 bytes.

    Returns:
        ``(text, number_of_docstrings)``.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"Python standard library directory {root} not found; pass a prepared --data-dir instead")
    seen: set[str] = set()
    docs: list[str] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("test_"):
                continue
            try:
                source = (Path(dirpath) / fn).read_bytes()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source)
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
                continue
            for doc in _docstrings_in_order(tree):
                if doc in seen or not _looks_like_prose(doc):
                    continue
                n = len(doc.encode("utf-8", "surrogateescape")) + 2
                if size + n > max_bytes:
                    return "\n\n".join(docs) + "\n", len(docs)
                seen.add(doc)
                docs.append(doc)
                size += n
    return "\n\n".join(docs) + "\n" if docs else "", len(docs)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SPIKEGPT_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "spikegpt"


def _valid_default_corpus(d: Path) -> bool:
    try:
        meta = check_dataset(d)
    except DataError:
        return False
    corpus = meta.get("corpus", {})
    return (meta.get("source") == _CORPUS_NAME and isinstance(corpus, dict)
            and corpus.get("builder_version") == _CORPUS_BUILDER_VERSION)


def default_corpus_dir(cache_dir: str | os.PathLike[str] | None = None, *,
                       log: Callable[[str], None] | None = None) -> Path:
    """Path of the built-in default corpus (a prepared byte-vocab dataset), building it on first use.

    The corpus is the text of :func:`extract_stdlib_docstrings` for the running interpreter, prepared
    with the byte vocabulary, the last 10% (by bytes) as the val split, no test split. It lives in
    ``CACHE/default-corpus-py{major}{minor}`` where ``CACHE`` is ``cache_dir``, else ``$SPIKEGPT_CACHE``,
    else ``~/.cache/spikegpt``. It is built in a temporary sibling directory and renamed into place, so
    concurrent or interrupted runs are safe. A one-line message is printed (``log``, default stderr)
    when it is built.
    """
    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    root = _cache_root(cache_dir)
    target = root / f"default-corpus-py{sys.version_info.major}{sys.version_info.minor}"
    if _valid_default_corpus(target):
        return target
    root.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    text, n_docs = extract_stdlib_docstrings()
    data = text.encode("utf-8", "surrogateescape")
    if len(data) < 10_000:
        raise DataError(f"the Python standard library yielded only {len(data):,} bytes of docstrings; "
                        f"prepare a dataset with data/prepare_text.py and pass its directory instead")
    version = ".".join(map(str, sys.version_info[:3]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        meta = prepare_splits(
            data, tmp, "byte", val_fraction=0.1, source=_CORPUS_NAME,
            extra_meta={"corpus": {
                "name": _CORPUS_NAME,
                "python_version": version,
                "docstrings": n_docs,
                "text_sha256": hashlib.sha256(data).hexdigest(),
                "rule": (f"module/class/function docstrings of the stdlib (tests and site-packages skipped), "
                         f">= {DOCSTRING_MIN_CHARS} chars, >= {DOCSTRING_MIN_PROSE_FRACTION:.0%} letters or "
                         f"whitespace, exact duplicates dropped, capped at {DEFAULT_CORPUS_MAX_BYTES:,} bytes"),
                "builder_version": _CORPUS_BUILDER_VERSION,
            }},
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists), or an invalid old version is in the way.
            if _valid_default_corpus(target):
                return target
            trash = root / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    dt = time.perf_counter() - t0
    s = meta["splits"]
    log(f"spikegpt: prepared the default corpus (Python {version} stdlib docstrings: {n_docs:,} docstrings, "
        f"{len(data) / 1e6:.2f} MB; train {s['train']['tokens']:,} / val {s['val']['tokens']:,} byte tokens) "
        f"in {dt:.1f} s at {target}")
    return target
