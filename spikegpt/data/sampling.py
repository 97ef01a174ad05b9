"""Training windows: stateless, reproducible random batches (``docs/data.md``, "Sampling").

The batch for ``(seed, rank, step, micro_step)`` is always the same, whatever happened before, so
resuming a run needs no data-loader state.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .format import DataError

__all__ = ["sample_offsets", "sample_batch"]


def _check_nonneg_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


def sample_offsets(n_tokens: int, batch_size: int, ctx_len: int, seed: int, step: int, micro_step: int = 0,
                   rank: int = 0) -> np.ndarray:
    """Window start offsets used by :func:`sample_batch` (int64, shape ``(batch_size,)``).

    Offsets are drawn from ``np.random.default_rng([seed, rank, step, micro_step])`` uniformly in
    ``[0, n_tokens - ctx_len - 1]`` (inclusive), so every window of ``ctx_len + 1`` tokens fits.
    """
    seed, step = _check_nonneg_int("seed", seed), _check_nonneg_int("step", step)
    micro_step, rank = _check_nonneg_int("micro_step", micro_step), _check_nonneg_int("rank", rank)
    if _check_nonneg_int("batch_size", batch_size) < 1 or _check_nonneg_int("ctx_len", ctx_len) < 1:
        raise ValueError(f"batch_size and ctx_len must be >= 1, got {batch_size} and {ctx_len}")
    if n_tokens < ctx_len + 1:
        raise DataError(
            f"the split has {n_tokens:,} tokens, fewer than ctx_len + 1 = {ctx_len + 1:,} needed for one "
            f"training window; use a smaller --ctx-len (at most {max(n_tokens - 1, 0):,}) or more data"
        )
    rng = np.random.default_rng([seed, rank, step, micro_step])
    return rng.integers(0, n_tokens - ctx_len - 1, size=batch_size, endpoint=True, dtype=np.int64)


def sample_batch(tokens: Any, batch_size: int, ctx_len: int, seed: int, step: int, micro_step: int = 0,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible random training batch ``(x, y)``: int64 CPU tensors of shape ``(batch_size, ctx_len)``.

    Stateless: the result depends only on the arguments (and the data). Row ``i`` is
    ``x[i] = tokens[o_i : o_i + ctx_len]``, ``y[i] = tokens[o_i + 1 : o_i + ctx_len + 1]`` with the
    offsets of :func:`sample_offsets`. Different ``rank``/``step``/``micro_step`` give independent
    offsets. Only the windows are read from the memmap.

    Args:
        tokens: a 1-D token array, memmap, :class:`~spikegpt.data.ShardedTokens` or tensor.

    Raises:
        DataError: the split has fewer than ``ctx_len + 1`` tokens.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    offsets = sample_offsets(len(tokens), batch_size, ctx_len, seed, step, micro_step, rank)
    buf = np.empty((batch_size, ctx_len + 1), dtype=np.int64)
    for i, o in enumerate(offsets.tolist()):
        buf[i] = tokens[o:o + ctx_len + 1]
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
