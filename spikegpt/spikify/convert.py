"""Converting a trained model: calibrate, rank channels, configure every linear layer's spike encoding,
optionally fine-tune the thresholds; and the converted checkpoint.

``spikify(model, calib, cfg)`` configures ``model`` in place (see :mod:`.encoding` for the encoding,
:mod:`.saliency` for the scores).  The converted checkpoint is an ordinary checkpoint: the encodings
are buffers of the state dict (``*.encoder.{salient,steps,qmax,lo,delta}``), which
``spikegpt.load`` re-creates, and the conversion settings are recorded as plain data under the
checkpoint's ``spikify`` key.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .encoding import SpikifyConfig
from .saliency import calibrate, linear_layers, saliency, salient_mask

__all__ = ["is_converted", "calibration_batches", "configure", "clear", "spikify", "finetune_thresholds",
           "save_converted", "recording_input_spikes", "input_spike_rows", "input_spike_stats", "MIN_CALIB_TOKENS"]

MIN_CALIB_TOKENS = 256  # fewer tokens do not give a usable per-channel range or ranking


def is_converted(model) -> bool:
    return any(lin.encoder.active for _, lin in linear_layers(model))


def calibration_batches(tokens, n_tokens: int, ctx_len: int, batch_size: int = 16) -> list:
    """``ceil(n_tokens / ctx_len)`` windows of ``ctx_len + 1`` tokens (inputs and targets) spread
    evenly over ``tokens`` (a 1-D array: the train split), as LongTensor batches of ``batch_size``."""
    n_seq = -(-n_tokens // ctx_len)
    if n_seq * ctx_len + 1 > len(tokens):
        raise ValueError(f"{n_tokens} calibration tokens need a split of at least {n_seq * ctx_len + 1} "
                         f"tokens; it has {len(tokens)}")
    starts = np.linspace(0, len(tokens) - ctx_len - 1, n_seq).astype(np.int64)
    rows = np.stack([np.asarray(tokens[s:s + ctx_len + 1], dtype=np.int64) for s in starts])
    return [torch.from_numpy(rows[i:i + batch_size]) for i in range(0, n_seq, batch_size)]


def clear(model) -> None:
    """Back to the unconverted model (every encoder the identity)."""
    for _, lin in linear_layers(model):
        lin.encoder.clear()


def configure(model, stats: dict, cfg: SpikifyConfig) -> dict:
    """Set every linear layer's encoding from calibration ``stats`` (:func:`.saliency.calibrate`) as
    ``cfg`` says; returns ``{name: salient channel indices}``."""
    chosen = {}
    for i, (name, lin) in enumerate(linear_layers(model)):
        st = stats[name]
        mask = salient_mask(saliency(st, cfg.saliency, seed=cfg.seed * 1000 + i), cfg.salient_frac)
        device = lin.weight.device
        ranges = dict(lo=st.lo.to(device), hi=st.hi.to(device)) if cfg.encoding == "channel-static" else {}
        lin.encoder.configure(mask.to(device), cfg.bits, cfg.extra_steps, cfg.salient_full_precision, **ranges)
        chosen[name] = mask.nonzero().flatten().tolist()
    return chosen


def finetune_thresholds(model, batches, iters: int, lr: float = 1e-3) -> list:
    """Straight-through fine-tuning of the channel-static thresholds (``lo``, ``delta``) on the LM loss
    over ``batches`` for ``iters`` Adam steps, the weights frozen; returns the losses."""
    encoders = [lin.encoder for _, lin in linear_layers(model) if lin.encoder.static]
    if not encoders:
        raise ValueError("fine-tuning needs channel-static thresholds (token-minmax ranges are per token)")
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    tensors = [t for e in encoders for t in (e.lo, e.delta)]
    for t in tensors:
        t.requires_grad_(True)
    opt = torch.optim.Adam(tensors, lr=lr)
    losses = []
    model.eval()
    try:
        for it in range(iters):
            batch = batches[it % len(batches)].to(model.head.weight.device)
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e in encoders:
                    e.delta.clamp_min_(1e-6)
            losses.append(float(loss.detach()))
    finally:
        for t in tensors:
            t.requires_grad_(False)
            t.grad = None
        for p, req in frozen:
            p.requires_grad_(req)
    return losses


def spikify(model, batches, cfg: SpikifyConfig, stats: dict | None = None) -> dict:
    """Convert ``model`` in place: calibrate on ``batches`` (unless ``stats`` are given), choose the
    salient channels, configure the encodings, fine-tune (``cfg.finetune_iters``).  Returns
    ``{"stats", "salient", "finetune_losses"}``."""
    if is_converted(model):
        raise ValueError("the model is already converted")
    device = model.head.weight.device
    batches = [b.to(device) for b in batches]
    if stats is None:
        stats = calibrate(model, batches, taylor=cfg.saliency == "taylor")
    salient = configure(model, stats, cfg)
    losses = finetune_thresholds(model, batches, cfg.finetune_iters) if cfg.finetune_iters else []
    return {"stats": stats, "salient": salient, "finetune_losses": losses}


def save_converted(path, model, cfg: SpikifyConfig, source: str, metrics: dict | None = None) -> None:
    """Write the converted model as a checkpoint (``spikify`` key: the settings, plain data)."""
    from ..checkpoint import save_model
    save_model(path, model, extra={"spikify": {**cfg.to_dict(), "source": source}, "metrics": metrics})


# --------------------------------------------------------------------------------------------------
# Spike-driven operation counts (spikegpt.analyze, spikegpt.energy).
# --------------------------------------------------------------------------------------------------
_ROWS = {"att.key": "att.key_value_receptance", "att.value": "att.key_value_receptance",
         "att.receptance": "att.key_value_receptance", "att.output": "att.output", "ffn.key": "ffn.key",
         "ffn.receptance": "ffn.receptance", "ffn.value": "ffn.value", "head": "head"}


class recording_input_spikes:
    """``with recording_input_spikes(model):`` every active encoder counts its spikes (reset first)."""

    def __init__(self, model):
        self.encoders = [lin.encoder for _, lin in linear_layers(model) if lin.encoder.active]

    def __enter__(self):
        for e in self.encoders:
            e.reset_record()
            e.record = True
        return self

    def __exit__(self, *exc):
        for e in self.encoders:
            e.record = False


def input_spike_rows(model) -> dict | None:
    """Per-token ``{energy row: {"mac", "ac"}}`` of the spike-driven products, from what the encoders
    recorded (None for an unconverted model).

    A spike step (one step of one channel with at least one spike) accumulates the channel's weight
    column: ``d_out`` ACs (ACE).  Besides: token-minmax applies each token's step size and offset per
    channel group, ``2 d_out`` MACs per group; channel-static folds ``delta`` into the weights and
    adds the constant ``W lo``, ``d_out`` ACs; channels kept real-valued stay ``d_out`` MACs each."""
    if not is_converted(model):
        return None
    rows = {}
    for name, lin in linear_layers(model):
        e = lin.encoder
        d_out = lin.out_features
        key = _ROWS[name.split(".", 2)[-1] if name.startswith("blocks.") else name]
        ac = d_out * e.spike_steps / max(e.tokens, 1)
        n_real = int((e.steps == 0).sum())
        mac = d_out * n_real
        if e.static:
            ac += d_out
        else:
            groups = int((~e.salient).any()) + int((e.salient & (e.steps > 0)).any())
            mac += 2 * d_out * groups
        row = rows.setdefault(key, {"mac": 0.0, "ac": 0.0})
        row["mac"] += mac
        row["ac"] += ac
    return rows


def input_spike_stats(model) -> list:
    """Per layer: spikes and spike steps per token and channel, as recorded."""
    out = []
    for name, lin in linear_layers(model):
        e = lin.encoder
        if e.active and e.tokens:
            n = e.tokens * lin.in_features
            out.append({"layer": name, "spikes_per_channel": e.spikes / n, "spike_steps_per_channel": e.spike_steps / n,
                        "salient": int(e.salient.sum()), "in_features": lin.in_features})
    return out
