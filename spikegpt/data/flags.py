"""Argparse types for the numeric flags of the ``data/`` scripts, and their user-error exit.

A bad value ends in argparse's usual one-line ``error:`` at parse time (exit status 2), before
any work; a user error found later (a :class:`~spikegpt.errors.UserError` or a file-system error)
ends the same way through :func:`run_script`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import UserError

#: Exit status of a user error (argparse uses it too).
USER_ERROR_EXIT = 2


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text.replace(",", "")) if kind is int else kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def positive_int(text: str) -> int:
    """An integer >= 1 (``100_000_000`` and ``100,000,000`` are accepted)."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _number(text, float)
    if not 0.0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A fraction in [0, 1)."""
    v = _number(text, float)
    if not 0.0 <= v < 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
    return v


def run_script(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a script's work: a user error or a file-system error (a missing input, a full disk, a
    read-only directory) ends as one ``error:`` line on stderr with exit status 2, Ctrl-C as one
    ``interrupted`` line with status 130; never a traceback."""
    try:
        return body()
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
