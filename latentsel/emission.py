"""From traces to the arrays the models see (:class:`latentsel.models.data.HLSMData`).

For every observed step the batch executor applies all R*K modules to the teacher-forced
history ``[x, h_1, ..., h_{t-1}]`` and counts the positions where each output agrees with
``y_t``. A history entry is the observed step, or for a hidden step the intended module's
output (the convention of :mod:`latentsel.models.data`). For a block (1–2 hidden steps and
the observed step after them) the executor enumerates every hidden path, keeping only the
distinct outputs at each level. Work is chunked, so memory stays bounded for any corpus size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentsel.batch import apply_all, apply_distinct, encode
from latentsel.models.data import HiddenBlocks, HLSMData
from latentsel.traces import Trace
from latentsel.world import World

__all__ = ["build_data", "MAX_HIDDEN_RUN"]

MAX_HIDDEN_RUN = 2


def _hidden_runs(tr: Trace, has_program: bool) -> list[tuple[int, int]]:
    """The blocks of a trace as (observed step, number of hidden steps before it), 0-based.

    Raises ValueError for a run of more than ``MAX_HIDDEN_RUN`` hidden steps before an observed
    one, and for a hidden step that later steps read when the trace states no program."""
    blocks, run = [], 0
    last_observed = max((t for t, y in enumerate(tr.steps) if y is not None), default=-1)
    for t, y in enumerate(tr.steps):
        if y is None:
            run += 1
            continue
        if run > MAX_HIDDEN_RUN:
            raise ValueError(f"trace {tr.id!r}: steps {t - run + 1}-{t} are hidden; at most {MAX_HIDDEN_RUN} "
                             f"consecutive hidden steps can precede an observed one")
        if run:
            if not has_program and t < last_observed:
                raise ValueError(f"trace {tr.id!r}: hidden step {t - run + 1} is read by the histories of later "
                                 f"observed steps, which needs the intended program (the trace states none)")
            blocks.append((t, run))
        run = 0
    return blocks


def _apply_chunked(world: World, codes, lens, depth, chunk: int):
    """``apply_all`` over ``chunk`` histories at a time; yields ``(slice, out, out_lens)``."""
    for lo in range(0, codes.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        out, out_lens = apply_all(world, codes[sl], lens[sl], depth[sl])
        yield sl, out, out_lens


def _match(out, out_lens, y, y_lens, width: int) -> np.ndarray:
    """int8[P, R, K]: positions where each output agrees with ``y: uint8[P, W]``, -1 where the lengths differ."""
    agree = (out == y[:, None, None, :]).sum(axis=-1, dtype=np.int16)
    # positions past both ends are PAD on both sides; they are not agreements
    agree -= (width - y_lens)[:, None, None].astype(np.int16)
    return np.where(out_lens == y_lens[:, None, None], agree, -1).astype(np.int8)


def _distinct(out, out_lens, first_parent: int):
    """The distinct outputs of each of the P parent histories numbered from ``first_parent``.

    Returns ``(node: int[P, R, K], parent: int[U], codes: uint8[U, W], lens: int[U])``; node
    indices count from 0 in this call, ordered by parent."""
    p, r_n, k_n, w = out.shape
    rows = np.empty((p * r_n * k_n, w + 5), dtype=np.uint8)
    # a big-endian parent id first, so that the sorted distinct rows are grouped by parent
    pid = np.repeat(np.arange(first_parent, first_parent + p, dtype=">u4"), r_n * k_n)
    rows[:, :4] = pid.view(np.uint8).reshape(-1, 4)
    rows[:, 4:4 + w] = out.reshape(-1, w)
    rows[:, 4 + w] = out_lens.reshape(-1)
    keys = rows.view(np.dtype((np.void, w + 5))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return (inverse.reshape(p, r_n, k_n), first // (r_n * k_n) + first_parent, rows[first, 4:4 + w], rows[first, 4 + w].astype(np.int32))


def _build_blocks(world: World, codes, lens, items, t_max: int, chunk: int) -> HiddenBlocks:
    """The blocks ``items = [(trace, observed step)]`` with the same number j of hidden steps."""
    j = items[0][2]
    trace = np.array([i for i, _, _ in items], dtype=np.int32)
    step = np.array([t for _, t, _ in items], dtype=np.int32)
    h_codes, h_lens, owner = codes[trace], lens[trace], np.arange(trace.size)
    nodes, owners = [], []
    for level in range(j):
        hidden = step[owner] - j + level  # the hidden step enumerated at this level
        parts, offset = [], 0
        for sl, out, out_lens in _apply_chunked(world, h_codes[:, :t_max], h_lens[:, :t_max], hidden + 1, chunk):
            node, parent, u_codes, u_lens = _distinct(out, out_lens, sl.start)
            parts.append((node + offset, parent, u_codes, u_lens))
            offset += parent.size
        nodes.append(np.concatenate([p[0] for p in parts]).astype(np.int32))
        parent = np.concatenate([p[1] for p in parts])
        # each distinct output extends its parent's history at the hidden step's entry
        h_codes, h_lens = h_codes[parent], h_lens[parent].copy()
        rows = np.arange(parent.size)
        h_codes[rows, hidden[parent] + 1] = np.concatenate([p[2] for p in parts])
        h_lens[rows, hidden[parent] + 1] = np.concatenate([p[3] for p in parts])
        owner = owner[parent]
        owners.append(owner.astype(np.int32))
    t_obs = step[owner]
    leaf_match = np.empty((owner.size, world.n_routes, world.n_skills), dtype=np.int8)
    for sl, out, out_lens in _apply_chunked(world, h_codes[:, :t_max], h_lens[:, :t_max], t_obs + 1, chunk):
        rows = np.arange(sl.start, sl.start + out.shape[0])
        leaf_match[sl] = _match(out, out_lens, h_codes[rows, t_obs[rows] + 1], h_lens[rows, t_obs[rows] + 1],
                                world.max_len)
    return HiddenBlocks(trace, step, tuple(nodes), tuple(owners), leaf_match)


def build_data(traces: Sequence[Trace], world: World, *, model: str = "modular", chunk: int = 16_384) -> HLSMData:
    """The emission statistics, intended modules, masks and hidden-step blocks of a corpus.

    Args:
        traces: the corpus; steps may be hidden (``None``), at most 2 in a row before an
            observed step.
        world: the world the traces live in.
        model: ``modular`` / ``entangled`` need every trace to state its program; ``grammar``
            ignores the programs except to fill hidden history entries.
        chunk: histories per executor call (bounds memory: ``chunk * R * K * max_len`` bytes).
    Raises:
        ValueError naming the trace for an empty corpus, a missing program, or hidden steps
        that cannot be enumerated.
    """
    if len(traces) == 0:
        raise ValueError("the corpus is empty: no traces to fit")
    n, t_max = len(traces), max(tr.depth for tr in traces)
    r_n, k_n = world.n_routes, world.n_skills
    match = np.full((n, t_max, r_n, k_n), -1, dtype=np.int8)
    step_mask = np.zeros((n, t_max), dtype=bool)
    free = np.zeros((n, t_max), dtype=bool)
    route_int = np.zeros((n, t_max), dtype=np.int32)
    skill_int = np.zeros((n, t_max), dtype=np.int32)

    route_of = {name: i for i, name in enumerate(world.route_names)}
    skill_of = {name: i for i, name in enumerate(world.skill_names)}
    strings, items = [], []
    for i, tr in enumerate(traces):
        depth = len(tr.steps)
        if tr.program is None:
            if model != "grammar":
                raise ValueError(f"trace {tr.id!r} states no program: only the grammar model applies")
            prog = None
        else:
            try:
                prog = [(route_of[r], skill_of[k]) for r, k in tr.program]
            except KeyError:  # the world's lookup names the unknown module
                prog = [(world.route_index(r), world.skill_index(k)) for r, k in tr.program]
            if model != "grammar":
                route_int[i, :depth] = [r for r, _ in prog]
                skill_int[i, :depth] = [k for _, k in prog]
        step_mask[i, :depth] = True
        free[i, :depth] = True
        strings.append(tr.input)
        if None not in tr.steps:
            strings.extend(tr.steps)
        else:
            blocks = _hidden_runs(tr, prog is not None)
            items.extend((i, t, j) for t, j in blocks)
            for t, j in blocks:
                free[i, t - j: t + 1] = False
            history = [tr.input]
            for t, y in enumerate(tr.steps):
                # a hidden entry, as later histories read it: the intended module's output
                history.append(y if y is not None else world.apply(*prog[t], history) if prog else "")
            strings.extend(history[1:])
        strings.extend([""] * (t_max - depth))
    observed = step_mask.copy()
    for i in (i for i, tr in enumerate(traces) if None in tr.steps):
        observed[i, : traces[i].depth] = [y is not None for y in traces[i].steps]
    emit = observed & free
    # every trace's full teacher-forced history, encoded once: [N, T + 1, W]
    codes, lens = encode(strings, world)
    codes = codes.reshape(n, t_max + 1, world.max_len)
    lens = lens.reshape(n, t_max + 1)
    length = np.where(observed, lens[:, 1:], 0).astype(np.int32)

    jobs_n, jobs_t = np.nonzero(emit)
    for lo in range(0, jobs_n.size, chunk):
        jn, jt = jobs_n[lo: lo + chunk], jobs_t[lo: lo + chunk]
        # the executor reads only the first ``depth`` entries of each history
        out, out_lens, owner, index = apply_distinct(world, codes[jn, :t_max], lens[jn, :t_max],
                                                     (jt + 1).astype(np.int32))
        # agreements counted once per distinct routed string, then spread over the routings
        distinct = _match(out[:, None], out_lens[:, None], codes[jn[owner], jt[owner] + 1],
                          lens[jn[owner], jt[owner] + 1], world.max_len)[:, 0]
        match[jn, jt] = distinct[index]
    groups = []
    for j in range(1, MAX_HIDDEN_RUN + 1):
        group = [it for it in items if it[2] == j]
        if group:
            groups.append(_build_blocks(world, codes, lens, group, t_max, chunk))
    return HLSMData(match, length, step_mask, route_int, skill_int, world.n_chars, world.max_len, emit, free,
                    tuple(groups))
