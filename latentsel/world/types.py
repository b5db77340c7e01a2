"""The world: an alphabet, skills and routings, held as data.

A :class:`World` is a value: names, reference functions (plain per-string Python),
optional vectorized implementations, the alphabet and ``max_len``. The default world
(:func:`default_world`) is the one of DESIGN §2; users build their own with
:class:`Skill`, :class:`Route` and :class:`World`.

Character maps act on the index of a character in the alphabet, modulo its size.
Every routing result and every skill output is truncated to ``max_len`` characters.
"""
from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Sequence

__all__ = [
    "Skill",
    "Route",
    "World",
    "DEFAULT_ALPHABET",
    "MAX_LEN",
]

DEFAULT_ALPHABET = string.ascii_lowercase
MAX_LEN = 16


@dataclass(frozen=True)
class Skill:
    """A local string operation.

    Attributes:
        name: unique name.
        fn: reference implementation ``fn(s, alphabet) -> str`` on one string.
        batch: optional vectorized implementation on a block of equal-length strings,
            ``batch(codes: uint8[m, l], n_chars: int) -> (uint8[m, w], lens: int | int[m])``
            (see :mod:`latentsel.world.executor`). Without it the batch executor loops over ``fn``.
    """

    name: str
    fn: Callable[[str, str], str]
    batch: Callable | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Route:
    """A routing: which intermediate results feed a step.

    Attributes:
        name: unique name.
        fn: reference implementation ``fn(history) -> str`` where ``history`` is the
            list ``[h_0 = input, h_1, ..., h_{t-1}]`` (non-empty).
        batch: optional vectorized implementation
            ``batch(codes: uint8[N, T, W], lens: int[N, T], depth: int[N]) -> (uint8[N, W'], int[N])``.
        reads: the history entries the routing can read, ``reads(t) -> iterable of indices``
            into ``[h_0, ..., h_{t-1}]`` for a history of ``t`` entries. ``None`` (the default)
            means every entry, which is always exact. Exact inference on traces with hidden
            steps enumerates a hidden step jointly with the later steps whose routings can
            read it, so a tighter declaration only makes it faster; a declaration that leaves
            out an entry the routing reads makes it wrong (``tests/world/test_world.py`` checks the
            default routings' declarations by running them).
        reads_on: optional, the entries the routing reads on a given history, in reading
            order: ``reads_on(history) -> iterable of indices``, where ``history`` may hold
            ``None`` for a hidden entry. For routings whose choice depends on the strings
            (``longest``); the others read ``reads(t)`` whatever the strings.
    """

    name: str
    fn: Callable[[Sequence[str]], str]
    batch: Callable | None = field(default=None, compare=False, repr=False)
    reads: Callable[[int], Iterable[int]] | None = field(default=None, compare=False, repr=False)
    reads_on: Callable[[Sequence[str | None]], Iterable[int]] | None = field(default=None, compare=False, repr=False)

    @property
    def declared(self) -> bool:
        """Whether the routing says which entries it reads (else it is taken to read all)."""
        return self.reads is not None or self.reads_on is not None

    def sources(self, history: Sequence[str | None]) -> list[int]:
        """The entries of ``history = [h_0, ..., h_{t-1}]`` this routing reads, in reading order,
        without repeats (``None`` marks a hidden entry); every entry when it declares nothing."""
        n = len(history)
        if n == 0:
            raise ValueError("history must hold at least the input h_0")
        if self.reads_on is not None:
            return list(dict.fromkeys(int(i) for i in self.reads_on(history)))
        if self.reads is not None:
            return list(dict.fromkeys(int(i) for i in self.reads(n)))
        return list(range(n))

    def entries(self, t: int) -> frozenset[int]:
        """The indices of the entries this routing can read in a history of ``t`` entries."""
        if self.reads is None:
            return frozenset(range(t))
        out = frozenset(int(i) for i in self.reads(t))
        if any(not 0 <= i < t for i in out):
            raise ValueError(f"routing {self.name!r} declares reads outside a history of {t} entries: {sorted(out)}")
        return out


def _trunc(s: str, max_len: int) -> str:
    return s[:max_len]


