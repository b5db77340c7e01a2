"""The world (DESIGN §2): an alphabet, skills and routings, held as data.

* :mod:`latentsel.world.types`: :class:`Skill`, :class:`Route` (with the history entries it
  reads) and :class:`World`, the reference semantics on one string;
* :mod:`latentsel.world.executor`: every module on a batch of padded histories at once;
* :mod:`latentsel.world.default`: the 24 skills and 10 routings of the default world.
"""
from latentsel.world.default import default_world
from latentsel.world.types import DEFAULT_ALPHABET, MAX_LEN, Route, Skill, World

__all__ = ["Skill", "Route", "World", "default_world", "DEFAULT_ALPHABET", "MAX_LEN"]
