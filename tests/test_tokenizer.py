"""Tests for spikegpt.tokenizer: round trips, serialisation, unknown-character handling, BPE."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from spikegpt.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_dict

REPO = Path(__file__).resolve().parent.parent
NEOX_TOKENIZER = REPO.parent / "shared" / "reference" / "20B_tokenizer.json"
needs_neox = pytest.mark.skipif(not NEOX_TOKENIZER.is_file(), reason="../shared not present (user clone)")

SAMPLE = "Hello, world!\n\n  Indented line\twith tab.\nnaïve café — “quotes” 日本語 😀 <|endoftext|> end\n"


def _json_roundtrip(tok):
    """to_dict -> JSON text -> tokenizer_from_dict, as a checkpoint or meta.json would do."""
    return tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))


# -------------------------------------------------------------------------------------------- byte
def test_byte_roundtrip_and_serialisation():
    tok = ByteTokenizer()
    assert tok.kind == "byte" and tok.vocab_size == 256 and tok.eot_id is None
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode_bytes(ids) == SAMPLE.encode("utf-8")
    assert np.array_equal(tok.encode_array(SAMPLE), np.frombuffer(SAMPLE.encode(), dtype=np.uint8))
    restored = _json_roundtrip(tok)
    assert isinstance(restored, ByteTokenizer) and restored == tok


def test_byte_decode_invalid_utf8_and_id_types():
    tok = ByteTokenizer()
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # truncated multibyte char: replaced, no exception
    assert tok.decode_bytes([0xE6, 0x97]) == b"\xe6\x97"
    assert tok.decode(np.array([104, 105], dtype=np.uint8)) == "hi"
    assert tok.decode(torch.tensor([104, 105])) == "hi"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])


# -------------------------------------------------------------------------------------------- char
def test_char_from_text_vocab_and_roundtrip():
    tok = CharTokenizer.from_text(SAMPLE)
    chars = sorted(set(SAMPLE))
    assert tok.kind == "char" and tok.eot_id is None
    assert tok.chars == chars
    assert tok.vocab_size == len(chars) + 1
    assert tok.unk_id == tok.vocab_size - 1  # the unknown id is the LAST id
    ids = tok.encode(SAMPLE)
    assert ids == [chars.index(c) for c in SAMPLE]
    assert tok.decode(ids) == SAMPLE
    long_text = SAMPLE * 200  # vectorised path
    assert tok.encode(long_text) == tok.encode_array(long_text).tolist() == ids * 200
    assert tok.decode(tok.encode(long_text)) == long_text


def test_char_without_unk():
    tok = CharTokenizer.from_text("abc", add_unk=False)
    assert tok.vocab_size == 3 and tok.unk_id is None
    with pytest.raises(ValueError, match="no unknown id"):
        tok.encode("abd", errors="unk")


def test_char_unknown_strict_error_names_characters_and_fix():
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(ValueError) as ei:
        tok.encode("héllo wörld!")
    msg = str(ei.value)
    assert "'é'" in msg and "'ö'" in msg and "'!'" in msg
    assert "errors='unk'" in msg
    with pytest.raises(ValueError, match="'é'"):
        tok.encode_array("héllo" * 2000)


def test_char_unknown_maps_to_last_id():
    tok = CharTokenizer.from_text("hello world")
    ids = tok.encode("héllo!", errors="unk")
    assert ids[1] == ids[5] == tok.unk_id == tok.vocab_size - 1
    assert tok.decode(ids) == "h\ufffdllo\ufffd"
    assert tok.count_unknown("héllo!") == 2
    assert tok.encode_array("héllo!" * 1000, errors="unk").tolist() == ids * 1000
    with pytest.raises(ValueError, match="errors must be"):
        tok.encode("x", errors="ignore")


def test_char_serialisation_roundtrip():
    tok = CharTokenizer(["b", "a", "\u00e9", "\U0001F600"], unk="?")
    restored = _json_roundtrip(tok)
    assert isinstance(restored, CharTokenizer)
    assert restored == tok and restored.chars == ["b", "a", "\u00e9", "\U0001F600"] and restored.unk_id == 4
    assert restored.encode("ab\U0001F600x", errors="unk") == [1, 0, 3, 4]
    assert restored.decode([4]) == "?"


def test_char_surrogate_escapes_recombine():
    # A multibyte character cut into escape characters (as the data layer does at split boundaries).
    raw = "é".encode()  # b"\xc3\xa9"
    escaped = "".join(chr(0xDC00 + b) for b in raw)  # what b"\xc3" | b"\xa9" decode to, split apart
    assert escaped == raw[:1].decode("utf-8", "surrogateescape") + raw[1:].decode("utf-8", "surrogateescape")
    tok = CharTokenizer.from_text("ab" + escaped)
    restored = _json_roundtrip(tok)  # lone surrogates survive JSON
    ids = restored.encode("a" + escaped + "b")
    assert restored.decode_bytes(ids) == b"a\xc3\xa9b"
    assert restored.decode(ids) == "aéb"
    assert restored.decode(restored.encode(escaped[:1])) == "\ufffd"  # alone: not valid UTF-8


def test_char_constructor_validation():
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(ValueError, match="out of range"):
        CharTokenizer(["a"]).decode([1])


def test_tokenizer_from_dict_errors():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "wordpiece"})
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_from_dict({"kind": "char", "chars": ["a", "b"], "unk": None, "vocab_size": 5})
    with pytest.raises(ValueError, match="missing the field 'chars'"):
        tokenizer_from_dict({"kind": "char"})
    with pytest.raises(ValueError, match="not a tokenizer"):
        tokenizer_from_dict({"vocab_size": 3})


# --------------------------------------------------------------------------------------------- bpe
@pytest.fixture(scope="module")
def neox() -> BPETokenizer:
    if not NEOX_TOKENIZER.is_file():
        pytest.skip("../shared not present (user clone)")
    return BPETokenizer(NEOX_TOKENIZER)


@needs_neox
def test_bpe_neox_basics(neox):
    assert neox.kind == "bpe"
    assert neox.vocab_size == 50277
    assert neox.eot_id == 0
    ids = neox.encode(SAMPLE)
    assert ids.count(neox.eot_id) == 1  # the literal special token is recognised
    assert neox.decode(ids) == SAMPLE
    assert neox.decode(np.asarray(ids, dtype=np.uint16)) == SAMPLE
    assert neox.encode_array(SAMPLE).tolist() == ids
    assert neox.encode_batch([SAMPLE, "x"]) == [ids, neox.encode("x")]
    # Wide range of code points. GPT-NeoX normalises to NFC, so NFC text round-trips exactly and other
    # text comes back NFC-normalised.
    text = "".join(chr(c) for c in range(32, 0x3000, 7))
    nfc = unicodedata.normalize("NFC", text)
    assert nfc != text
    assert neox.decode(neox.encode(nfc)) == nfc
    assert neox.decode(neox.encode("cafe\u0301")) == "caf\u00e9"
    with pytest.raises(ValueError, match="out of range"):
        neox.decode([50277])


@needs_neox
def test_bpe_to_dict_self_contained(neox):
    d = neox.to_dict()
    assert d["kind"] == "bpe" and d["vocab_size"] == 50277 and len(d["sha256"]) == 64
    assert d["json"] == NEOX_TOKENIZER.read_text(encoding="utf-8")
    restored = _json_roundtrip(neox)
    assert isinstance(restored, BPETokenizer) and restored == neox
    assert restored.encode(SAMPLE) == neox.encode(SAMPLE)
    assert BPETokenizer.from_json(d["json"]).sha256 == neox.sha256
    assert BPETokenizer.from_file(NEOX_TOKENIZER).sha256 == neox.sha256
    bad = dict(d, sha256="0" * 64)
    with pytest.raises(ValueError, match="corrupted"):
        tokenizer_from_dict(bad)


def test_bpe_small_inline_tokenizer_and_missing_file(tmp_path):
    """A tiny byte-level BPE built in-process: works without ../shared, eot_id None without the token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator([SAMPLE * 5], trainer=trainer)
    tok = BPETokenizer.from_json(hf.to_str())
    assert tok.eot_id is None and tok.vocab_size == hf.get_vocab_size()
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert _json_roundtrip(tok) == tok
    with pytest.raises(FileNotFoundError):
        BPETokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        BPETokenizer.from_json("{not json")
