"""Prepared token datasets: the format, reading and sampling them, and preparing them.

=================  ==========================================================================
``format``         format name and versions, the token dtype rule, ``meta.json`` validation
``reading``        memory-mapped splits (single files or shards), dataset checks, the tokenizer
``sampling``       stateless, reproducible training batches
``writer``         the one writer: fingerprints, existing-output policy, meta commit, progress
``text``           a text (one byte string) -> single-file splits; UTF-8 helpers
``inputs``         document-corpus inputs (.jsonl.zst, .jsonl, .txt) and the val hash rule
``documents``      document corpora -> sharded splits, in parallel and resumably
``builtin``        the built-in corpus of standard-library docstrings
``flags``          argparse types and the error exit of the ``data/`` scripts
=================  ==========================================================================

The formats are described in ``docs/data.md``.
"""
from .builtin import DEFAULT_CORPUS_MAX_BYTES, default_corpus_dir, extract_stdlib_docstrings
from .documents import prepare_documents
from .format import (FORMAT, FORMAT_VERSION, META_FILE, SHARDED_VERSION, SINGLE_FILE_VERSION, SPLIT_NAMES,
                     DataError, dtype_for_vocab, load_meta, split_files)
from .inputs import INPUT_SUFFIXES, find_inputs, is_val_document, iter_documents, val_hash_fraction
from .reading import ShardedTokens, check_dataset, format_summary, load_tokenizer, open_split
from .sampling import sample_batch, sample_offsets
from .text import compute_split_bounds, prepare_splits

__all__ = [
    "DataError", "FORMAT", "FORMAT_VERSION", "SINGLE_FILE_VERSION", "SHARDED_VERSION", "META_FILE", "SPLIT_NAMES",
    "dtype_for_vocab", "load_meta", "split_files",
    "ShardedTokens", "open_split", "check_dataset", "load_tokenizer", "format_summary",
    "sample_offsets", "sample_batch",
    "compute_split_bounds", "prepare_splits",
    "INPUT_SUFFIXES", "find_inputs", "iter_documents", "val_hash_fraction", "is_val_document", "prepare_documents",
    "extract_stdlib_docstrings", "default_corpus_dir", "DEFAULT_CORPUS_MAX_BYTES",
]
