"""Tokenizers for SpikeGPT: raw bytes, Unicode characters and byte-level BPE.

Every tokenizer offers the same small interface:

* ``kind``        -- ``"byte"``, ``"char"`` or ``"bpe"``;
* ``vocab_size``  -- number of ids (ids are ``0 .. vocab_size - 1``);
* ``eot_id``      -- id of ``<|endoftext|>`` when the vocabulary has one, else ``None``;
* ``encode(text) -> list[int]`` and ``decode(ids) -> str``;
* ``encode_array(text) -> np.ndarray`` -- the same ids as a numpy array (vectorised where possible,
  used by the data preparation scripts on large corpora);
* ``to_dict() -> dict`` -- a JSON-serialisable, fully self-contained description. A checkpoint or a
  prepared dataset stores it, and :func:`tokenizer_from_dict` rebuilds an identical tokenizer from it
  without any other file.

Tokenizers:

:class:`ByteTokenizer`
    256 ids, one per UTF-8 byte. ``decode`` replaces invalid UTF-8 with U+FFFD; ``decode_bytes`` returns
    the exact bytes.
:class:`CharTokenizer`
    One id per Unicode character (code point) of a training text, in the order given (``from_text``
    sorts them by code point), optionally followed by ONE unknown id -- always the last id,
    ``vocab_size - 1`` -- that characters outside the vocabulary map to when encoding with
    ``errors="unk"``.
:class:`BPETokenizer`
    Wraps a Hugging Face ``tokenizers`` ``tokenizer.json`` (e.g. the GPT-NeoX 20B tokenizer). The whole
    JSON text is embedded in ``to_dict()`` together with its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "tokenizer_from_dict",
    "train_bpe",
    "EOT_TOKEN",
]

#: The end-of-text marker used by GPT-2 / GPT-NeoX style vocabularies.
EOT_TOKEN = "<|endoftext|>"

#: Version of the ``to_dict`` layout; bump on incompatible changes.
_DICT_VERSION = 1


def _as_id_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    """Normalise token ids (list, tuple, numpy array, 1-D torch tensor) to a list of Python ints."""
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    tolist = getattr(ids, "tolist", None)  # torch.Tensor without importing torch
    if tolist is not None:
        out = tolist()
        return out if isinstance(out, list) else [out]
    return [int(i) for i in ids]


class Tokenizer(ABC):
    """Common interface; see the module docstring."""

    kind: str = ""
    vocab_size: int = 0
    eot_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encode ``text`` into a list of token ids."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids into text."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable, self-contained description (see :func:`tokenizer_from_dict`)."""

    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` into a 1-D integer numpy array (same ids as :meth:`encode`)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is out of range for this {self.kind} tokenizer "
                    f"(vocab_size {self.vocab_size}); was the model trained with a different vocabulary?"
                )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


# --------------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------------
class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte (vocab 256).

    ``encode`` uses UTF-8 with ``surrogateescape``, so a string obtained by decoding arbitrary bytes
    with ``errors="surrogateescape"`` encodes back to exactly those bytes. ``decode`` uses
    ``errors="replace"``; use :meth:`decode_bytes` for the exact bytes.
    """

    kind = "byte"
    vocab_size = 256
    eot_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogateescape"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8).copy()

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Return the raw bytes the ids stand for."""
        ids = _as_id_list(ids)
        try:
            return bytes(ids)
        except ValueError:
            self._check_ids(ids)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "byte", "version": _DICT_VERSION, "vocab_size": 256}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


# --------------------------------------------------------------------------------------------------
# Characters
# --------------------------------------------------------------------------------------------------
class CharTokenizer(Tokenizer):
    """One token per Unicode character (code point).

    Args:
        chars: the vocabulary, one single-code-point string per id, no duplicates. Id ``i`` is
            ``chars[i]``. :meth:`from_text` builds it sorted by code point.
        unk: ``None`` for a closed vocabulary, or the string that the extra unknown id decodes to
            (conventionally U+FFFD). When given, the unknown id is ``len(chars)`` -- the LAST id -- and
            ``vocab_size == len(chars) + 1``. ``unk`` may coincide with a vocabulary character; encoding
            that character still gives its own id.

    Encoding with ``errors="strict"`` (the default) raises :class:`ValueError` naming the characters
    that are not in the vocabulary; ``errors="unk"`` maps them to :attr:`unk_id` (a ``ValueError`` if
    the tokenizer has no unknown id).

    Strings may contain lone surrogates U+DC80..U+DCFF: the data layer uses them (Python's
    ``surrogateescape``) for bytes that are not valid UTF-8, e.g. a multibyte character cut by a split
    boundary. :meth:`decode_bytes` turns them back into the original bytes, and :meth:`decode` returns
    text in which they are recombined where possible and otherwise replaced by U+FFFD, so its result can
    always be printed.
    """

    kind = "char"
    eot_id = None

    def __init__(self, chars: Sequence[str], unk: str | None = None):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer vocabulary entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            seen: set[str] = set()
            dups = [c for c in chars if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
            raise ValueError(f"CharTokenizer vocabulary has duplicate characters: {dups[:5]!r}")
        if unk is not None and not isinstance(unk, str):
            raise TypeError(f"unk must be a string or None, got {type(unk).__name__}")
        self.chars: list[str] = chars
        self.unk: str | None = unk
        self.unk_id: int | None = len(chars) if unk is not None else None
        self.vocab_size = len(chars) + (1 if unk is not None else 0)
        self._stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}
        self._itos: list[str] = chars + ([unk] if unk is not None else [])
        self._table: np.ndarray | None = None  # code point -> id lookup, built lazily

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, add_unk: bool = True, unk: str = "\ufffd") -> CharTokenizer:
        """Vocabulary = the sorted unique characters of ``text`` (+ the unknown id when ``add_unk``)."""
        return cls(sorted(set(text)), unk=unk if add_unk else None)

    @classmethod
    def from_codepoint_counts(cls, counts: np.ndarray, add_unk: bool = True, unk: str = "\ufffd") -> CharTokenizer:
        """Vocabulary = code points with a non-zero count in ``counts`` (indexed by code point), sorted."""
        cps = np.flatnonzero(np.asarray(counts))
        return cls([chr(int(c)) for c in cps], unk=unk if add_unk else None)

    # -- encoding -----------------------------------------------------------------------------------
    def _lookup_table(self) -> np.ndarray:
        """Dense code point -> id table (-1 = not in vocab); the last slot catches larger code points."""
        if self._table is None:
            max_cp = max((ord(c) for c in self.chars), default=0)
            table = np.full(max_cp + 2, -1, dtype=np.int64)
            for i, c in enumerate(self.chars):
                table[ord(c)] = i
            self._table = table
        return self._table

    def _unknown_error(self, unknown: Iterable[str]) -> ValueError:
        uniq = sorted(set(unknown))
        shown = ", ".join(repr(c) for c in uniq[:8]) + (", ..." if len(uniq) > 8 else "")
        if self.unk_id is None:
            fix = ("this tokenizer has no unknown id; rebuild the vocabulary from text that contains "
                   "these characters (or with add_unk=True and encode with errors='unk')")
        else:
            fix = f"pass errors='unk' to map them to the unknown id {self.unk_id}"
        return ValueError(f"{len(uniq)} character(s) not in the {self.vocab_size}-symbol char vocabulary: "
                          f"{shown}; {fix}")

    def encode_array(self, text: str, errors: str = "strict") -> np.ndarray:
        """Vectorised :meth:`encode` (for long texts); returns an int64 array."""
        if errors not in ("strict", "unk"):
            raise ValueError(f"errors must be 'strict' or 'unk', got {errors!r}")
        if not text:
            return np.zeros(0, dtype=np.int64)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        table = self._lookup_table()
        ids = table[np.minimum(cps, len(table) - 1)]
        missing = ids < 0
        if missing.any():
            if errors == "strict" or self.unk_id is None:
                bad = [chr(int(c)) for c in np.unique(cps[missing])]
                raise self._unknown_error(bad)
            ids[missing] = self.unk_id
        return ids

    def encode(self, text: str, errors: str = "strict") -> list[int]:
        """Encode ``text``; ``errors`` is ``"strict"`` (raise on unknown characters) or ``"unk"``."""
        if errors not in ("strict", "unk"):
            raise ValueError(f"errors must be 'strict' or 'unk', got {errors!r}")
        if len(text) > 4096:
            return self.encode_array(text, errors=errors).tolist()
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            if errors == "strict" or self.unk_id is None:
                raise self._unknown_error(c for c in text if c not in stoi) from None
            unk_id = self.unk_id
            return [stoi.get(c, unk_id) for c in text]

    def count_unknown(self, text: str) -> int:
        """Number of characters of ``text`` that are not in the vocabulary."""
        if not text:
            return 0
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        table = self._lookup_table()
        return int((table[np.minimum(cps, len(table) - 1)] < 0).sum())

    # -- decoding -----------------------------------------------------------------------------------
    def _join(self, ids: Iterable[int]) -> str:
        ids = _as_id_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            self._check_ids(ids)
        itos = self._itos
        return "".join([itos[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        s = self._join(ids)
        if not any("\ud800" <= c <= "\udfff" for c in s):
            return s
        # Surrogate escapes stand for raw bytes: recombine them, replacing what is not valid UTF-8.
        return s.encode("utf-8", "surrogatepass" if _has_non_escape_surrogates(s) else "surrogateescape") \
            .decode("utf-8", "replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """UTF-8 bytes of the decoded text, with surrogate escapes turned back into their raw bytes."""
        s = self._join(ids)
        try:
            return s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return s.encode("utf-8", "surrogatepass")

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "char",
            "version": _DICT_VERSION,
            "vocab_size": self.vocab_size,
            "chars": list(self.chars),
            "unk": self.unk,
            "unk_id": self.unk_id,
        }

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk_id={self.unk_id})"


def _has_non_escape_surrogates(s: str) -> bool:
    """True if ``s`` has surrogates outside U+DC80..U+DCFF (which ``surrogateescape`` cannot encode)."""
    return any(("\ud800" <= c <= "\udfff") and not ("\udc80" <= c <= "\udcff") for c in s)


# --------------------------------------------------------------------------------------------------
# Byte-level BPE (Hugging Face tokenizers)
# --------------------------------------------------------------------------------------------------
class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer, e.g. the GPT-NeoX ``20B_tokenizer.json`` (vocab 50277).

    Args:
        source: path to a ``tokenizer.json`` file, or the JSON text itself (a string starting with
            ``{``).

    ``encode`` does not add the post-processor's special tokens (language-model training wants the
    raw stream); special tokens written literally in the text (``<|endoftext|>``) are recognised.
    ``decode`` keeps special tokens, so ``decode(encode(text)) == text`` for byte-level BPE vocabularies
    whenever the tokenizer's normaliser leaves ``text`` unchanged (GPT-NeoX applies NFC normalisation:
    text that is not in NFC comes back NFC-normalised).

    ``vocab_size`` includes added tokens (GPT-NeoX: 50254 BPE tokens + 23 added tokens = 50277).
    """

    kind = "bpe"

    def __init__(self, source: str | os.PathLike[str]):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("BPETokenizer needs the 'tokenizers' package: pip install tokenizers") from e

        if isinstance(source, os.PathLike) or not str(source).lstrip().startswith("{"):
            json_str = _read_tokenizer_file(source)
        else:
            json_str = str(source)
        try:
            self._tok = _HFTokenizer.from_str(json_str)
        except Exception as e:
            raise ValueError(f"not a valid tokenizers JSON ({e})") from e
        self.json_str: str = json_str
        self.sha256: str = hashlib.sha256(json_str.encode("utf-8")).hexdigest()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eot_id = self._tok.token_to_id(EOT_TOKEN)
        self.unk_id: int | None = self._find_unk_id()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load from a ``tokenizer.json`` path."""
        return cls(_read_tokenizer_file(path))

    @classmethod
    def from_json(cls, json_str: str) -> BPETokenizer:
        """Load from the JSON text of a ``tokenizer.json``."""
        return cls(json_str)

    def _find_unk_id(self) -> int | None:
        try:
            model = json.loads(self.json_str).get("model", {})
        except ValueError:
            return None
        unk = model.get("unk_token") if isinstance(model, dict) else None
        return self._tok.token_to_id(unk) if unk else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(unescape_bytes(text), add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several independent texts (in parallel, inside ``tokenizers``)."""
        return [e.ids for e in self._tok.encode_batch([unescape_bytes(t) for t in texts], add_special_tokens=False)]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_id_list(ids)
        self._check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "bpe",
            "version": _DICT_VERSION,
            "vocab_size": self.vocab_size,
            "sha256": self.sha256,
            "json": self.json_str,
        }

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, sha256={self.sha256[:12]}...)"


_ESCAPES = {c: chr(c - 0xDC00) for c in range(0xDC80, 0xDD00)}
_ESCAPE = re.compile("[\udc80-\udcff]")


def unescape_bytes(text: str) -> str:
    """``text`` with each surrogate escape U+DC80..U+DCFF (a byte that is not UTF-8, as the data layer
    reads it) replaced by the Latin-1 character of that byte: ``tokenizers`` takes valid strings only,
    and a Latin-1 file (e.g. rt-polarity.all) then tokenizes as the text it is.  Such text does not
    decode back to its raw bytes."""
    return text.translate(_ESCAPES) if _ESCAPE.search(text) else text


def _read_tokenizer_file(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    with open(p, encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------------------
def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_dict` output (e.g. from a checkpoint or meta.json).

    Raises:
        ValueError: unknown kind, unsupported version, a missing field, a BPE JSON whose sha256 does not
            match (corrupted), or a vocab size that disagrees with the stored one.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"not a tokenizer description (expected a dict with a 'kind' key): {str(d)[:200]}")
    kind = d["kind"]
    version = d.get("version", _DICT_VERSION)
    if version > _DICT_VERSION:
        raise ValueError(f"tokenizer description version {version} is newer than this spikegpt "
                         f"(supports {_DICT_VERSION}); upgrade spikegpt")
    try:
        if kind == "byte":
            tok: Tokenizer = ByteTokenizer()
        elif kind == "char":
            tok = CharTokenizer(d["chars"], unk=d.get("unk"))
        elif kind == "bpe":
            json_str = d["json"]
            sha = hashlib.sha256(json_str.encode("utf-8")).hexdigest()
            if d.get("sha256") not in (None, sha):
                raise ValueError(f"embedded BPE tokenizer JSON is corrupted: sha256 {sha} != recorded {d['sha256']}")
            tok = BPETokenizer.from_json(json_str)
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'byte', 'char' or 'bpe')")
    except KeyError as e:
        raise ValueError(f"{kind} tokenizer description is missing the field {e.args[0]!r}") from None
    if "vocab_size" in d and int(d["vocab_size"]) != tok.vocab_size:
        raise ValueError(f"{kind} tokenizer description says vocab_size {d['vocab_size']} but rebuilds "
                         f"with {tok.vocab_size}")
    return tok


