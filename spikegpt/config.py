"""Configuration: one dataclass per concern, and the presets as plain data."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


NEURONS = ("lif", "gif", "quant")
POLARITIES = ("unipolar", "bipolar")
# What --neuron gif (or quant) means when no other neuron flag is given: the GIF arm of
# benchmarks/gif_sweep.py with the best bits per byte on both texts at the tiny budget
# (results/gif_sweep.jsonl; README "Multi-level GIF neurons").
GIF_DEFAULTS = dict(levels=8, polarity="bipolar", reset="soft", surrogate="atan")
# The threshold when --v-threshold is not given: the reference LIF's (also for a one-level gif/quant,
# which with unipolar hard-reset atan is the LIF), and for multi-level gif/quant the step the sweep found
# best: finer than the LIF's, as the branch outputs it quantizes are mostly below 1 in magnitude.
LIF_THRESHOLD, GIF_THRESHOLD = 1.0, 0.25


@dataclass
class ModelConfig:
    """The architecture (docs/model.md §1).  Defaults are the reference implementation's."""

    vocab_size: int = 256
    n_layer: int = 4
    n_embd: int = 128
    ctx_len: int = 64  # training context; the model itself runs any length
    ffn_mult: int = 4  # ChannelMix hidden width = ffn_mult * n_embd
    dropout: float = 0.03  # on the residual stream after each block, training only
    layer_norm_eps: float = 1e-5
    tau: float = 2.0  # LIF membrane time constant
    v_threshold: float | None = None  # firing threshold; None: LIF_THRESHOLD, GIF_THRESHOLD for levels > 1
    surrogate_alpha: float = 2.0  # width of the arctan surrogate gradient
    binary_embedding: bool = True  # x = H(E[idx]); False feeds E[idx] itself
    spiking: bool = True  # False replaces every LIF by the identity (the plain RWKV twin)
    # The neuron of both branches: "lif" (binary, docs/model.md §3), "gif" (multi-level integrate-and-fire,
    # SpikeLLM) or "quant" (the GIF quantizer with no membrane carried between tokens, a control).
    # The GIF fields stay None for "lif"; for "gif"/"quant" None means GIF_DEFAULTS.
    neuron: str = "lif"
    levels: int | None = None  # spike counts 0..L (unipolar) or -L..L (bipolar)
    polarity: str | None = None  # "unipolar" or "bipolar"
    reset: str | None = None  # "hard" (v = 0 after a spike) or "soft" (v -= theta s); None for quant
    surrogate: str | None = None  # "atan" (arctan bump at every level) or "ste" (straight-through)
    learn_threshold: bool = False  # one learnable threshold per neuron branch, LSQ gradient scale

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_embd", "ctx_len", "ffn_mult"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.tau <= 0:
            raise ValueError(f"ModelConfig.tau must be > 0, got {self.tau}")
        self._resolve_neuron()

    def _resolve_neuron(self):
        if self.neuron not in NEURONS:
            raise ValueError(f"unknown neuron {self.neuron!r}: use --neuron with one of {', '.join(NEURONS)}")
        gif_fields = {k: getattr(self, k) for k in (*GIF_DEFAULTS, "learn_threshold")}
        if self.neuron == "lif" or not self.spiking:
            given = [f"--{k.replace('_', '-')}" for k, v in gif_fields.items() if v not in (None, False)]
            if given:
                why = ("the model does not spike (--no-spike)" if not self.spiking
                       else "they configure --neuron gif or quant, not lif")
                fix = "drop them" if not self.spiking else "add --neuron gif (or quant), or drop them"
                raise ValueError(f"{' '.join(given)}: {why}; {fix}")
            if not self.spiking and self.neuron != "lif":
                raise ValueError(f"--neuron {self.neuron} with --no-spike: the model has no neurons; "
                                 "drop one of the two flags")
            if self.v_threshold is None:
                self.v_threshold = LIF_THRESHOLD
            return
        if self.neuron == "quant" and self.reset is not None:
            raise ValueError("--reset: --neuron quant carries no membrane between tokens, so there is "
                             "nothing to reset; drop --reset (or use --neuron gif)")
        for k, default in GIF_DEFAULTS.items():
            if getattr(self, k) is None and not (k == "reset" and self.neuron == "quant"):
                setattr(self, k, default)
        if int(self.levels) < 1:
            raise ValueError(f"--levels {self.levels}: a GIF neuron needs at least one level; use --levels 1 or more")
        if self.v_threshold is None:
            self.v_threshold = GIF_THRESHOLD if self.levels > 1 else LIF_THRESHOLD
        for k, choices in (("polarity", POLARITIES), ("reset", ("hard", "soft")), ("surrogate", ("atan", "ste"))):
            value = getattr(self, k)
            if value is not None and value not in choices:
                raise ValueError(f"--{k} {value!r} is not one of {', '.join(choices)}; pick one of those")
        if self.v_threshold <= 0:
            raise ValueError(f"--v-threshold {self.v_threshold}: a GIF threshold must be > 0; pass a positive one")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        # Older checkpoints record init="reference", then the only initialisation there was.
        d = {k: v for k, v in d.items() if not (k == "init" and v == "reference")}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_reference_json(cls, config) -> "ModelConfig":
        """A config from a reference run's JSON (path or dict with vocab_size, n_layer, n_embd, ...).

        Keys that are not ModelConfig fields (such as ``model_type``) are ignored; the three sizes
        are required.
        """
        if not isinstance(config, dict):
            path = Path(config)
            if not path.is_file():
                raise FileNotFoundError(f"reference config {path} not found: pass the JSON written "
                                        "next to the checkpoint, or a dict with vocab_size, n_layer, n_embd")
            config = json.loads(path.read_text())
        missing = [k for k in ("vocab_size", "n_layer", "n_embd") if k not in config]
        if missing:
            raise ValueError(f"reference config lacks {missing}; it needs vocab_size, n_layer and n_embd")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def n_params(self) -> int:
        """``2VC + L(13C^2 + 11C) + 4C`` for ffn_mult 4 (docs/model.md §1); general in ffn_mult."""
        C, V, L, F = self.n_embd, self.vocab_size, self.n_layer, self.ffn_mult * self.n_embd
        per_layer = 5 * C * C + 2 * C * F + 11 * C  # 4 C^2 TimeMix + C^2 + 2CF ChannelMix; 11C vectors
        thresholds = 2 * L if self.learn_threshold else 0  # one per neuron branch
        return 2 * V * C + L * per_layer + 4 * C + thresholds  # +4C: LN0 and LN_out


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and bookkeeping (the reference implementation's defaults)."""

    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 6e-4
    min_lr: float = 1e-5
    warmup_iters: int = 0
    lr_schedule: str = "cosine"  # cosine decay from lr to min_lr over max_iters (after warmup)
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 4e-9
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250  # 0 disables periodic evaluation
    eval_iters: int = 20
    log_interval: int = 10
    keep_checkpoints: int = 3
    seed: int = 1337
    dtype: str = "auto"  # auto, fp32, bf16, fp16
    compile: bool = False


# Presets are data: a preset is a dict of overrides for ModelConfig and TrainConfig fields.
PRESETS: dict[str, dict] = {
    # A few minutes on a laptop CPU: the size of the CPU benchmark.
    "tiny": dict(n_layer=4, n_embd=128, ctx_len=64, batch_size=12, max_iters=2000, lr=2e-3,
                 min_lr=1e-4, warmup_iters=50, eval_interval=250, eval_iters=20),
    # The paper's enwik8 model (~45M parameters at vocab 256).
    "45m": dict(n_layer=12, n_embd=512, ctx_len=1024, batch_size=12, max_iters=100_000, lr=6e-4,
                min_lr=1e-5, eval_interval=1000, eval_iters=50),
    # The paper's OpenWebText2 model with the GPT-NeoX vocabulary.
    "216m": dict(n_layer=18, n_embd=768, ctx_len=1024, vocab_size=50277, batch_size=12,
                 max_iters=400_000, lr=6e-4, min_lr=1e-5, eval_interval=2000, eval_iters=50),
}


def resolve_device(name: str = "auto"):
    """``"auto"`` -> cuda if available else cpu; otherwise ``torch.device(name)``, refusing a CUDA
    device on a machine without one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use cpu")
    return device


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split a flat dict of overrides into (ModelConfig fields, TrainConfig fields)."""
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - model_names - train_names)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    return ({k: v for k, v in overrides.items() if k in model_names},
            {k: v for k, v in overrides.items() if k in train_names})


def preset(name: str) -> tuple[dict, dict]:
    """The (model, train) overrides of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return split_overrides(PRESETS[name])


__all__ = ["ModelConfig", "NEURONS", "GIF_DEFAULTS", "GIF_THRESHOLD", "LIF_THRESHOLD", "TrainConfig", "PRESETS", "preset", "split_overrides", "resolve_device"]
