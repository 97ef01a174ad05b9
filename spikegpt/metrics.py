"""Converting a summed negative log-likelihood into per-token, per-word and per-byte figures.

An evaluation sums the cross-entropy (natural log) over the ``n_tokens`` tokens it predicted. The
average ``nll = total_nll_nats / n_tokens`` nats per token gives

* ``bits_per_token = nll / ln 2`` and ``token_ppl = exp(nll)`` (the paper's WikiText perplexity);
* per text unit ``u`` (bytes, chars, words) counted for the split in ``meta.json``:
  ``units_per_token = split["tokens"] / split[u]`` and

  - ``bits_per_byte = bits_per_token * tokens / bytes`` (the enwik8 "BPC" when the vocab is bytes),
  - ``bits_per_char = bits_per_token * tokens / chars``,
  - ``word_ppl = exp(nll * tokens / words)`` -- word-level perplexity, i.e. ``exp(total NLL / words)``
    when the whole split is evaluated.

The conversion uses rates: the mean NLL per predicted token times the split's token count. An evaluation
over a whole split of ``T`` tokens predicts ``T - 1`` of them (the first has no context), and one over a
prefix (``--max-tokens``) predicts fewer; the rate form treats the predicted tokens as representative of
the split, which is exact for a uniform model and off by at most a factor ``T / (T - 1)`` in the total
otherwise.

Word counts (``prepare_wikitext.py``): ``words`` = number of runs of non-whitespace in the raw text,
splitting on ASCII whitespace (Python ``bytes.split()``: space, ``\\t \\n \\r \\v \\f``); for the
WikiText raw release these are the tokens of the word-level release (its ``<unk>`` replaced by the
original word), without the ``<eos>`` that word-level models add per line. ``lines`` (newline count) is
stored too, so ``words + lines`` reproduces the ``<eos>``-inclusive count (e.g. AWD-LSTM's loader):
pass ``word_key="words_with_eos"`` to use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["unit_metrics", "count_words", "count_lines"]


def count_words(data: bytes) -> int:
    """Runs of non-whitespace, splitting on ASCII whitespace (``bytes.split()``)."""
    return len(data.split())


def count_lines(data: bytes) -> int:
    """Number of lines: newlines, plus one for a final line without a newline."""
    if not data:
        return 0
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def unit_metrics(total_nll_nats: float, n_tokens: int, split_meta: Mapping[str, Any] | None = None,
                 word_key: str = "words") -> dict[str, float]:
    """Per-token, per-byte, per-char and per-word figures from a summed NLL (see the module docstring).

    Args:
        total_nll_nats: sum of the cross-entropy (natural log) over the predicted tokens.
        n_tokens: number of predicted tokens.
        split_meta: the split's entry of ``meta["splits"]`` (``tokens`` and any of ``bytes``, ``chars``,
            ``words``/``lines``); ``None`` for token figures only.
        word_key: ``"words"`` (default) or ``"words_with_eos"`` (= words + lines).

    Returns:
        ``nll_per_token``, ``bits_per_token``, ``token_ppl``, and when the counts exist
        ``bits_per_byte``, ``bits_per_char``, ``word_ppl``, ``bits_per_word``, ``tokens_per_word``.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if word_key not in ("words", "words_with_eos"):
        raise ValueError(f"word_key must be 'words' or 'words_with_eos', got {word_key!r}")
    nll = total_nll_nats / n_tokens
    out: dict[str, float] = {
        "nll_per_token": nll,
        "bits_per_token": nll / math.log(2),
        "token_ppl": _exp(nll),
    }
    if not split_meta:
        return out
    tokens = split_meta.get("tokens")
    if not tokens:
        return out
    if split_meta.get("bytes"):
        out["bits_per_byte"] = out["bits_per_token"] * tokens / split_meta["bytes"]
    if split_meta.get("chars"):
        out["bits_per_char"] = out["bits_per_token"] * tokens / split_meta["chars"]
    words = split_meta.get("words")
    if words and word_key == "words_with_eos":
        words = words + int(split_meta.get("lines") or 0) if "lines" in split_meta else None
    if words:
        out["tokens_per_word"] = tokens / words
        out["bits_per_word"] = out["bits_per_token"] * tokens / words
        out["word_ppl"] = _exp(nll * tokens / words)
    return out


def _exp(x: float) -> float:
    """``exp(x)``, ``inf`` where it overflows (a diverged model's perplexity)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
