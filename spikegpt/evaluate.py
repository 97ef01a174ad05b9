"""Deterministic evaluation of a whole split: loss, bits per token, bits per byte / character.

The evaluator walks the split in consecutive windows of ``window`` tokens.  With ``carry_state``
(the default) the model's recurrent state flows from each window into the next, so every token is
predicted from everything before it in its stream (the model runs as the RNN it is); without it each
window starts from the zero state, as in training.  The split can be cut into ``streams`` contiguous
parts that are evaluated side by side as one batch: each part carries its own state, so the result
differs from ``streams=1`` only in that each part after the first starts from the zero state.

Every token after the first is predicted exactly once.  Conversions: ``bits_per_token = loss / ln 2``;
``bits_per_byte = bits_per_token * tokens / bytes`` (bytes of the UTF-8 text of the evaluated
tokens; for a byte vocabulary the two are equal); likewise ``bits_per_char`` with characters.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_tokens(model, tokens, window: int, carry_state: bool = True, streams: int = 1,
                    max_tokens: int | None = None, device=None, autocast=None) -> dict:
    """Mean cross-entropy of ``model`` over the 1-D token array ``tokens`` (np.memmap or array).

    Returns ``{"loss", "bits_per_token", "predicted_tokens", "window", "streams", "carry_state"}``.
    """
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {n}")
    predicted = n - 1
    streams = max(1, min(streams, predicted))
    per_stream = predicted // streams
    was_training = model.training
    model.eval()
    total = 0.0

    def run(starts, length, state):
        nonlocal total
        for t0 in range(0, length, window):
            t = min(window, length - t0)
            rows = np.stack([np.asarray(tokens[s + t0:s + t0 + t + 1], dtype=np.int64) for s in starts])
            chunk = torch.from_numpy(rows).to(device)
            with autocast():
                logits, new_state = model(chunk[:, :-1], state=state if carry_state else None,
                                          return_state=True)
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()
            state = new_state
        return state

    starts = [s * per_stream for s in range(streams)]
    state = run(starts, per_stream, None)
    leftover = predicted - streams * per_stream  # continues the last stream alone
    if leftover:
        run([streams * per_stream], leftover, state[:, :, -1:] if state is not None else None)
    model.train(was_training)
    loss = total / predicted
    return {"loss": loss, "bits_per_token": loss / math.log(2), "predicted_tokens": predicted,
            "window": window, "streams": streams, "carry_state": carry_state}


def add_unit_rates(result: dict, split_meta: dict) -> dict:
    """Add bits per byte (and per character when known) from the split's token/byte/char counts:
    ``bits_per_byte = bits_per_token * tokens / bytes`` (equal for a byte vocabulary)."""
    tokens = split_meta.get("tokens")
    for unit, key in (("bytes", "bits_per_byte"), ("chars", "bits_per_char")):
        if tokens and split_meta.get(unit):
            result[key] = result["bits_per_token"] * tokens / split_meta[unit]
    return result
