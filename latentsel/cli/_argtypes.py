"""Argument types of the command line: each turns a bad value into a one-line usage error."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from latentsel.world import World, default_world

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


def world_spec(value: str) -> World:
    """``MODULE:ATTR`` or ``FILE.py:ATTR``: a :class:`~latentsel.world.World`, or a function
    that returns one, defined in an importable module or a Python file (which is run)."""
    where, sep, attr = value.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise argparse.ArgumentTypeError(f"expected MODULE:ATTR or FILE.py:ATTR, got {value[:200]!r}")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise argparse.ArgumentTypeError(f"{where}: no such file")
            spec = importlib.util.spec_from_file_location(f"_latentsel_world_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look their module up here
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except argparse.ArgumentTypeError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is a usage error naming it
        raise argparse.ArgumentTypeError(f"cannot load {where}: {type(e).__name__}: {str(e)[:200]}") from None
    if not hasattr(module, attr):
        raise argparse.ArgumentTypeError(f"{where} has no attribute {attr!r}")
    world = getattr(module, attr)
    if callable(world) and not isinstance(world, World):
        try:
            world = world()
        except Exception as e:  # noqa: BLE001 - as above
            raise argparse.ArgumentTypeError(f"{value}(): {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(world, World):
        raise argparse.ArgumentTypeError(f"{value}: expected a World (or a function returning one), "
                                         f"got {type(world).__name__}")
    return world


def add_world(p) -> None:
    """The ``--world`` option of a command that reads or writes traces."""
    p.add_argument("--world", type=world_spec, default=None, metavar="MODULE:ATTR",
                   help="the world of the traces: a World (or a function returning one) in a module or a .py file, "
                        "e.g. myworld.py:WORLD (default: the default world of DESIGN §2)")


def world_of(args) -> World:
    return default_world() if getattr(args, "world", None) is None else args.world
