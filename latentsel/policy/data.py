"""Prompt pools and token batches for training.

Training prompts are golden traces of a regime of :mod:`latentsel.traces.regimes`, or ``toy``
(uniformly random modules, depth 1 or 2). A :class:`PromptStream` draws fresh prompts at every
step (``pool=0``, the default: no prompt is seen twice, so the policy cannot memorize its data)
or from a fixed, seeded pool; either way a step's prompts depend only on ``(seed, step)``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from latentsel.policy.tokenizer import Tokenizer
from latentsel.traces import Trace, golden_trace
from latentsel.traces.regimes import PROMPT_REGIMES, bigram_split, generate
from latentsel.world import World

__all__ = ["Batch", "POOL_REGIMES", "PromptStream", "prompt_pool", "toy_prompts", "collate", "sft_pairs"]

POOL_REGIMES = ("toy", *PROMPT_REGIMES)
TOY_DEPTHS = (1, 2)


class Batch(NamedTuple):
    """Right-padded next-token data: ``inputs, targets: long[B, T]``; ``mask: float[B, T]`` is 1
    where the target is a completion token (the loss is over completions only)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def toy_prompts(n: int, seed: int, world: World, depths: Sequence[int] = TOY_DEPTHS) -> list[Trace]:
    """``n`` golden traces of programs with uniformly random modules and depths; inputs as in the regimes."""
    rng = np.random.default_rng([seed, 0x70F])
    depth = rng.choice(np.asarray(depths), size=n)
    source = {"kind": "golden", "regime": "toy", "seed": seed}
    traces = []
    for i in range(n):
        x = "".join(world.alphabet[c] for c in rng.integers(world.n_chars, size=rng.integers(4, 9)))
        program = [(world.routes[rng.integers(world.n_routes)].name, world.skills[rng.integers(world.n_skills)].name)
                   for _ in range(depth[i])]
        traces.append(golden_trace(f"toy-{i:06d}", x, program, world, source))
    return traces


def prompt_pool(regime: str, n: int, seed: int, world: World, split_seed: int = 0) -> list[Trace]:
    """``n`` golden traces of ``regime`` (one of :data:`POOL_REGIMES`)."""
    if regime == "toy":
        return toy_prompts(n, seed, world)
    if regime not in PROMPT_REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {', '.join(POOL_REGIMES)}")
    return generate(regime, n, seed, world=world, split=bigram_split(world.n_skills, split_seed))


class PromptStream:
    """The prompts of a training run: ``batch(step, n)`` gives the ``n`` prompts of a step."""

    def __init__(self, regime: str, pool: int, seed: int, world: World, split_seed: int = 0):
        if regime not in POOL_REGIMES:
            raise ValueError(f"unknown regime {regime!r}; choose from {', '.join(POOL_REGIMES)}")
        if pool < 0:
            raise ValueError(f"pool must be >= 0 (0: fresh prompts every step), got {pool}")
        self.regime, self.seed, self.world = regime, seed, world
        self.split = bigram_split(world.n_skills, split_seed)
        self.pool = prompt_pool(regime, pool, seed, world, split_seed) if pool else None
        self.depth = max(TOY_DEPTHS) if regime == "toy" else PROMPT_REGIMES[regime].depth

    def batch(self, step: int, n: int) -> list[Trace]:
        rng = np.random.default_rng([self.seed, step, 0x5F7])
        if self.pool is not None:
            return [self.pool[i] for i in rng.integers(len(self.pool), size=n)]
        seed = int(rng.integers(2**62))
        if self.regime == "toy":
            return toy_prompts(n, seed, self.world)
        return generate(self.regime, n, seed, world=self.world, split=self.split, cover=False)


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int, device) -> Batch:
    """A :class:`Batch` of ``(prompt ids, completion ids)`` pairs, right-padded."""
    width = max(len(p) + len(c) for p, c in pairs) - 1
    inputs = torch.full((len(pairs), width), pad, dtype=torch.long)
    targets = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width))
    for i, (p, c) in enumerate(pairs):
        seq = torch.as_tensor([*p, *c], dtype=torch.long)
        inputs[i, : len(seq) - 1] = seq[:-1]
        targets[i, : len(seq) - 1] = seq[1:]
        mask[i, len(p) - 1: len(seq) - 1] = 1.0
    return Batch(inputs.to(device), targets.to(device), mask.to(device))


def sft_pairs(traces: Sequence[Trace], tok: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, golden completion ids)`` per trace."""
    return [(tok.encode_prompt(t.input, t.program), tok.encode_completion(t.steps)) for t in traces]
