"""Checkpoints: our format, loading, and import of reference SpikeGPT state dicts.

A checkpoint is one file ``ckpt-{step:08d}.pt`` written by ``torch.save`` and read back with
``torch.load(weights_only=True)``: it holds only tensors and plain Python values (no pickled
objects).  Its top-level keys:

``format`` ("spikegpt-checkpoint"), ``version`` (1), ``model_config`` (ModelConfig fields),
``train_config`` (TrainConfig fields or None), ``model`` (state dict), ``optimizer`` (state dict or
None), ``step`` (optimizer steps done), ``tokens_seen``, ``rng`` (torch CPU/CUDA generator states),
``sampler`` (the data sampler's state), ``tokenizer`` (``Tokenizer.to_dict()`` or None), ``data``
(dataset metadata), ``metrics`` (the last evaluation), ``versions`` (spikegpt, torch, python).

Writes are atomic (a temporary file in the same directory, fsync, then rename), so a crash during a
save leaves the previous checkpoints intact and never a half-written ``ckpt-*.pt``.
"""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError
from .fileio import atomic_write
from .model import SpikeGPT
from .version import __version__

FORMAT = "spikegpt-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def versions() -> dict:
    return {"spikegpt": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def checkpoint_path(out_dir, step: int) -> Path:
    return Path(out_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(out_dir) -> list[Path]:
    """The run directory's checkpoints, oldest first (temporary files of unfinished saves excluded)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`spikegpt.fileio.atomic_write`); a full disk or a
    read-only directory is a :class:`CheckpointError` naming the path, earlier files intact."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        cause = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise CheckpointError(f"cannot write {path}: {cause}; free disk space or pass a writable location "
                              "(earlier checkpoints are intact)") from None


def prune_checkpoints(out_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted saves."""
    out_dir = Path(out_dir)
    for stale in out_dir.glob(".ckpt-*.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)


def read_checkpoint(path, map_location="cpu") -> dict:
    """Read one of our checkpoints (a file, or a run directory: its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"no checkpoint (ckpt-*.pt) in {path}: train into it first, "
                                  "or pass a checkpoint file")
        path = newest
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a ckpt-*.pt file or a run directory")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if not is_zip:
        raise CheckpointError(f"{path} is not a checkpoint (not a file written by torch.save); pass a "
                              "ckpt-*.pt file or a run directory")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign objects...
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"checkpoint {path} holds Python objects besides tensors and plain data, "
                                  "so it is refused rather than unpickled; convert it with a trusted "
                                  "script or pass another checkpoint") from e
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); move it aside to use "
                              "the previous one, or pass another checkpoint") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spikegpt checkpoint (a reference SpikeGPT .pth? "
                              "load it with spikegpt.from_reference or python -m spikegpt.convert)")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt['version']}, newer than this "
                              f"spikegpt understands ({VERSION}): upgrade spikegpt")
    missing = [k for k in ("model_config", "model") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} is a spikegpt checkpoint without {' and '.join(missing)}: it is "
                              "damaged; pass another checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> SpikeGPT:
    from .tokenizer import tokenizer_from_dict

    source = ckpt.get("path", "the checkpoint")
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} has an unusable model config ({e}); pass another checkpoint") from None
    model = SpikeGPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing/unexpected keys or a tensor of the wrong shape
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(f"{source}: its tensors do not fit its config ({detail[:300]}); the file is "
                              "damaged or was edited: pass another checkpoint") from None
    model.tokenizer = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    return model.to(device).eval()


def load(path, device="cpu") -> SpikeGPT:
    """A trained model, in eval mode, from a checkpoint file or a run directory (newest checkpoint).

    The config is read from the file and ``model.tokenizer`` restored from it (None if the run had
    no tokenizer)."""
    return model_from_checkpoint(read_checkpoint(path), device)


def load_any(ckpt=None, reference=None, reference_config=None, device="cpu", **config_overrides) -> SpikeGPT:
    """The model a command line names: one of our checkpoints (``ckpt``: a file or a run directory)
    or a reference state dict (``reference`` with its ``reference_config``).  ``config_overrides``
    (``binary_embedding``, ``v_threshold``, ...; None values ignored) apply to reference imports."""
    config_overrides = {k: v for k, v in config_overrides.items() if v is not None}
    if (ckpt is None) == (reference is None):
        raise CheckpointError("pass exactly one of --ckpt and --reference")
    if reference is None:
        if config_overrides:
            raise CheckpointError(f"{sorted(config_overrides)} apply to --reference imports only; a "
                                  "checkpoint of ours records its config")
        return load(ckpt, device)
    if reference_config is None:
        raise CheckpointError("--reference needs --reference-config JSON (a reference checkpoint carries no config)")
    config = reference_config
    if config_overrides:
        config = {**ModelConfig.from_reference_json(reference_config).to_dict(), **config_overrides}
    return from_reference(reference, config).to(device)


def build_checkpoint(model: SpikeGPT, tokenizer=None, *, train_config: dict | None = None, optimizer=None,
                     step: int = 0, tokens_seen: int = 0, rng: dict | None = None, sampler: dict | None = None,
                     data: dict | None = None, metrics: dict | None = None, extra: dict | None = None) -> dict:
    """The checkpoint dict (the module docstring lists its keys); the one place that assembles one.

    The tokenizer is stored once, under ``tokenizer``: a dataset's ``meta`` given in ``data`` is kept
    without its copy of the tokenizer."""
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if data is not None and isinstance(data.get("meta"), dict):
        data = {**data, "meta": {k: v for k, v in data["meta"].items() if k != "tokenizer"}}
    ckpt = {
        "format": FORMAT, "version": VERSION,
        "model_config": model.config.to_dict(), "train_config": train_config,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step, "tokens_seen": tokens_seen, "rng": rng, "sampler": sampler,
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "data": data, "metrics": metrics, "versions": versions(),
    }
    ckpt.update(extra or {})
    return ckpt


def save_model(path, model: SpikeGPT, tokenizer=None, extra: dict | None = None) -> None:
    """Write a model-only checkpoint (no optimizer), e.g. a converted reference model."""
    atomic_save(build_checkpoint(model, tokenizer, extra=extra), path)


def from_reference(pth_path, config) -> SpikeGPT:
    """A model, in eval mode, from a reference SpikeGPT ``state_dict`` file.

    ``config`` is a dict or the path of a JSON with at least vocab_size, n_layer and n_embd (like
    ``reference/*.json``); other ModelConfig fields (``binary_embedding``, ``v_threshold``, ...) may
    be given too.  The checkpoint must match the config exactly: layers are never dropped or invented.
    """
    config = ModelConfig.from_reference_json(config)
    pth_path = Path(pth_path)
    if not pth_path.is_file():
        raise CheckpointError(f"reference checkpoint {pth_path} does not exist")
    try:
        state = torch.load(pth_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read reference checkpoint {pth_path} ({type(e).__name__}: {e}); "
                              "it must be a torch.save(state_dict) file") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    _check_reference_shapes(state, config, pth_path)
    model = SpikeGPT(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"{pth_path} does not match the config: {str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise CheckpointError(f"{pth_path} does not match the SpikeGPT architecture: missing "
                              f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
                              f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    return model.eval()


def _check_reference_shapes(state: dict, config: ModelConfig, path) -> None:
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    problems = []
    if n_layer != config.n_layer:
        problems.append(f"it has {n_layer} layers but the config says n_layer={config.n_layer}")
    emb = state.get("emb.weight")
    if emb is None:
        problems.append("it has no emb.weight")
    else:
        if emb.shape[0] != config.vocab_size:
            problems.append(f"its vocabulary is {emb.shape[0]} but the config says vocab_size={config.vocab_size}")
        if emb.shape[1] != config.n_embd:
            problems.append(f"its width is {emb.shape[1]} but the config says n_embd={config.n_embd}")
    if problems:
        raise CheckpointError(f"reference checkpoint {path} contradicts its config: " + "; ".join(problems)
                              + ". Pass the config the checkpoint was trained with.")
