"""What every command-line tool shares: the parser, the flags, their legal ranges, and how a tool ends.

Each tool builds its parser with :func:`new_parser`, adds the common flags from here (defined once,
with one default and one help text each), and runs through :func:`run_cli`:

* a :class:`~spikegpt.errors.UserError` (``CheckpointError`` and ``DataError`` are ones) ends the
  tool with one line ``error: <message>`` on stderr and exit status 2, never a traceback;
* Ctrl-C ends it with one line and status 130;
* ``--debug`` (or ``SPIKEGPT_DEBUG=1``) shows the traceback instead, for bug reports.

Numeric flags are checked at parse time by the argparse types below, so a nonsense value (``0``
sequences, a ``nan`` learning rate) is refused before any work starts, with argparse's usage line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------------------
# Parser and exit.
# --------------------------------------------------------------------------------------------------
def new_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` that shows defaults in ``--help`` and has ``--debug``."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
    add_debug_arg(p)
    return p


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error (also: SPIKEGPT_DEBUG=1)")


def debugging(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("SPIKEGPT_DEBUG", "") not in ("", "0")


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], object], argv=None,
            interrupted: str = "interrupted (Ctrl-C)") -> int:
    """Parse ``argv`` and run ``main(args)``; returns the exit status: ``main``'s own when it returns an
    int, else 0.  A user error or a file-system error (a missing input, a full disk, a read-only
    directory) is one ``error:`` line and status 2; Ctrl-C prints ``interrupted`` and gives 130."""
    args = parser.parse_args(argv)
    try:
        status = main(args)
        return status if isinstance(status, int) else 0
    except (UserError, OSError) as e:
        if debugging(args):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debugging(args):
            raise
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED


# --------------------------------------------------------------------------------------------------
# Legal ranges.
# --------------------------------------------------------------------------------------------------
def _number(kind, ok: Callable[[float], bool], rule: str):
    def parse(text: str):
        try:
            value = kind(text.replace(",", "")) if kind is int else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {rule}")
        return value
    parse.__name__ = rule  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _number(float, math.isfinite, "a finite number")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def split_name(text: str) -> str:
    """A split name; ``valid`` is accepted for ``val``."""
    name = "val" if text == "valid" else text
    if name not in ("train", "val", "test"):
        raise argparse.ArgumentTypeError(f"{text!r} is no split: choose train, val or test")
    return name


# --------------------------------------------------------------------------------------------------
# The common flags.
# --------------------------------------------------------------------------------------------------
def add_device_arg(p, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")


def add_kernels_arg(p) -> None:
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"),
                   help="WKV/neuron implementation: auto = Triton kernels on CUDA tensors, the PyTorch "
                        "reference otherwise")


def add_dtype_arg(p, default: str | None = "auto") -> None:
    p.add_argument("--dtype", default=default, choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype; auto = bf16 on GPUs that support it, else fp32 (WKV math stays fp32)")


def add_threads_arg(p) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for PyTorch (default: "
                   "the cores that other processes leave idle, at least 1)")


def default_threads() -> int | None:
    """The cores this process may use less those other processes keep busy (the 1-minute load
    average), at least 1; None (PyTorch's choice) where ``OMP_NUM_THREADS`` says.  PyTorch's own default
    takes every core, and its OpenMP threads spin-wait for each other: on a machine whose cores are busy,
    a step then runs 10-100x slower than on one thread."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


def add_split_arg(p, default: str = "val", help: str = "split") -> None:
    p.add_argument("--split", type=split_name, default=default, help=f"{help} (train, val, test; 'valid' means val)")


def add_json_arg(p) -> None:
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the result as JSON to this file")


def add_model_args(p) -> None:
    """The flags that name a model: ``--ckpt``, or ``--reference`` with its config (and the two settings
    a reference checkpoint does not record), and an optional ``--tokenizer``; read by :func:`load_model`."""
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", help="our checkpoint file or run directory (its newest checkpoint)")
    g.add_argument("--reference", metavar="PTH", help="a reference SpikeGPT state dict (.pth) instead of --ckpt")
    g.add_argument("--reference-config", metavar="JSON",
                   help="the reference model's config JSON (vocab_size, n_layer, n_embd, ...)")
    g.add_argument("--tokenizer", help="override the model's tokenizer: 'byte', a tokenizer.json "
                                       "(BPE) or a JSON written by Tokenizer.to_dict()")
    g.add_argument("--binary-embedding", dest="binary_embedding", action="store_true", default=None,
                   help="reference import: binarise the embedding, x = H(E[idx]) (our default)")
    g.add_argument("--no-binary-embedding", dest="binary_embedding", action="store_false",
                   help="reference import: feed E[idx] itself")
    g.add_argument("--v-threshold", type=positive_float, default=None,
                   help="reference import: LIF threshold (default 1.0)")


# --------------------------------------------------------------------------------------------------
# What the flags name.
# --------------------------------------------------------------------------------------------------
def setup_runtime(args):
    """Apply ``--threads`` and ``--kernels`` (when the parser has them) and return the ``--device``."""
    import torch

    from . import ops

    threads = getattr(args, "threads", None) or default_threads()
    if threads:
        torch.set_num_threads(threads)
    if getattr(args, "kernels", None):
        ops.set_backend(args.kernels)
    return device_from(getattr(args, "device", "auto"))


def device_from(name: str):
    """``torch.device`` for a ``--device`` value; a ``UserError`` naming the fix otherwise."""
    from .config import resolve_device


    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--device {name}: {str(e).splitlines()[0]}; use auto, cpu or cuda[:N]") from None


def load_tokenizer(spec: str):
    """A tokenizer from ``--tokenizer``: ``byte``, a tokenizer.json (BPE) or a ``Tokenizer.to_dict()`` JSON."""
    from .tokenizer import BPETokenizer, ByteTokenizer, tokenizer_from_dict

    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"tokenizer {spec} not found: pass 'byte' or a tokenizer JSON file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"tokenizer {spec} is not JSON ({e}): pass 'byte' or a tokenizer JSON file") from None
    try:
        if isinstance(d, dict) and "kind" in d and "model" not in d:
            return tokenizer_from_dict(d)
        return BPETokenizer(path)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise UserError(f"tokenizer {spec} cannot be read ({type(e).__name__}: {str(e)[:200]}): pass "
                        "'byte' or a tokenizer JSON file") from None


def load_model(args, device="cpu", need_tokenizer: bool = True):
    """The model that :func:`add_model_args`'s flags name, in eval mode, with ``model.tokenizer`` set
    (``--tokenizer`` wins over the checkpoint's; a tokenizer-less model of vocabulary 256 gets bytes;
    another one is an error when ``need_tokenizer``, else keeps ``None``)."""
    from .checkpoint import load_any
    from .tokenizer import ByteTokenizer

    try:
        model = load_any(args.ckpt, args.reference, args.reference_config, device,
                         binary_embedding=args.binary_embedding, v_threshold=args.v_threshold)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    tokenizer = load_tokenizer(args.tokenizer) if getattr(args, "tokenizer", None) else model.tokenizer
    if tokenizer is None:
        if model.config.vocab_size != 256:
            if not need_tokenizer:
                return model
            raise UserError(f"the model (vocab {model.config.vocab_size}) has no tokenizer: pass --tokenizer")
        tokenizer = ByteTokenizer()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer vocabulary ({tokenizer.vocab_size}) does not match the model's "
                        f"({model.config.vocab_size}): pass the tokenizer the model was trained with")
    model.tokenizer = tokenizer
    return model


