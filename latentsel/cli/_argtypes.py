"""Argument types of the command line: each turns a bad value into a one-line usage error."""
from __future__ import annotations

import argparse

from latentsel.world import World
from latentsel.world.loading import load_world

__all__ = ["nonneg_int", "at_least", "positive_float", "nonneg_float", "world_spec", "add_world", "world_of"]


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


def world_spec(value: str) -> str:
    """``MODULE:ATTR`` or ``FILE.py:ATTR`` naming a world: checked by loading it; the name is
    kept, so that worker processes can load the same world."""
    try:
        load_world(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_world(p) -> None:
    """The ``--world`` option of a command that reads or writes traces."""
    p.add_argument("--world", type=world_spec, default=None, metavar="MODULE:ATTR",
                   help="the world of the traces: a World (or a function returning one) in a module or a .py file, "
                        "e.g. myworld.py:WORLD (default: the default world of DESIGN §2)")


def world_of(args) -> World:
    return load_world(getattr(args, "world", None))
