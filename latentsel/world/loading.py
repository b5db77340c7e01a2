"""Worlds named by a string, so that a user's world can cross a command line and a process
boundary: ``MODULE:ATTR`` or ``FILE.py:ATTR`` names a :class:`~latentsel.world.World` (or a
function returning one); ``None`` is the default world."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

from latentsel.world.default import default_world
from latentsel.world.types import World

__all__ = ["load_world"]


@lru_cache(maxsize=16)
def load_world(spec: str | None) -> World:
    """The world ``spec`` names (loaded once per process); ``ValueError`` saying what is wrong."""
    if spec is None:
        return default_world()
    where, sep, attr = str(spec).rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ValueError(f"expected MODULE:ATTR or FILE.py:ATTR, got {str(spec)[:200]!r}")
    if where.endswith(".py") and not Path(where).is_file():
        raise ValueError(f"{where}: no such file")
    try:
        if where.endswith(".py"):
            path = Path(where)
            spec_ = importlib.util.spec_from_file_location(f"_latentsel_world_{path.stem}", path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[spec_.name] = module  # dataclasses look their module up here
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is named, on one line
        message = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot load {where}: {type(e).__name__}: {message}") from None
    if not hasattr(module, attr):
        raise ValueError(f"{where} has no attribute {attr!r}")
    world = getattr(module, attr)
    if callable(world) and not isinstance(world, World):
        try:
            world = world()
        except Exception as e:  # noqa: BLE001 - as above
            raise ValueError(f"{spec}(): {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(world, World):
        raise ValueError(f"{spec}: expected a World (or a function returning one), got {type(world).__name__}")
    return world
