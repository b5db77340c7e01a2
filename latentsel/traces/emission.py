"""From traces to the arrays the models see (:class:`latentsel.models.data.HLSMData`).

For every observed step the batch executor applies all R*K modules to the teacher-forced
history ``[x, h_1, ..., h_{t-1}]`` and counts the positions where each output agrees with
``y_t``. A hidden step's entry is the output of the module executed there (DESIGN §4), so the
hidden steps of a trace and the observed steps whose routings can read them (``World.readable``)
form a block: the executor enumerates every path of distinct hidden outputs and counts the
matches of those observed steps on each. Work is chunked, so memory stays bounded for any
corpus size.
"""
from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np

from latentsel._compiled import use_compiled
from latentsel.models.data import HiddenBlocks, HLSMData
from latentsel.models.registry import model_spec
from latentsel.traces import Trace
from latentsel.traces.columns import TraceColumns
from latentsel.traces.format import MAX_HIDDEN_RUN, echo, hidden_run_error
from latentsel.world import World
from latentsel.world.executor import PAD, apply_all, apply_distinct, encode

__all__ = ["build_data", "MAX_HIDDEN_RUN"]


COMPILED_FROM = 32_768
"""Steps from which the statistics are built by the compiled executor (when the world's modules
have compiled twins): below it numba's start costs more than it saves."""


def _matcher(world: World, steps: int):
    """The compiled match counts for ``steps`` steps of ``world``, or ``None`` (the vectorized executor)."""
    if not use_compiled(steps, COMPILED_FROM):
        return None
    from latentsel.world.compiled import compiled_matcher  # numba loads only where it pays back
    return compiled_matcher(world)


def _block_plan(tr: Trace, world: World) -> tuple[list[int], dict[int, list[int]]] | None:
    """The block of a trace: its enumerated hidden steps and, per level l (1..J), the observed
    steps that read a hidden entry after l of them (0-based steps). ``None`` if no observed
    step reads a hidden entry.

    Raises ValueError for hidden steps the enumeration cannot read (:func:`hidden_run_error`:
    more than ``MAX_HIDDEN_RUN`` in a row before an observed step), as the trace reader does."""
    reason = hidden_run_error(tr.steps)
    if reason is not None:
        raise ValueError(f"trace {echo(tr.id)}: {reason}")
    needed, readers = set(), []
    for t in reversed(range(tr.depth)):
        # entry e of step t's history is h_e: the input (e = 0) or step e - 1
        read = {e - 1 for e in world.readable(t + 1) if e >= 1 and tr.steps[e - 1] is None}
        if tr.steps[t] is not None and read:
            readers.append(t)
            needed |= read
        elif tr.steps[t] is None and t in needed:
            needed |= read
    if not readers:
        return None
    hidden = sorted(needed)
    levels: dict[int, list[int]] = {}
    for t in sorted(readers):
        levels.setdefault(sum(h < t for h in hidden), []).append(t)
    return hidden, levels


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


def _read_rows(world: World, h_codes, h_lens, node_owner, plans, items, level: int, y_codes, y_lens, chunk: int):
    """The read rows of the level-``level`` nodes: every node with every observed step its
    block reads at that level. Returns ``(node: int32[Q], step: int32[Q], match: int8[Q, R, K])``."""
    steps_of = [plans[b][1].get(level, []) for b in range(len(items))]
    count = np.array([len(steps_of[b]) for b in node_owner], dtype=np.int64)
    node = np.repeat(np.arange(node_owner.size), count)
    step = np.array([t for b in node_owner for t in steps_of[b]], dtype=np.int32)
    trace = np.array([i for i, _ in items], dtype=np.int64)[node_owner[node]] if node.size else node
    match = np.empty((node.size, world.n_routes, world.n_skills), dtype=np.int8)
    compiled = _matcher(world, node.size)
    if compiled is not None:
        rows = np.arange(node.size)
        compiled(match[:, None], (rows, np.zeros_like(rows)), h_codes, h_lens, node, step + 1, y_codes, y_lens,
                 (trace, step + 1))
        return node.astype(np.int32), step, match
    for lo in range(0, node.size, chunk):
        sl = slice(lo, lo + chunk)
        out, out_lens, owner, index = apply_distinct(world, h_codes[node[sl]], h_lens[node[sl]], step[sl] + 1)
        rows = lo + owner  # the job of each distinct routed string
        distinct = _match(out[:, None], out_lens[:, None], y_codes[trace[rows], step[rows] + 1],
                          y_lens[trace[rows], step[rows] + 1], world.max_len)[:, 0]
        match[sl] = distinct[index]
    return node.astype(np.int32), step, match


