"""From traces to the arrays the models see (:class:`latentsel.models.data.HLSMData`).

For every observed step the batch executor applies all R*K modules to the teacher-forced
history ``[x, y_1, ..., y_{t-1}]`` and counts the positions where each output agrees with
``y_t``. Work is chunked, so memory stays bounded for any corpus size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentsel.batch import apply_all, encode, encode_histories
from latentsel.models.data import HLSMData
from latentsel.traces import Trace
from latentsel.world import World

__all__ = ["build_data"]


def build_data(traces: Sequence[Trace], world: World, *, model: str = "modular", chunk: int = 16_384) -> HLSMData:
    """The emission statistics, intended modules and masks of a corpus.

    Args:
        traces: the corpus (fully observed traces).
        world: the world the traces live in.
        model: ``modular`` / ``entangled`` need every trace to state its program; ``grammar``
            ignores the programs.
        chunk: histories per executor call (bounds memory: ``chunk * R * K * max_len`` bytes).
    Raises:
        ValueError naming the trace for an empty corpus, a missing program or a missing step.
    """
    if len(traces) == 0:
        raise ValueError("the corpus is empty: no traces to fit")
    n, t_max = len(traces), max(tr.depth for tr in traces)
    r_n, k_n = world.n_routes, world.n_skills
    match = np.full((n, t_max, r_n, k_n), -1, dtype=np.int8)
    length = np.zeros((n, t_max), dtype=np.int32)
    step_mask = np.zeros((n, t_max), dtype=bool)
    route_int = np.zeros((n, t_max), dtype=np.int32)
    skill_int = np.zeros((n, t_max), dtype=np.int32)

    jobs_n, jobs_t, histories, targets = [], [], [], []
    for i, tr in enumerate(traces):
        if model != "grammar":
            if tr.program is None:
                raise ValueError(f"trace {tr.id!r} states no program: only the grammar model applies")
            for t, (r, k) in enumerate(tr.program):
                route_int[i, t], skill_int[i, t] = world.route_index(r), world.skill_index(k)
        history = [tr.input]
        for t, y in enumerate(tr.steps):
            if y is None:
                raise ValueError(f"trace {tr.id!r} step {t + 1} is not observed; hidden steps are not supported yet")
            jobs_n.append(i)
            jobs_t.append(t)
            histories.append(list(history))
            targets.append(y)
            history.append(y)
        step_mask[i, : tr.depth] = True
        length[i, : tr.depth] = [len(y) for y in tr.steps]

    jobs_n, jobs_t = np.asarray(jobs_n), np.asarray(jobs_t)
    for lo in range(0, len(histories), chunk):
        hi = min(lo + chunk, len(histories))
        codes, lens, depth = encode_histories(histories[lo:hi], world)
        out, out_lens = apply_all(world, codes, lens, depth)  # [S, R, K, W], [S, R, K]
        y, y_lens = encode(targets[lo:hi], world)
        agree = (out == y[:, None, None, :]).sum(axis=-1, dtype=np.int16)
        # positions past both ends are PAD on both sides; they are not agreements
        agree -= (world.max_len - y_lens)[:, None, None].astype(np.int16)
        match[jobs_n[lo:hi], jobs_t[lo:hi]] = np.where(out_lens == y_lens[:, None, None], agree, -1)
    return HLSMData(match, length, step_mask, route_int, skill_int, world.n_chars, world.max_len)
