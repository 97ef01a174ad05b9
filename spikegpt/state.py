"""The recurrent state of a SpikeGPT model (docs/model.md, "State").

A state is one fp32 tensor of shape ``(n_layer, N_STATE_SLOTS, B, C)`` (fp64 for an fp64 model); per
layer it holds the slots named here: the two token-shift vectors, the WKV numerator ``p``, denominator
``q`` and log-scale ``o``, and the two neuron membranes.  States are plain tensors: copy them,
concatenate along dim 2 to batch, move them between devices.
"""
from __future__ import annotations

import torch

# A large negative finite number for the WKV log-scale of an empty state: -inf - -inf would be NaN.
EMPTY_EXP = -1e38

ATT_SHIFT, FFN_SHIFT, WKV_P, WKV_Q, WKV_O, LIF_ATT, LIF_FFN = range(7)
N_STATE_SLOTS = 7


def empty_wkv_state(batch: int, channels: int, device=None):
    """The WKV state before the first token: ``p = q = 0``, ``o = EMPTY_EXP`` (fp32, shape (B, C))."""
    zeros = torch.zeros(batch, channels, dtype=torch.float32, device=device)
    return zeros, zeros.clone(), torch.full_like(zeros, EMPTY_EXP)


def initial_state(n_layer: int, batch_size: int, n_embd: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The state before the first token: zeros, with the WKV log-scale at ``EMPTY_EXP``."""
    state = torch.zeros(n_layer, N_STATE_SLOTS, batch_size, n_embd, dtype=dtype, device=device)
    state[:, WKV_O] = EMPTY_EXP
    return state


__all__ = ["ATT_SHIFT", "FFN_SHIFT", "WKV_P", "WKV_Q", "WKV_O", "LIF_ATT", "LIF_FFN", "N_STATE_SLOTS",
           "EMPTY_EXP", "empty_wkv_state", "initial_state"]