@dataclass(frozen=True)
class World:
    """Skills, routings, alphabet and max_len: everything a module's behaviour depends on."""

    skills: tuple[Skill, ...]
    routes: tuple[Route, ...]
    alphabet: str = DEFAULT_ALPHABET
    max_len: int = MAX_LEN

    def __post_init__(self):
        object.__setattr__(self, "skills", tuple(self.skills))
        object.__setattr__(self, "routes", tuple(self.routes))
        if not self.skills or not self.routes:
            raise ValueError("a world needs at least one skill and one routing")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ValueError(f"alphabet must be non-empty with distinct characters, got {self.alphabet!r}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        for kind, items in (("skill", self.skills), ("routing", self.routes)):
            names = [it.name for it in items]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate {kind} names: {sorted(dup)}")
        object.__setattr__(self, "_skill_index", {s.name: i for i, s in enumerate(self.skills)})
        object.__setattr__(self, "_route_index", {r.name: i for i, r in enumerate(self.routes)})
        object.__setattr__(self, "_char_index", {c: i for i, c in enumerate(self.alphabet)})

    # -- sizes and names -------------------------------------------------------------
    @property
    def n_skills(self) -> int:
        """K, the number of skills."""
        return len(self.skills)

    @property
    def n_routes(self) -> int:
        """R, the number of routings."""
        return len(self.routes)

    @property
    def n_chars(self) -> int:
        """A, the alphabet size."""
        return len(self.alphabet)

    @property
    def n_modules(self) -> int:
        """M = R * K."""
        return self.n_routes * self.n_skills

    @property
    def skill_names(self) -> list[str]:
        return [s.name for s in self.skills]

    @property
    def route_names(self) -> list[str]:
        return [r.name for r in self.routes]

    def skill_index(self, skill: str | int) -> int:
        """Index of a skill given by name or index; ``KeyError`` naming it if unknown."""
        return _lookup(skill, self._skill_index, self.n_skills, "skill")

    def route_index(self, route: str | int) -> int:
        """Index of a routing given by name or index; ``KeyError`` naming it if unknown."""
        return _lookup(route, self._route_index, self.n_routes, "routing")

    def char_index(self, ch: str) -> int:
        return self._char_index[ch]

    def check_string(self, s: str, what: str = "string") -> None:
        """Raise ``ValueError`` if ``s`` has a character outside the alphabet."""
        bad = sorted(set(s) - set(self._char_index))
        if bad:
            raise ValueError(f"{what} {s!r} has characters outside the alphabet: {''.join(bad)!r}")

    # -- execution (reference) -------------------------------------------------------
    def route(self, route: str | int, history: Sequence[str]) -> str:
        """The truncated routing result on ``history = [h_0, ..., h_{t-1}]``."""
        if len(history) == 0:
            raise ValueError("history must hold at least the input h_0")
        return _trunc(self.routes[self.route_index(route)].fn(list(history)), self.max_len)

    def skill(self, skill: str | int, s: str) -> str:
        """The truncated skill output on ``s``."""
        return _trunc(self.skills[self.skill_index(skill)].fn(s, self.alphabet), self.max_len)

    def apply(self, route: str | int, skill: str | int, history: Sequence[str]) -> str:
        """``h_t = trunc(skill(trunc(route(H))))`` for the module ``(route, skill)``."""
        return self.skill(skill, self.route(route, history))

    def run(self, program: Sequence[tuple[str | int, str | int]], x: str) -> list[str]:
        """Run a program (a sequence of ``(route, skill)``) on input ``x``; returns ``[h_1, ..., h_L]``."""
        history = [x]
        for route, skill in program:
            history.append(self.apply(route, skill, history))
        return history[1:]

    def readable(self, t: int) -> frozenset[int]:
        """The history entries that some routing can read at a step whose history has ``t``
        entries (step t, 1-based): the entries that step's emission can depend on."""
        return _readable(self.routes, t)

    def module_name(self, m: int) -> str:
        """Name ``route/skill`` of module index ``m = r * K + k``."""
        r, k = divmod(m, self.n_skills)
        return f"{self.routes[r].name}/{self.skills[k].name}"


@lru_cache(maxsize=4096)
def _readable(routes: tuple, t: int) -> frozenset[int]:
    return frozenset().union(*(r.entries(t) for r in routes))


def unknown_name(kind: str, name, choices) -> str:
    """``unknown skill 'revers' (did you mean 'reverse'?)``: a near miss named, else the choices
    when they are few."""
    text = f"unknown {kind} {str(name)[:80]!r}"
    close = difflib.get_close_matches(str(name), list(choices), n=1) if isinstance(name, str) else []
    if close:
        return f"{text} (did you mean {close[0]!r}?)"
    return f"{text} (this world has {len(choices)}: {', '.join(list(choices)[:12])}{', ...' if len(choices) > 12 else ''})"


def _lookup(key, index: dict, n: int, kind: str) -> int:
    if isinstance(key, str):
        try:
            return index[key]
        except KeyError:
            raise KeyError(unknown_name(kind, key, index)) from None
    if isinstance(key, bool) or not hasattr(key, "__index__"):
        raise TypeError(f"{kind} must be a name or an index, got {key!r}")
    i = key.__index__()
    if not 0 <= i < n:
        raise KeyError(f"{kind} index {i} out of range [0, {n})")
    return i