def _build_blocks(world: World, codes, lens, items, t_max: int, chunk: int) -> HiddenBlocks:
    """The blocks ``items = [(trace, (hidden steps, {level: observed steps}))]`` with the same
    number J of hidden steps. ``codes, lens``: the teacher-forced histories ``[N, T + 1, W]``
    (hidden entries are placeholders, replaced along each path)."""
    plans = [plan for _, plan in items]
    j = len(plans[0][0])
    trace = np.array([i for i, _ in items], dtype=np.int32)
    hidden_steps = np.array([plan[0] for plan in plans], dtype=np.int32).reshape(trace.size, j)
    h_codes, h_lens = codes[trace, :t_max], lens[trace, :t_max]
    owner = np.arange(trace.size)
    nodes, parents, owners, read_node, read_step, read_match = [], [], [], [], [], []
    for level in range(j):
        hidden = hidden_steps[owner, level]  # the hidden step enumerated at this level
        parts, offset = [], 0
        for sl, out, out_lens in _apply_chunked(world, h_codes, h_lens, hidden + 1, chunk):
            node, parent, u_codes, u_lens = _distinct(out, out_lens, sl.start)
            parts.append((node + offset, parent, u_codes, u_lens))
            offset += parent.size
        nodes.append(np.concatenate([p[0] for p in parts]).astype(np.int32))
        parent = np.concatenate([p[1] for p in parts])
        parents.append(parent.astype(np.int32))
        # each distinct output extends its parent's history at the hidden step's entry
        h_codes, h_lens = h_codes[parent], h_lens[parent].copy()
        rows = np.arange(parent.size)
        h_codes[rows, hidden[parent] + 1] = np.concatenate([p[2] for p in parts])
        h_lens[rows, hidden[parent] + 1] = np.concatenate([p[3] for p in parts])
        owner = owner[parent]
        owners.append(owner.astype(np.int32))
        node, step, match = _read_rows(world, h_codes, h_lens, owner, plans, items, level + 1, codes, lens, chunk)
        read_node.append(node)
        read_step.append(step)
        read_match.append(match)
    return HiddenBlocks(trace, hidden_steps, tuple(nodes), tuple(parents), tuple(owners), tuple(read_node),
                        tuple(read_step), tuple(read_match))


def _program(traces: Sequence[Trace], world: World, depth: np.ndarray) -> np.ndarray:
    """int32[sum depth]: route * K + skill of every step of ``traces``, in trace order."""
    k_n = world.n_skills
    programs = [tr.program for tr in traces]
    if None in programs:
        raise ValueError(f"trace {traces[programs.index(None)].id!r} states no program: only the grammar model applies")
    short = np.fromiter(map(len, programs), dtype=np.int64, count=len(traces)) != depth
    if short.any():
        tr = traces[int(np.argmax(short))]
        raise ValueError(f"trace {echo(tr.id)}: {len(tr.steps)} steps but a program of {len(tr.program)}")
    module_of = {(r, k): i * k_n + j for i, r in enumerate(world.route_names) for j, k in enumerate(world.skill_names)}
    try:
        return np.fromiter(map(module_of.__getitem__, chain.from_iterable(programs)), dtype=np.int32,
                           count=int(depth.sum()))
    except (KeyError, TypeError):  # pairs as lists, or an unknown module (the world's lookup names it)
        return np.array([world.route_index(r) * k_n + world.skill_index(k) for tr in traces for r, k in tr.program],
                        dtype=np.int32)


def _columns_program(traces: TraceColumns, world: World) -> np.ndarray:
    """:func:`_program` of a block read as columns (its names were checked against ``world``)."""
    traces.check_world(world)
    missing = traces.modules[np.cumsum(traces.depth) - traces.depth] < 0  # a trace's first step
    if missing.any():
        raise ValueError(f"trace {traces.ids[int(np.argmax(missing))]!r} states no program: only the grammar "
                         "model applies")
    return traces.modules


