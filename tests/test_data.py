"""Tests for spikegpt.data and the data/prepare_*.py CLIs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import spikegpt.data.text as text_mod
from spikegpt.data import (
    DEFAULT_CORPUS_MAX_BYTES,
    DataError,
    check_dataset,
    compute_split_bounds,
    default_corpus_dir,
    dtype_for_vocab,
    extract_stdlib_docstrings,
    load_meta,
    load_tokenizer,
    open_split,
    prepare_splits,
    sample_batch,
    sample_offsets,
)
from spikegpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
NEOX_TOKENIZER = REPO.parent / "shared" / "reference" / "20B_tokenizer.json"
needs_neox = pytest.mark.skipif(not NEOX_TOKENIZER.is_file(), reason="../shared not present (user clone)")

# ~6 KB of text with multibyte characters everywhere, and a character ('Ω') only in the last 10 %.
TEXT = "".join(f"Line {i}: the quick brown fox — naïve café, 日本 {i * i}.\n" for i in range(100))
TEXT_VAL_ONLY = TEXT + "Ω Ω fine\n" * 5


def _load_script(name: str):
    path = REPO / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_spikegpt_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prepare_text():
    return _load_script("prepare_text")


@pytest.fixture(scope="module")
def prepare_enwik8():
    return _load_script("prepare_enwik8")


@pytest.fixture
def byte_dir(tmp_path, prepare_text):
    src = tmp_path / "in.txt"
    src.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "byte"
    assert prepare_text.main(["--input", str(src), "--out", str(out), "--test-fraction", "0.05"]) == 0
    return out


# ------------------------------------------------------------------------------------ preparation
def test_prepare_text_byte(byte_dir):
    raw = TEXT.encode("utf-8")
    meta = load_meta(byte_dir)
    assert meta["format"] == "spikegpt-tokens" and meta["version"] == 1
    assert meta["vocab_kind"] == "byte" and meta["vocab_size"] == 256 and meta["dtype"] == "uint8"
    assert meta["tokenizer"] == {"kind": "byte", "version": 1, "vocab_size": 256}
    assert meta["unk_id"] is None
    assert "in.txt" in meta["source"] and str(byte_dir.parent) not in meta["source"]
    assert list(meta["splits"]) == ["train", "val", "test"]
    assert sum(s["bytes"] for s in meta["splits"].values()) == len(raw)
    joined = b""
    for name, s in meta["splits"].items():
        mm = open_split(byte_dir, name)
        assert isinstance(mm, np.memmap) and mm.dtype == np.uint8
        assert len(mm) == s["tokens"] == s["bytes"]
        assert s["unknown"] == 0 and s["escaped_bytes"] == 0
        assert s["chars"] == len(bytes(mm).decode("utf-8"))  # boundaries are on character starts
        joined += bytes(mm)
    assert joined == raw
    val = meta["splits"]["val"]
    assert abs(val["bytes"] - 0.1 * len(raw)) <= 3
    assert sorted(os.listdir(byte_dir)) == ["meta.json", "test.bin", "train.bin", "val.bin"]


def test_prepare_char_vocab_from_train_only(tmp_path, prepare_text, capsys):
    src = tmp_path / "in.txt"
    src.write_text(TEXT_VAL_ONLY, encoding="utf-8")
    out = tmp_path / "char"
    assert prepare_text.main(["--input", str(src), "--out", str(out), "--vocab", "char"]) == 0
    printed = capsys.readouterr().out
    assert "unknown" in printed and "val" in printed
    meta = load_meta(out)
    train_text = TEXT_VAL_ONLY.encode()[: meta["splits"]["val"]["byte_offset"]].decode()
    assert "Ω" not in train_text
    chars = sorted(set(train_text))
    assert meta["vocab_kind"] == "char" and meta["vocab_size"] == len(chars) + 1
    assert meta["unk_id"] == meta["vocab_size"] - 1
    assert meta["tokenizer"]["chars"] == chars
    assert meta["splits"]["train"]["unknown"] == 0
    assert meta["splits"]["val"]["unknown"] == TEXT_VAL_ONLY.count("Ω") == 10
    tok = load_tokenizer(out)
    assert isinstance(tok, CharTokenizer)
    train = open_split(out, "train")
    assert train.dtype == np.uint8 and meta["vocab_kind"] == "char"
    assert tok.decode(train) == train_text
    assert len(train) == len(train_text) == meta["splits"]["train"]["chars"]
    assert meta["splits"]["train"]["bytes"] / len(train) == pytest.approx(len(train_text.encode()) / len(train_text))
    val_text = tok.decode(open_split(out, "val"))
    assert val_text == TEXT_VAL_ONLY.encode()[meta["splits"]["val"]["byte_offset"]:].decode().replace("Ω", "\ufffd")


def test_uint16_dtype_for_large_char_vocab(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(400)) * 3
    meta = prepare_splits(text, tmp_path / "d", "char", val_fraction=0.2)
    assert meta["vocab_size"] > 256 and meta["dtype"] == "uint16"
    mm = open_split(tmp_path / "d", "train")
    assert mm.dtype == np.dtype("<u2")
    assert load_tokenizer(tmp_path / "d").decode(mm) == text[: len(mm)]
    assert dtype_for_vocab(256) == np.uint8 and dtype_for_vocab(257) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32


def test_prepare_is_idempotent_and_refuses_different_contents(tmp_path):
    out = tmp_path / "d"
    m1 = prepare_splits(TEXT, out, "byte", val_fraction=0.1, test_fraction=0.1)
    mtime = (out / "meta.json").stat().st_mtime_ns
    notes = []
    assert prepare_splits(TEXT, out, "byte", val_fraction=0.1, test_fraction=0.1, log=notes.append) == m1
    assert (out / "meta.json").stat().st_mtime_ns == mtime and "nothing to do" in notes[0]
    with pytest.raises(DataError, match="--overwrite"):
        prepare_splits(TEXT + "more", out, "byte", val_fraction=0.1)
    assert load_meta(out) == m1  # untouched
    m2 = prepare_splits(TEXT + "more", out, "byte", val_fraction=0.1, overwrite=True)
    assert m2["fingerprint"] != m1["fingerprint"] and "test" not in m2["splits"]
    assert not (out / "test.bin").exists()  # stale split removed
    assert check_dataset(out) == m2


def test_interrupted_prepare_leaves_no_complete_looking_dir(tmp_path, monkeypatch):
    out = tmp_path / "d"
    real = text_mod._encode_split
    calls = []

    def failing(data, vocab, tok, writer):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the val split
        return real(data, vocab, tok, writer)

    monkeypatch.setattr(text_mod, "_encode_split", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_splits(TEXT, out, "byte")
    assert os.listdir(out) == []  # no meta.json, no half-written or temporary files
    with pytest.raises(DataError, match="no meta.json"):
        load_meta(out)
    monkeypatch.setattr(text_mod, "_encode_split", real)
    prepare_splits(TEXT, out, "byte")  # an empty leftover directory is fine to prepare into
    check_dataset(out)


def test_prepare_text_errors(tmp_path, prepare_text, capsys):
    out = str(tmp_path / "o")
    assert prepare_text.main(["--input", str(tmp_path / "missing.txt"), "--out", out]) == 2
    assert "not found" in capsys.readouterr().err

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("caf\xe9 " * 100).encode("latin-1"))
    assert prepare_text.main(["--input", str(latin1), "--out", out, "--vocab", "char"]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "byte offset 3" in err and "--vocab byte" in err
    assert prepare_text.main(["--input", str(latin1), "--out", out, "--vocab", "byte"]) == 0  # any bytes
    capsys.readouterr()

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcd", encoding="utf-8")
    assert prepare_text.main(["--input", str(tiny), "--out", str(tmp_path / "t")]) == 2
    assert "too small to split" in capsys.readouterr().err

    assert prepare_text.main(["--input", str(latin1), "--out", out, "--val-fraction", "0"]) == 2
    assert "val fraction" in capsys.readouterr().err
    assert prepare_text.main(["--input", str(tiny), "--out", out, "--vocab", "bpe"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_compute_split_bounds():
    data = "aé".encode() * 10  # 30 bytes, 'é' = 2 bytes
    b = compute_split_bounds(data, val_fraction=0.5)
    assert b[0][0] == "train" and b[0][2] == b[1][1] and b[1][2] == 30
    assert (data[b[1][1]] & 0xC0) != 0x80  # on a character start
    assert compute_split_bounds(data, split_sizes=[20, 5, 5]) == [("train", 0, 20), ("val", 20, 25),
                                                                   ("test", 25, 30)]
    with pytest.raises(DataError, match="add up"):
        compute_split_bounds(data, split_sizes={"train": 20, "val": 5})


# ------------------------------------------------------------------------------------- load errors
def test_load_errors(tmp_path, byte_dir):
    with pytest.raises(DataError, match="does not exist.*prepare_text.py"):
        load_meta(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no meta.json.*prepare_text.py"):
        open_split(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="no 'valid' split; it has \\['test', 'train', 'val'\\]"):
        open_split(byte_dir, "valid")
    prepare_splits(TEXT, tmp_path / "notest", "byte")
    with pytest.raises(DataError, match="no 'test' split.*--test-fraction"):
        open_split(tmp_path / "notest", "test")

    (byte_dir / "val.bin").write_bytes((byte_dir / "val.bin").read_bytes()[:-1])  # truncate
    with pytest.raises(DataError, match="truncated or corrupt.*--overwrite"):
        open_split(byte_dir, "val")
    (byte_dir / "test.bin").unlink()
    with pytest.raises(DataError, match="missing.*--overwrite"):
        open_split(byte_dir, "test")

    meta = json.loads((byte_dir / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] = 0
    (byte_dir / "train.bin").write_bytes(b"")
    (byte_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="empty"):
        open_split(byte_dir, "train")

    (byte_dir / "meta.json").write_text("{ broken")
    with pytest.raises(DataError, match="corrupt"):
        load_meta(byte_dir)
    (byte_dir / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a spikegpt dataset"):
        load_meta(byte_dir)


# ----------------------------------------------------------------------------------------- sampling
@pytest.fixture
def tokens() -> np.ndarray:
    return (np.arange(5000) % 251).astype(np.uint8)


def test_sample_batch_shapes_shift_and_windows(tokens):
    x, y = sample_batch(tokens, batch_size=6, ctx_len=32, seed=1, step=3)
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    offs = sample_offsets(len(tokens), 6, 32, seed=1, step=3)
    for i, o in enumerate(offs):
        assert torch.equal(x[i], torch.from_numpy(tokens[o:o + 32].astype(np.int64)))
        assert y[i, -1].item() == tokens[o + 32]


def test_sample_batch_determinism(tokens):
    a = sample_batch(tokens, 4, 16, seed=7, step=10, micro_step=1, rank=2)
    b = sample_batch(tokens, 4, 16, seed=7, step=10, micro_step=1, rank=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    base = sample_offsets(len(tokens), 8, 16, seed=7, step=10, micro_step=1, rank=2)
    expected = np.random.default_rng([7, 2, 10, 1]).integers(0, len(tokens) - 16 - 1, size=8, endpoint=True)
    assert np.array_equal(base, expected)
    for kw in ({"seed": 8}, {"step": 11}, {"micro_step": 0}, {"rank": 3}):
        args = dict(seed=7, step=10, micro_step=1, rank=2) | kw
        assert not np.array_equal(base, sample_offsets(len(tokens), 8, 16, **args)), kw


def test_sample_batch_bounds_and_memmap(tmp_path, byte_dir):
    t = np.arange(17, dtype=np.uint16)
    for step in range(20):  # n = ctx_len + 1: the only possible window
        x, y = sample_batch(t, 3, 16, seed=0, step=step)
        assert torch.equal(x, torch.arange(16).expand(3, 16)) and torch.equal(y, x + 1)
    offs = np.concatenate([sample_offsets(100, 64, 10, 0, s) for s in range(50)])
    assert offs.min() == 0 and offs.max() == 100 - 10 - 1  # both ends reachable, nothing beyond
    mm = open_split(byte_dir, "train")
    x, y = sample_batch(mm, 2, 8, seed=0, step=0)
    assert torch.equal(x, sample_batch(np.array(mm), 2, 8, 0, 0)[0])
    assert x.max() < 256


def test_sample_batch_ctx_too_long(tokens):
    with pytest.raises(DataError) as ei:
        sample_batch(tokens[:100], 2, 100, seed=0, step=0)
    msg = str(ei.value)
    assert "100 tokens" in msg and "101" in msg and "--ctx-len" in msg and "99" in msg
    with pytest.raises(ValueError, match="non-negative"):
        sample_batch(tokens, 2, 8, seed=-1, step=0)


# ------------------------------------------------------------------------------------------ enwik8
def _fake_enwik8(size: int, cut_at: int) -> bytes:
    """Valid UTF-8 wiki-like text of exactly ``size`` bytes; a 3-byte '€' occupies bytes
    ``cut_at - 1 .. cut_at + 1``, so a split at ``cut_at`` cuts it after its first byte."""
    unit = "<page><title>Foo</title> text ä ö “x” [[link]]\n".encode()
    body = unit * (size // len(unit) + 1)

    def fit(n: int) -> bytes:  # first n bytes, cut back to whole characters, padded with spaces
        b = body[:n].decode("utf-8", "ignore").encode()
        return b + b" " * (n - len(b))

    euro = "€".encode()
    out = fit(cut_at - 1) + euro + fit(size - cut_at - 2)
    out.decode("utf-8")
    assert len(out) == size and out[cut_at - 1:cut_at + 2] == euro
    return out


def test_prepare_enwik8_scaled_raw_and_zip(tmp_path, prepare_enwik8, capsys):
    size = 20_000  # splits 18000 / 1000 / 1000
    data = _fake_enwik8(size, cut_at=18_000)
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)
    zpath = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(raw, "enwik8")
    assert prepare_enwik8.enwik8_split_sizes() == {"train": 90_000_000, "val": 5_000_000, "test": 5_000_000}

    out_b = tmp_path / "b"
    assert prepare_enwik8.main(["--input", str(zpath), "--out", str(out_b), "--expected-size", str(size)]) == 0
    meta = load_meta(out_b)
    assert [(s["byte_offset"], s["bytes"], s["tokens"]) for s in meta["splits"].values()] == [
        (0, 18000, 18000), (18000, 1000, 1000), (19000, 1000, 1000)]
    assert b"".join(bytes(open_split(out_b, s)) for s in ("train", "val", "test")) == data

    out_c = tmp_path / "c"
    assert prepare_enwik8.main(["--input", str(raw), "--out", str(out_c), "--vocab", "char",
                                "--expected-size", str(size)]) == 0
    summary = capsys.readouterr().out
    assert "escaped bytes" in summary and "unknown" in summary
    meta = load_meta(out_c)
    s = meta["splits"]
    assert [x["bytes"] for x in s.values()] == [18000, 1000, 1000]
    # The euro sign is cut after its first byte: 1 escape at the end of train, 2 at the start of val.
    assert s["train"]["escaped_bytes"] == 1 and s["val"]["escaped_bytes"] == 2 and s["test"]["escaped_bytes"] == 0
    assert s["val"]["unknown"] == 2  # the two continuation-byte escapes are not in the train vocab
    tok = load_tokenizer(out_c)
    assert tok.decode_bytes(open_split(out_c, "train")) == data[:18000]
    assert tok.decode_bytes(open_split(out_c, "test")) == data[19000:]
    assert s["train"]["chars"] == len(data[:18000].decode("utf-8", "surrogateescape"))


def test_prepare_enwik8_errors(tmp_path, prepare_enwik8, capsys):
    raw = tmp_path / "enwik8"
    raw.write_bytes(b"x" * 1000)
    assert prepare_enwik8.main(["--input", str(raw), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "1,000 bytes" in err and "100,000,000" in err

    zpath = tmp_path / "other.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("enwik9", b"x" * 1000)
    assert prepare_enwik8.main(["--input", str(zpath), "--out", str(tmp_path / "o"), "--expected-size", "1000"]) == 2
    assert "without an 'enwik8' member" in capsys.readouterr().err

    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("enwik8", b"x" * 999)
    assert prepare_enwik8.main(["--input", str(zpath), "--out", str(tmp_path / "o"), "--expected-size", "1000"]) == 2
    assert "999 bytes" in capsys.readouterr().err

    assert prepare_enwik8.main(["--input", str(tmp_path / "missing.zip")]) == 2
    assert "not found" in capsys.readouterr().err


def test_prepare_enwik8_download_failure(tmp_path, prepare_enwik8, capsys):
    rc = prepare_enwik8.main(["--url", "http://127.0.0.1:9/enwik8.zip", "--timeout", "5",
                              "--download-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one clear line
    assert "could not download" in err and "--input" in err
    assert os.listdir(tmp_path) == []  # no partial download left behind


# ----------------------------------------------------------------------------------- default corpus
def test_default_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKEGPT_CACHE", str(tmp_path / "cache"))
    notes = []
    d = default_corpus_dir(log=notes.append)
    assert d.parent == tmp_path / "cache" and d.name.startswith("default-corpus-py3")
    assert len(notes) == 1 and "default corpus" in notes[0]
    assert os.listdir(tmp_path / "cache") == [d.name]  # no temporary directories left
    meta = check_dataset(d)
    assert meta["source"] == "python-stdlib-docstrings" and meta["vocab_kind"] == "byte"
    assert meta["corpus"]["docstrings"] > 300 and meta["corpus"]["python_version"].startswith("3.")
    train, val = (bytes(open_split(d, s)) for s in ("train", "val"))
    text = train + val
    assert 300_000 < len(text) <= DEFAULT_CORPUS_MAX_BYTES
    assert hashlib.sha256(text).hexdigest() == meta["corpus"]["text_sha256"]
    assert abs(len(val) - 0.1 * len(text)) <= 3
    text.decode("utf-8")
    # Cached: a second call (explicit cache_dir, same place) does not rebuild.
    assert default_corpus_dir(tmp_path / "cache", log=notes.append) == d and len(notes) == 1
    # Deterministic: the extraction gives the same bytes again (a capped prefix, to keep this fast).
    a, na = extract_stdlib_docstrings(max_bytes=150_000)
    b, nb = extract_stdlib_docstrings(max_bytes=150_000)
    assert a == b and na == nb > 10 and text.startswith(a.rstrip("\n").encode())
    # Prose rule: the docstrings look like English.
    letters = sum(c.isalpha() or c.isspace() for c in a)
    assert letters / len(a) > 0.8 and " the " in a


# ---------------------------------------------------------------------------------------------- bpe
@needs_neox
def test_prepare_bpe_matches_whole_text_encoding(tmp_path, monkeypatch, prepare_text):
    from spikegpt.tokenizer import BPETokenizer

    monkeypatch.setattr(text_mod, "_BPE_PIECE_CHARS", 97)  # force many pieces
    text = TEXT + "  spaced \n\n\n  lines\t\n" * 20 + "last<|endoftext|>Next doc\n"
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "bpe"
    assert prepare_text.main(["--input", str(src), "--out", str(out), "--vocab", "bpe",
                              "--tokenizer", str(NEOX_TOKENIZER)]) == 0
    meta = load_meta(out)
    assert meta["vocab_kind"] == "bpe" and meta["dtype"] == "uint16" and meta["vocab_size"] == 50277
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer)
    raw = text.encode()
    for name, s in meta["splits"].items():
        part = raw[s["byte_offset"]:s["byte_offset"] + s["bytes"]].decode()
        ids = open_split(out, name)
        assert ids.tolist() == tok.encode(part)
        assert tok.decode(ids) == part


# ------------------------------------------------------------------------- token ids beyond the vocabulary
def test_open_split_checks_token_ids_against_the_vocabulary(tmp_path):
    out = tmp_path / "char"
    meta = prepare_splits(TEXT, out, "char")
    vocab = meta["vocab_size"]
    assert vocab < 255 and meta["dtype"] == "uint8"  # the dtype can hold ids beyond the vocabulary
    for name, s in meta["splits"].items():  # stored at preparation time: opening reads no token
        assert s["max_id"] == int(np.fromfile(out / s["file"], dtype=np.uint8).max()) < vocab
    # A dataset prepared before max_id was stored still loads; its ids are checked by a max over the file.
    old = json.loads((out / "meta.json").read_text())
    for s in old["splits"].values():
        del s["max_id"]
    (out / "meta.json").write_text(json.dumps(old))
    check_dataset(out)
    raw = bytearray((out / "val.bin").read_bytes())
    raw[5] = 255
    (out / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"val\.bin holds token id 255 .*vocabulary.*--overwrite"):
        open_split(out, "val")
    open_split(out, "train")
    # With max_id stored: a meta.json whose vocabulary is smaller than the ids of its files.
    other = tmp_path / "other"
    meta = prepare_splits(TEXT, other, "char")
    meta["vocab_size"] = meta["splits"]["train"]["max_id"]
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"train\.bin holds token id"):
        open_split(other, "train")


# --------------------------------------------------------------- outputs never replace what is not theirs
def test_prepare_never_replaces_foreign_files_or_inputs(tmp_path, prepare_text, capsys):
    src = tmp_path / "in.txt"
    src.write_text(TEXT, encoding="utf-8")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.bin").write_bytes(b"precious")
    assert prepare_text.main(["--input", str(src), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "train.bin" in err and "--overwrite" in err
    assert (mine / "train.bin").read_bytes() == b"precious"
    assert prepare_text.main(["--input", str(src), "--out", str(mine), "--overwrite"]) == 0
    check_dataset(mine)
    # An input is never replaced, not even with --overwrite.
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "val.bin").write_text(TEXT, encoding="utf-8")
    capsys.readouterr()
    assert prepare_text.main(["--input", str(inside / "val.bin"), "--out", str(inside), "--overwrite"]) == 2
    assert "input" in capsys.readouterr().err
    assert (inside / "val.bin").read_text(encoding="utf-8") == TEXT and not (inside / "meta.json").exists()


# -------------------------------------------------------------------- user errors: one line, exit status 2
@pytest.mark.parametrize("script, argv, flag", [
    ("prepare_text", ["--input", "x", "--out", "y", "--val-fraction", "1.5"], "--val-fraction"),
    ("prepare_text", ["--input", "x", "--out", "y", "--test-fraction", "-0.1"], "--test-fraction"),
    ("prepare_text", ["--input", "x", "--out", "y", "--val-fraction", "nan"], "--val-fraction"),
    ("prepare_openwebtext2", ["--input", "x", "--out", "y", "--workers", "0"], "--workers"),
    ("prepare_openwebtext2", ["--input", "x", "--out", "y", "--shard-tokens", "-5"], "--shard-tokens"),
    ("prepare_openwebtext2", ["--input", "x", "--out", "y", "--val-fraction", "1"], "--val-fraction"),
    ("train_tokenizer", ["--input", "x", "--out", "y", "--vocab-size", "-1"], "--vocab-size"),
    ("train_tokenizer", ["--input", "x", "--out", "y", "--vocab-size", "300", "--min-frequency", "-2"],
     "--min-frequency"),
    ("prepare_enwik8", ["--expected-size", "0"], "--expected-size"),
    ("prepare_enwik8", ["--timeout", "-1"], "--timeout"),
])
def test_data_scripts_validate_numeric_flags_at_parse_time(script, argv, flag, capsys):
    with pytest.raises(SystemExit) as ei:
        _load_script(script).main(argv)
    assert ei.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument " + flag in last and "Traceback" not in last


def test_data_script_errors_end_in_one_line(tmp_path, prepare_text, capsys):
    src = tmp_path / "in.txt"
    src.write_text(TEXT, encoding="utf-8")
    # A file-system error (the output's parent is a file) is a user error too.
    assert prepare_text.main(["--input", str(src), "--out", str(src / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(src) in err
    proc = subprocess.run([sys.executable, str(REPO / "data" / "prepare_text.py"), "--input",
                           str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
