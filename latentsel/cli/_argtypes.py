"""Argument types of the command line: each turns a bad value into a one-line usage error."""
from __future__ import annotations

import argparse

__all__ = ["nonneg_int", "at_least", "positive_float", "nonneg_float"]


def nonneg_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {n}")
    return n


def at_least(low: int):
    """An integer type that rejects values below ``low``."""

    def parse(value: str) -> int:
        n = nonneg_int(value)
        if n < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {n}")
        return n

    return parse


def _float(value: str, ok, what: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not ok(x) or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a {what} number, got {value}")
    return x


def positive_float(value: str) -> float:
    return _float(value, lambda x: x > 0, "positive")


def nonneg_float(value: str) -> float:
    return _float(value, lambda x: x >= 0, "non-negative")
