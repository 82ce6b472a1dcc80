"""Argument types for the ``ava`` command line: a bad value is an argparse error (exit 2, one line)."""

from __future__ import annotations

import argparse
import re

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def decode_escapes(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` → newline, tab, carriage return, backslash; any other
    backslash stays as written (``--stop`` and the REPL's ``:stop``)."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text, flags=re.DOTALL)