# --------------------------------------------------------------------------------------------------
# Training a byte-level BPE
# --------------------------------------------------------------------------------------------------
def train_bpe(texts: Iterable[str] | Iterator[str], vocab_size: int, *, min_frequency: int = 2,
              special_tokens: Sequence[str] = (EOT_TOKEN,)) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 / GPT-NeoX style) on ``texts`` with the ``tokenizers`` library.

    The model has the 256 byte symbols as its initial alphabet (every text is encodable, no unknown
    token), GPT-2's byte-level pre-tokenizer (``add_prefix_space=False``), no normaliser, and the
    ``special_tokens`` first: ``<|endoftext|>`` (the default's only entry) is id 0. ``vocab_size``
    counts special tokens, bytes and merges. Training is deterministic for the same texts in the same
    order: ``tokenizers`` breaks ties between equally frequent pairs by the pair itself, and counts are
    exact. Done in-process (``tokenizers`` may use several threads).

    Raises:
        ValueError: ``vocab_size`` smaller than the special tokens + 256 bytes.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    special_tokens = list(dict.fromkeys(special_tokens))
    if vocab_size < len(special_tokens) + 256:
        raise ValueError(f"vocab_size must be at least {len(special_tokens) + 256} (special tokens + 256 bytes), "
                         f"got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((unescape_bytes(t) for t in texts), trainer=trainer)
    return BPETokenizer.from_json(tok.to_str())
