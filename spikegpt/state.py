"""The recurrent state of a SpikeGPT model (docs/model.md, "State").

A state is one fp32 tensor of shape ``(n_layer, N_STATE_SLOTS, B, C)`` (fp64 for an fp64 model); per
layer it holds the slots named here: the two token-shift vectors, the WKV numerator ``p``, denominator
``q`` and log-scale ``o``, and the two neuron membranes.  States are plain tensors: copy them,
concatenate along dim 2 to batch, move them between devices.
"""
from __future__ import annotations

import torch

from .ops import EMPTY_EXP

ATT_SHIFT, FFN_SHIFT, WKV_P, WKV_Q, WKV_O, LIF_ATT, LIF_FFN = range(7)
N_STATE_SLOTS = 7


def initial_state(n_layer: int, batch_size: int, n_embd: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The state before the first token: zeros, with the WKV log-scale at ``ops.EMPTY_EXP``."""
    state = torch.zeros(n_layer, N_STATE_SLOTS, batch_size, n_embd, dtype=dtype, device=device)
    state[:, WKV_O] = EMPTY_EXP
    return state


__all__ = ["ATT_SHIFT", "FFN_SHIFT", "WKV_P", "WKV_Q", "WKV_O", "LIF_ATT", "LIF_FFN", "N_STATE_SLOTS",
           "initial_state"]