def check_data_matches(model, meta: dict, data_dir) -> None:
    """Refuse a prepared dataset whose vocabulary or tokenizer is not the model's (a char dataset with
    the same number of ids but another mapping would give a wrong loss without a word)."""
    if model.config.vocab_size != meta["vocab_size"]:
        raise UserError(f"vocabulary mismatch: the model has vocab_size={model.config.vocab_size} but "
                        f"{data_dir} was prepared with {meta['vocab_size']} tokens; use data prepared "
                        "with the model's tokenizer")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and meta.get("tokenizer") and tokenizer.to_dict() != meta["tokenizer"]:
        raise UserError(f"the dataset {data_dir} was tokenized differently from the model (same size, "
                        "another mapping); prepare the text again with the model's tokenizer, or pass "
                        "the matching --tokenizer")


def write_json(path, obj) -> None:
    """Write a tool's ``--json`` result atomically."""
    from .fileio import atomic_write_json

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--json {path} is a directory: pass a file name")
    try:
        atomic_write_json(path, obj)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; pass a writable path") from None


__all__ = ["UserError", "new_parser", "run_cli", "positive_int", "nonneg_int", "finite_float", "positive_float",
           "nonneg_float", "unit_interval", "fraction", "probability", "split_name", "add_device_arg", "add_kernels_arg",
           "add_dtype_arg", "add_threads_arg", "default_threads", "add_split_arg", "add_json_arg", "add_model_args",
           "setup_runtime", "device_from", "load_tokenizer", "load_model", "check_data_matches", "write_json"]
