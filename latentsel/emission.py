"""From traces to the arrays the models see (:class:`latentsel.models.data.HLSMData`).

For every observed step the batch executor applies all R*K modules to the teacher-forced
history ``[x, y_1, ..., y_{t-1}]`` and counts the positions where each output agrees with
``y_t``. Work is chunked, so memory stays bounded for any corpus size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentsel.batch import apply_all, encode
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

    strings = []
    for i, tr in enumerate(traces):
        if model != "grammar":
            if tr.program is None:
                raise ValueError(f"trace {tr.id!r} states no program: only the grammar model applies")
            for t, (r, k) in enumerate(tr.program):
                route_int[i, t], skill_int[i, t] = world.route_index(r), world.skill_index(k)
        for t, y in enumerate(tr.steps):
            if y is None:
                raise ValueError(f"trace {tr.id!r} step {t + 1} is not observed; hidden steps are not supported yet")
        step_mask[i, : tr.depth] = True
        strings.append(tr.input)
        strings.extend(tr.steps)
        strings.extend([""] * (t_max - tr.depth))
    # every trace's full teacher-forced history, encoded once: [N, T + 1, W]
    codes, lens = encode(strings, world)
    codes = codes.reshape(n, t_max + 1, world.max_len)
    lens = lens.reshape(n, t_max + 1)
    length[:] = np.where(step_mask, lens[:, 1:], 0)

    jobs_n, jobs_t = np.nonzero(step_mask)
    for lo in range(0, jobs_n.size, chunk):
        jn, jt = jobs_n[lo: lo + chunk], jobs_t[lo: lo + chunk]
        # the executor reads only the first ``depth`` entries of each history
        out, out_lens = apply_all(world, codes[jn, :t_max], lens[jn, :t_max], (jt + 1).astype(np.int32))
        y, y_lens = codes[jn, jt + 1], lens[jn, jt + 1]
        agree = (out == y[:, None, None, :]).sum(axis=-1, dtype=np.int16)
        # positions past both ends are PAD on both sides; they are not agreements
        agree -= (world.max_len - y_lens)[:, None, None].astype(np.int16)
        match[jn, jt] = np.where(out_lens == y_lens[:, None, None], agree, -1)
    return HLSMData(match, length, step_mask, route_int, skill_int, world.n_chars, world.max_len)
