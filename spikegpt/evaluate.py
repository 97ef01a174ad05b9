"""Deterministic evaluation of a whole split: loss, bits per token, bits per byte / character.

The evaluator walks the split in consecutive windows of ``window`` tokens.  With ``carry_state``
(the default) the model's recurrent state flows from each window into the next, so every token is
predicted from everything before it in its stream (the model runs as the RNN it is); without it each
window starts from the zero state, as in training.  The split can be cut into ``streams`` contiguous
parts that are evaluated side by side as one batch: each part carries its own state, so the result
differs from ``streams=1`` only in that each part after the first starts from the zero state.

Every token after the first is predicted exactly once.  The unit conversions (bits per byte /
character, token and word perplexity) are :func:`spikegpt.metrics.unit_metrics`.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_tokens(model, tokens, window: int, carry_state: bool = True, streams: int = 1,
                    max_tokens: int | None = None, device=None, autocast=None, part=(0, 1)) -> dict:
    """Mean cross-entropy of ``model`` over the 1-D token array ``tokens`` (np.memmap or array).

    ``part = (rank, world)`` splits the work between processes: the split is cut into
    ``streams * world`` contiguous streams and this process evaluates its ``streams`` of them; sum
    ``nll_sum`` and ``predicted_tokens`` over the processes to combine.  Returns ``{"loss",
    "bits_per_token", "nll_sum", "predicted_tokens", "window", "streams", "carry_state"}``.
    """
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    rank, world = part
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {n}")
    predicted = n - 1
    total_streams = max(1, min(streams * world, predicted))
    per_stream = predicted // total_streams
    mine = [s for s in range(total_streams) if s * world // total_streams == rank]
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0

    def run(starts, length, state):
        nonlocal nll, count
        for t0 in range(0, length, window):
            t = min(window, length - t0)
            rows = np.stack([np.asarray(tokens[s + t0:s + t0 + t + 1], dtype=np.int64) for s in starts])
            chunk = torch.from_numpy(rows).to(device)
            with autocast():
                logits, new_state = model(chunk[:, :-1], state=state if carry_state else None,
                                          return_state=True)
            nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += chunk[:, 1:].numel()
            state = new_state
        return state

    state = run([s * per_stream for s in mine], per_stream, None) if mine else None
    leftover = predicted - total_streams * per_stream  # continues the last stream alone
    if leftover and total_streams - 1 in mine:
        run([total_streams * per_stream], leftover, state[:, :, -1:])
    model.train(was_training)
    loss = nll / max(count, 1)
    return {"loss": loss, "bits_per_token": loss / math.log(2), "nll_sum": nll, "predicted_tokens": count,
            "window": window, "streams": total_streams, "carry_state": carry_state}


def build_parser():
    from . import cli
    p = cli.new_parser("python -m spikegpt.evaluate", "Evaluate a checkpoint on a prepared split.")
    cli.add_model_args(p)
    p.add_argument("--data-dir", required=True, help="prepared dataset (data/prepare_*.py)")
    cli.add_split_arg(p, help="split to evaluate")
    p.add_argument("--window", type=cli.positive_int, default=None, help="tokens per forward pass (default: "
                   "the model's ctx_len); windows are consecutive and non-overlapping (stride = window)")
    p.add_argument("--carry-state", action=argparse.BooleanOptionalAction, default=True,
                   help="carry the recurrent state from window to window")
    p.add_argument("--streams", type=cli.positive_int, default=8, help="contiguous parts evaluated side by side")
    p.add_argument("--max-tokens", type=cli.positive_int, default=None, help="evaluate only the first N tokens")
    cli.add_device_arg(p)
    cli.add_kernels_arg(p)
    cli.add_threads_arg(p)
    cli.add_json_arg(p)
    return p


def run(args) -> dict:
    from . import cli
    from .data import load_meta, open_split
    from .metrics import unit_metrics

    device = cli.setup_runtime(args)
    model = cli.load_model(args, device, need_tokenizer=False)
    meta = load_meta(args.data_dir)
    cli.check_data_matches(model, meta, args.data_dir)
    split = args.split
    tokens = open_split(args.data_dir, split, meta, model.config.vocab_size)
    window = args.window or model.config.ctx_len
    start = time.perf_counter()
    if len(tokens) < 2:
        raise cli.UserError(f"the {split} split of {args.data_dir} has {len(tokens)} token(s); evaluating needs "
                            "at least 2: prepare more text")
    result = evaluate_tokens(model, tokens, window, args.carry_state, args.streams, args.max_tokens, device)
    result.update(unit_metrics(result["nll_sum"], result["predicted_tokens"], meta["splits"][split]))
    result.update(split=split, data_dir=str(args.data_dir),
                  vocab_kind=meta["vocab_kind"], seconds=time.perf_counter() - start,
                  context=("unbounded (state carried across windows)" if args.carry_state
                           else f"{window} tokens (state reset every window)"), stride=window)
    for key in ("loss", "bits_per_token", "bits_per_byte", "bits_per_char", "token_ppl", "word_ppl"):
        if key in result:
            print(f"{key:>17}: {result[key]:.4f}")
    print(f"{'tokens':>17}: {result['predicted_tokens']:,} of split {split!r} ({meta['vocab_kind']} vocab)")
    print(f"{'context':>17}: {result['context']}; window {window}, stride {window}, {result['streams']} streams")
    if args.json_out:
        cli.write_json(args.json_out, result)
    return result


def main(argv=None) -> int:
    """``python -m spikegpt.evaluate``: evaluate a checkpoint on a prepared split."""
    from .cli import run_cli
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
