"""Which modules are consistent with an observed step: the executor's view of aliasing.

A module is *consistent* with step t of a trace when applying it to the (teacher-forced)
history ``[x, y_1, ..., y_{t-1}]`` gives exactly ``y_t``. Steps with several consistent
modules cannot be attributed to one of them from that step alone (DESIGN §2, §6).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentsel.traces import Trace
from latentsel.world import World
from latentsel.world.executor import apply_all, encode_histories

__all__ = ["consistent_modules"]


def consistent_modules(traces: Sequence[Trace], world: World, *, chunk: int = 20_000) -> list[np.ndarray]:
    """For each trace, ``bool[L, R, K]``: which modules reproduce each observed step exactly.

    Rows of unobserved steps (and of steps after an unobserved one, whose history is not
    known) are all False. Work is chunked to bound memory (``chunk`` histories at a time).
    """
    jobs = []  # (trace index, step index, history, target)
    for i, tr in enumerate(traces):
        history = [tr.input]
        for t, y in enumerate(tr.steps):
            if y is None:
                break
            jobs.append((i, t, list(history), y))
            history.append(y)
    out = [np.zeros((tr.depth, world.n_routes, world.n_skills), dtype=bool) for tr in traces]
    for lo in range(0, len(jobs), chunk):
        part = jobs[lo: lo + chunk]
        codes, lens, depth = encode_histories([j[2] for j in part], world)
        out_codes, out_lens = apply_all(world, codes, lens, depth)
        y_codes, y_lens = encode_histories([[j[3]] for j in part], world)[:2]
        same = (out_lens == y_lens[:, 0, None, None]) & (out_codes == y_codes[:, 0, None, None, :]).all(axis=-1)
        for (i, t, _, _), row in zip(part, same):
            out[i][t] = row
    return out
