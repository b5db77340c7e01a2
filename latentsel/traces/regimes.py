"""Data regimes: seeded prompts (an input and an intended program) for training and evaluation.

The K*K ordered skill bigrams are split (DESIGN §7) into an SFT-seen half, an RL quarter
and a held-out quarter. The prompt regimes:

=============  =====  ==============================================================
regime         depth  skill bigrams of the program
=============  =====  ==============================================================
sft            2-3    all seen; the set covers every skill and every routing
rl-atomic      1      (none: any single module)
rl-compound    3      at least one from the RL quarter, none held out
eval-seen      3      all seen
eval-unseen    3      at least one held out
eval-ood       4      any
=============  =====  ==============================================================

A regime of several depths draws each prompt's depth uniformly. Routings are uniform at every
step; inputs have length 4 to 8, characters uniform over the
alphabet. The same ``(regime, n, seed, split_seed)`` always gives the same prompts, and
different regimes draw from independent streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from latentsel.traces import Trace, golden_trace
from latentsel.world import World, default_world

__all__ = ["PROMPT_REGIMES", "BigramSplit", "bigram_split", "generate", "regime_programs"]

SEEN, RL, HELD_OUT = 0, 1, 2
MIN_INPUT_LEN, MAX_INPUT_LEN = 4, 8


class _Regime(NamedTuple):
    depths: tuple[int, ...]
    code: int

    @property
    def depth(self) -> int:
        """The deepest program of the regime."""
        return max(self.depths)


PROMPT_REGIMES = {
    "sft": _Regime((2, 3), 0),
    "rl-atomic": _Regime((1,), 1),
    "rl-compound": _Regime((3,), 2),
    "eval-seen": _Regime((3,), 3),
    "eval-unseen": _Regime((3,), 4),
    "eval-ood": _Regime((4,), 5),
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


def regime_programs(regime: str, split: BigramSplit, depth: int | None = None) -> np.ndarray:
    """Every skill sequence of ``depth`` (default the regime's deepest) the regime allows:
    ``int[C, depth]`` (skill indices)."""
    depth = _regime(regime).depth if depth is None else depth
    key = (regime, depth, split.labels.tobytes())
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _programs(regime, split, depth)
        _PROGRAMS[key].flags.writeable = False
    return _PROGRAMS[key]


_PROGRAMS: dict = {}


def _programs(regime: str, split: BigramSplit, depth: int) -> np.ndarray:
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
        return PROMPT_REGIMES[name]
    except KeyError:
        raise KeyError(f"unknown regime {name!r}; choose from {', '.join(PROMPT_REGIMES)}") from None


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
    regime: str, n: int, seed: int = 0, *, world: World | None = None, split: BigramSplit | None = None,
    depths: Sequence[int] | None = None, cover: bool = True,
) -> list[Trace]:
    """``n`` golden traces of a regime: prompts with the world's faithful execution as steps.

    Args:
        regime: one of :data:`PROMPT_REGIMES`.
        n: number of prompts (>= 0).
        seed: the prompt seed.
        world: the world (default :func:`default_world`).
        split: the bigram split (default ``bigram_split(K, seed=0)``).
        depths: program depths to draw from (default the regime's); depth >= 2 for the
            compound regimes.
        cover: for ``sft``, make the first prompts cover every skill and every routing: with
            ``n`` large enough (8 for the default world) the set contains them all.
    """
    spec = _regime(regime)
    if depths is not None:
        depths = tuple(int(d) for d in depths)
        if regime == "rl-atomic" and depths != (1,):
            raise ValueError(f"rl-atomic programs are depth 1, got depths {list(depths)}")
        compound = regime not in ("rl-atomic", "eval-ood")
        if not depths or min(depths) < (2 if compound else 1):
            raise ValueError(f"depths for {regime} must be >= {2 if compound else 1}, got {list(depths)}")
        spec = spec._replace(depths=depths)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    world = world or default_world()
    split = split or bigram_split(world.n_skills)
    if split.labels.shape != (world.n_skills,) * 2:
        raise ValueError(f"the bigram split is for {split.labels.shape[0]} skills, the world has {world.n_skills}")
    rng = np.random.default_rng([seed, spec.code])
    candidates = {d: regime_programs(regime, split, d) for d in spec.depths}
    for d, c in candidates.items():
        if len(c) == 0:
            raise ValueError(f"the bigram split (seed {split.seed}) allows no depth-{d} {regime} program")
    if len(spec.depths) > 1:
        depth_of = np.asarray(spec.depths)[rng.integers(len(spec.depths), size=n)]
        programs = [list(candidates[d][rng.integers(len(candidates[d]))]) for d in depth_of]
        routes = [list(rng.integers(world.n_routes, size=d)) for d in depth_of]
    else:
        cands = candidates[spec.depth]
        programs = list(cands[rng.integers(len(cands), size=n)])
        routes = list(rng.integers(world.n_routes, size=(n, spec.depth)))
    if regime == "sft" and cover:
        # the first prompts cover every skill and every routing, at the deepest depth
        candidates, d = candidates[spec.depth], spec.depth
        # a single depth keeps the one greedy cover it always drew (the same prompts for a seed);
        # with several, the smallest of a few random tie-breaks fits the fewest prompts
        tries = 1 if len(spec.depths) == 1 else 8
        cover = min((_cover(candidates, world.n_skills, rng) for _ in range(tries)), key=len)
        n_cover = min(n, max(len(cover), -(-world.n_routes // d)))
        if n_cover:
            for i in range(n_cover):
                if i < len(cover):
                    programs[i] = list(cover[i])
                elif len(programs[i]) < d:
                    programs[i] = list(candidates[rng.integers(len(candidates))])
            slots = rng.permutation(np.resize(rng.permutation(world.n_routes), n_cover * d)).reshape(n_cover, d)
            routes[:n_cover] = list(slots)
        perm = rng.permutation(n)
        programs, routes = [programs[i] for i in perm], [routes[i] for i in perm]

    lengths = rng.integers(MIN_INPUT_LEN, MAX_INPUT_LEN + 1, size=n)
    chars = rng.integers(world.n_chars, size=(n, MAX_INPUT_LEN))
    source = {"kind": "golden", "regime": regime, "seed": seed, "split_seed": split.seed}
    traces = []
    for i in range(n):
        x = "".join(world.alphabet[c] for c in chars[i, : lengths[i]])
        program = [(world.routes[r].name, world.skills[k].name) for r, k in zip(routes[i], programs[i])]
        traces.append(golden_trace(f"{regime}-{i:06d}", x, program, world, source))
    return traces
