"""Data regimes: seeded prompts (an input and an intended program) for training and evaluation.

The K*K ordered skill bigrams are split (DESIGN §7) into an SFT-seen half, an RL quarter
and a held-out quarter. The prompt regimes:

=============  =====  ==============================================================
regime         depth  skill bigrams of the program
=============  =====  ==============================================================
sft            3      all seen; the set covers every skill and every routing
rl-atomic      1      (none: any single module)
rl-compound    3      at least one from the RL quarter, none held out
eval-seen      3      all seen
eval-unseen    3      at least one held out
eval-ood       4      any
=============  =====  ==============================================================

Routings are uniform at every step; inputs have length 4 to 8, characters uniform over the
alphabet. The same ``(regime, n, seed, split_seed)`` always gives the same prompts, and
different regimes draw from independent streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from latentsel.traces import Trace, golden_trace
from latentsel.world import World, default_world

__all__ = ["REGIMES", "BigramSplit", "bigram_split", "generate", "regime_programs"]

SEEN, RL, HELD_OUT = 0, 1, 2
MIN_INPUT_LEN, MAX_INPUT_LEN = 4, 8


class _Regime(NamedTuple):
    depth: int
    code: int


REGIMES = {
    "sft": _Regime(3, 0),
    "rl-atomic": _Regime(1, 1),
    "rl-compound": _Regime(3, 2),
    "eval-seen": _Regime(3, 3),
    "eval-unseen": _Regime(3, 4),
    "eval-ood": _Regime(4, 5),
}


@dataclass(frozen=True)
class BigramSplit:
    """``labels: int8[K, K]``, ``labels[a, b]`` the part of the bigram (skill a, then skill b):
    0 = SFT-seen, 1 = RL, 2 = held out."""

    labels: np.ndarray
    seed: int

    @property
    def seen(self) -> np.ndarray:
        return self.labels == SEEN

    @property
    def rl(self) -> np.ndarray:
        return self.labels == RL

    @property
    def held_out(self) -> np.ndarray:
        return self.labels == HELD_OUT

    def counts(self) -> dict[str, int]:
        return {"seen": int(self.seen.sum()), "rl": int(self.rl.sum()), "held_out": int(self.held_out.sum())}


def bigram_split(n_skills: int, seed: int = 0) -> BigramSplit:
    """Split the ``n_skills**2`` ordered bigrams: half seen, a quarter RL, a quarter held out.

    A random cycle through all skills is put in the seen half first, so every skill has a
    seen predecessor and a seen successor: SFT programs can then place any skill anywhere.
    """
    if n_skills < 2:
        raise ValueError(f"a bigram split needs at least 2 skills, got {n_skills}")
    rng = np.random.default_rng([seed, 0x5EED])
    total = n_skills * n_skills
    n_seen, n_rl = total // 2, total // 4
    cycle = rng.permutation(n_skills)
    first = cycle * n_skills + np.roll(cycle, -1)
    rest = rng.permutation(np.setdiff1d(np.arange(total), first))
    order = np.concatenate([first, rest])
    labels = np.full(total, HELD_OUT, dtype=np.int8)
    labels[order[:n_seen]] = SEEN
    labels[order[n_seen: n_seen + n_rl]] = RL
    return BigramSplit(labels.reshape(n_skills, n_skills), seed)


def regime_programs(regime: str, split: BigramSplit) -> np.ndarray:
    """Every skill sequence the regime allows: ``int[C, depth]`` (skill indices)."""
    depth = _regime(regime).depth
    k = split.labels.shape[0]
    seqs = np.stack(np.unravel_index(np.arange(k**depth), (k,) * depth), axis=1)
    if depth == 1 or regime == "eval-ood":
        return seqs
    labels = split.labels[seqs[:, :-1], seqs[:, 1:]]  # [C, depth - 1]
    if regime in ("sft", "eval-seen"):
        keep = (labels == SEEN).all(axis=1)
    elif regime == "rl-compound":
        keep = (labels != HELD_OUT).all(axis=1) & (labels == RL).any(axis=1)
    elif regime == "eval-unseen":
        keep = (labels == HELD_OUT).any(axis=1)
    else:  # pragma: no cover - guarded by _regime
        raise AssertionError(regime)
    return seqs[keep]


def _regime(name: str) -> _Regime:
    try:
        return REGIMES[name]
    except KeyError:
        raise KeyError(f"unknown regime {name!r}; choose from {', '.join(REGIMES)}") from None


def _cover(candidates: np.ndarray, n_skills: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Greedily pick candidate programs until every skill appears in one."""
    uncovered = np.ones(n_skills, dtype=bool)
    picked = []
    while uncovered.any():
        gain = np.zeros(len(candidates), dtype=int)
        for k in np.flatnonzero(uncovered):
            gain += (candidates == k).any(axis=1)
        if gain.max() == 0:
            break
        best = np.flatnonzero(gain == gain.max())
        choice = candidates[rng.choice(best)]
        picked.append(choice)
        uncovered[choice] = False
    return picked


def generate(
    regime: str, n: int, seed: int = 0, *, world: World | None = None, split: BigramSplit | None = None
) -> list[Trace]:
    """``n`` golden traces of a regime: prompts with the world's faithful execution as steps.

    Args:
        regime: one of :data:`REGIMES`.
        n: number of prompts (>= 0).
        seed: the prompt seed.
        world: the world (default :func:`default_world`).
        split: the bigram split (default ``bigram_split(K, seed=0)``).

    For ``sft`` with ``n`` large enough (8 for the default world), the set contains every
    skill and every routing.
    """
    spec = _regime(regime)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    world = world or default_world()
    split = split or bigram_split(world.n_skills)
    if split.labels.shape != (world.n_skills,) * 2:
        raise ValueError(f"the bigram split is for {split.labels.shape[0]} skills, the world has {world.n_skills}")
    rng = np.random.default_rng([seed, spec.code])
    candidates = regime_programs(regime, split)
    if len(candidates) == 0:
        raise ValueError(f"the bigram split (seed {split.seed}) allows no {regime} program")

    skills = candidates[rng.integers(len(candidates), size=n)]
    routes = rng.integers(world.n_routes, size=(n, spec.depth))
    if regime == "sft":
        cover = _cover(candidates, world.n_skills, rng)
        n_cover = min(n, max(len(cover), -(-world.n_routes // spec.depth)))
        if n_cover:
            skills[: len(cover[:n_cover])] = np.stack(cover[:n_cover])
            slots = np.resize(rng.permutation(world.n_routes), n_cover * spec.depth)
            routes[:n_cover] = rng.permutation(slots).reshape(n_cover, spec.depth)
        perm = rng.permutation(n)
        skills, routes = skills[perm], routes[perm]

    lengths = rng.integers(MIN_INPUT_LEN, MAX_INPUT_LEN + 1, size=n)
    chars = rng.integers(world.n_chars, size=(n, MAX_INPUT_LEN))
    source = {"kind": "golden", "regime": regime, "seed": seed, "split_seed": split.seed}
    traces = []
    for i in range(n):
        x = "".join(world.alphabet[c] for c in chars[i, : lengths[i]])
        program = [(world.routes[r].name, world.skills[k].name) for r, k in zip(routes[i], skills[i])]
        traces.append(golden_trace(f"{regime}-{i:06d}", x, program, world, source))
    return traces