def _encode(traces: Sequence[Trace], world: World, depth: np.ndarray, t_max: int):
    """``(codes: uint8[N, T + 1, W], lens: int32[N, T + 1], hidden)``: every trace's input and
    steps in one encoding, and the traces with a hidden step (its entry a placeholder ``""``:
    the steps that read it are in the block, whose tree replaces it by every executed output)."""
    strings = list(chain.from_iterable(chain((tr.input,), tr.steps) for tr in traces))
    hidden = [i for i, tr in enumerate(traces) if None in tr.steps] if None in strings else []
    first = np.concatenate([[0], np.cumsum(depth + 1)])  # each trace's input in ``strings``
    for i in hidden:
        lo = int(first[i]) + 1
        strings[lo: lo + int(depth[i])] = ["" if y is None else y for y in traces[i].steps]
    flat_codes, flat_lens = encode(strings, world)
    filled = np.arange(t_max + 1) <= depth[:, None]
    codes = np.full((len(traces), t_max + 1, world.max_len), PAD, dtype=np.uint8)
    lens = np.zeros((len(traces), t_max + 1), dtype=np.int32)
    codes[filled], lens[filled] = flat_codes, flat_lens
    return codes, lens, hidden


def build_data(traces: Sequence[Trace], world: World, *, model: str = "modular", chunk: int = 16_384,
               max_depth: int | None = None) -> HLSMData:
    """The emission statistics, intended modules, masks and hidden-step blocks of a corpus.

    Args:
        traces: the corpus; steps may be hidden (``None``), at most 2 in a row before an
            observed step.
        world: the world the traces live in.
        model: ``modular`` / ``entangled`` need every trace to state its program; ``grammar``
            ignores the programs.
        chunk: histories per executor call (bounds memory: ``chunk * R * K * max_len`` bytes).
        max_depth: the deepest trace accepted (``None``: any); the arrays are ``[N, deepest, R, K]``.
    Raises:
        ValueError naming the trace for an empty corpus, a missing program, or hidden steps
        that cannot be enumerated.
    """
    if len(traces) == 0:
        raise ValueError("the corpus is empty: no traces to fit")
    n = len(traces)
    columns = isinstance(traces, TraceColumns)
    depth = traces.depth if columns else np.fromiter(map(len, (tr.steps for tr in traces)), dtype=np.int64, count=n)
    t_max = int(depth.max())
    if max_depth is not None and t_max > max_depth:
        deep = traces[int(np.argmax(depth))]
        raise ValueError(f"trace {echo(deep.id)} has {t_max} steps; the deepest trace accepted is max_depth={max_depth}")
    r_n, k_n = world.n_routes, world.n_skills
    match = np.empty((n, t_max, r_n, k_n), dtype=np.int8)  # every cell is written below
    step_mask = np.arange(t_max) < depth[:, None]
    route_int = np.zeros((n, t_max), dtype=np.int32)
    skill_int = np.zeros((n, t_max), dtype=np.int32)

    spec = model_spec(model)
    if spec.uses_program:
        # the programs flattened in trace order fill the step mask's cells in C order
        flat = _columns_program(traces, world) if columns else _program(traces, world, depth)
        route_int[step_mask], skill_int[step_mask] = np.divmod(flat, k_n)
    if columns:  # the inputs and steps as the reader's columns hold them (a hidden step as "")
        codes, lens = traces.codes(world)
        hidden_traces = traces.hidden.tolist()
    else:
        codes, lens, hidden_traces = _encode(traces, world, depth, t_max)
    free = step_mask.copy()
    items = []
    for i in hidden_traces:
        plan = _block_plan(traces[i], world)
        if plan is not None:
            items.append((i, plan))
            free[i, plan[0]] = False
            for reads in plan[1].values():
                free[i, reads] = False
    observed = step_mask.copy()
    for i in hidden_traces:
        steps = traces[i].steps
        observed[i, : len(steps)] = [y is not None for y in steps]
    emit = observed & free
    length = np.where(observed, lens[:, 1:], 0).astype(np.int32)

    match[~emit] = -1  # no step, or a step whose emission is not its match counts
    jobs_n, jobs_t = np.nonzero(emit)
    compiled = _matcher(world, jobs_n.size)
    if compiled is not None:  # the default world's modules: one compiled pass, no outputs written
        compiled(match, (jobs_n, jobs_t), codes, lens, jobs_n, jobs_t + 1, codes, lens, (jobs_n, jobs_t + 1))
    else:
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
    for j in sorted({len(plan[0]) for _, plan in items}):
        group = [it for it in items if len(it[1][0]) == j]
        groups.append(_build_blocks(world, codes, lens, group, t_max, chunk))
    return HLSMData(match, length, step_mask, route_int, skill_int, world.n_chars, world.max_len, emit, free,
                    tuple(groups))
