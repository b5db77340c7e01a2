"""The arrays a model sees: emission statistics, intended modules and masks.

The emission of step t under module (r, k) depends on the data only through ``len(y_t)``
and ``m``, the number of positions where ``y_t`` agrees with the module's output ``e``
(``m = -1`` when the lengths differ). :class:`HLSMData` holds those counts, so the emission
tensor for any ``noise`` and ``off_module`` is a lookup in a small table (:func:`emission`)
or, in log space, one fused expression (:func:`log_emission`).

Hidden steps (DESIGN §4). A hidden step is on-module and noise-free: its history entry is
the output of the module the policy executed there, and every later step whose routing can
read that entry reads it. So the selections of the hidden steps of a trace are enumerated
jointly with every later observed step that can read one of them: such a trace's hidden
steps and those observed steps form its *block* (:class:`HiddenBlocks`). Many modules give
the same hidden output, so a block stores a tree: level l holds the *distinct* paths of
hidden outputs of the block's first l hidden steps, and each hidden step's (r, k) maps a
level-l node to a level-(l + 1) node. An observed step after l of the block's hidden steps
holds its match counts under every module at every level-l node (one *read row* per node).
Hidden steps that no later step can read (directly, or through a hidden step that is read)
contribute a factor 1 and stay outside the block.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from latentsel.models.registry import model_spec

__all__ = ["HLSMData", "HiddenBlocks", "TreeTables", "tree_tables", "log_p_on", "log_p_off", "log_emission", "emission_table", "emission", "previous_intended",
           "execution_rows"]


class HiddenBlocks(NamedTuple):
    """The B blocks of a corpus that have J enumerated hidden steps (J = ``len(nodes)``).

    Level 0 is the block itself (node b = block b); level l (1..J) holds the distinct paths of
    the outputs of the block's first l hidden steps.

    Attributes:
        trace: int32[B], the trace of each block.
        hidden: int32[B, J], the hidden steps (0-based, ascending).
        nodes: J arrays; ``nodes[l]: int32[n_l, R, K]`` maps a level-l node and the selection
            (r, k) of hidden step l + 1 to a level-(l + 1) node (``n_0 = B``).
        parents: J arrays; ``parents[l]: int32[n_{l+1}]``, the level-l node of each level-(l + 1) node.
        owners: J arrays; ``owners[l]: int32[n_{l+1}]``, the block of each level-(l + 1) node.
        read_node: J arrays; ``read_node[l]: int32[Q_l]``, the level-(l + 1) node of each read
            row (rows ordered by node, then by step).
        read_step: J arrays; ``read_step[l]: int32[Q_l]``, the observed step (0-based) of each row.
        read_match: J arrays; ``read_match[l]: int8[Q_l, R, K]``, that step's match under each
            module on the node's history (-1 where the lengths differ).
    """

    trace: np.ndarray
    hidden: np.ndarray
    nodes: tuple
    parents: tuple
    owners: tuple
    read_node: tuple
    read_step: tuple
    read_match: tuple

    @property
    def n_hidden(self) -> int:
        return len(self.nodes)

    @property
    def n_blocks(self) -> int:
        return int(self.trace.shape[0])

    def steps(self, t_max: int) -> np.ndarray:
        """bool[B, t_max]: the steps of each block (its hidden steps and the observed steps it reads)."""
        out = np.zeros((self.n_blocks, t_max), dtype=bool)
        out[np.arange(self.n_blocks)[:, None], self.hidden] = True
        for level in range(self.n_hidden):
            out[self.owners[level][self.read_node[level]], self.read_step[level]] = True
        return out

    def reads(self) -> list[tuple]:
        """Per block, its observed reading steps as sorted ``(level, step)`` pairs (level 1..J)."""
        out = [set() for _ in range(self.n_blocks)]
        for level in range(self.n_hidden):
            for b, t in zip(self.owners[level][self.read_node[level]].tolist(), self.read_step[level].tolist()):
                out[b].add((level + 1, t))
        return [tuple(sorted(s)) for s in out]

    def node_index(self, route, skill, levels: int | None = None) -> np.ndarray:
        """The level-``levels`` node (default J) of each block reached by the selections
        ``route, skill: int[..., B, J]`` of its hidden steps: ``int[..., B]``."""
        node = np.broadcast_to(np.arange(self.n_blocks), np.shape(route)[:-1])
        for level in range(self.n_hidden if levels is None else levels):
            node = self.nodes[level][node, route[..., level], skill[..., level]]
        return node

    def select(self, keep, trace_map) -> "HiddenBlocks":
        """The blocks where ``keep: bool[B]``, their traces renumbered by ``trace_map``."""
        keep = np.asarray(keep, dtype=bool)
        parent_new = np.cumsum(keep) - 1
        parent_keep = keep
        nodes, parents, owners, read_node, read_step, read_match = [], [], [], [], [], []
        block_new = parent_new
        for level in range(self.n_hidden):
            # every child of a kept parent belongs to the same block, so it is kept too
            child_keep = parent_keep[self.parents[level]]
            child_new = np.cumsum(child_keep) - 1
            nodes.append(child_new[self.nodes[level][parent_keep]].astype(np.int32))
            parents.append(parent_new[self.parents[level][child_keep]].astype(np.int32))
            owners.append(block_new[self.owners[level][child_keep]].astype(np.int32))
            rows = child_keep[self.read_node[level]]
            read_node.append(child_new[self.read_node[level][rows]].astype(np.int32))
            read_step.append(self.read_step[level][rows])
            read_match.append(self.read_match[level][rows])
            parent_keep, parent_new = child_keep, child_new
        return HiddenBlocks(trace_map[self.trace[keep]].astype(np.int32), self.hidden[keep], tuple(nodes),
                            tuple(parents), tuple(owners), tuple(read_node), tuple(read_step), tuple(read_match))


class TreeTables(NamedTuple):
    """A block group's tree as flat tables, for the generative programs.

    Nodes of every level share one numbering: level 0 (the blocks) first, then level 1, …

    Attributes:
        child: int32[G, R, K], the node a hidden step's (r, k) leads to (a leaf maps to itself).
        row_at: int32[G, T], the read row of step t at the node or its ancestor at the step's
            level, -1 where the node's block does not read step t (or not yet).
        read_steps: int32[B, P], the steps each block reads, ascending, -1 padding.
        row_trace: int32[Q], row_step: int32[Q], read_match: int8[Q, R, K]: every read row.
    """

    child: np.ndarray
    row_at: np.ndarray
    read_steps: np.ndarray
    row_trace: np.ndarray
    row_step: np.ndarray
    read_match: np.ndarray


def tree_tables(g: HiddenBlocks, t_max: int) -> TreeTables:
    """The flat tables of a block group (see :class:`TreeTables`)."""
    sizes = [g.n_blocks] + [p.size for p in g.parents]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    r_n, k_n = g.nodes[0].shape[1:]
    child = np.empty((offsets[-1], r_n, k_n), dtype=np.int32)
    for level, n in enumerate(sizes):
        lo = offsets[level]
        if level < g.n_hidden:
            child[lo:lo + n] = g.nodes[level] + offsets[level + 1]
        else:
            child[lo:lo + n] = (lo + np.arange(n))[:, None, None]
    row_at = np.full((offsets[-1], t_max), -1, dtype=np.int32)
    row_base = np.concatenate([[0], np.cumsum([q.size for q in g.read_node])])
    for level in range(g.n_hidden):
        lo = offsets[level + 1]
        if level:  # inherit the rows of the ancestors
            row_at[lo:lo + sizes[level + 1]] = row_at[offsets[level] + g.parents[level]]
        q = np.arange(g.read_node[level].size)
        row_at[lo + g.read_node[level], g.read_step[level]] = row_base[level] + q
    steps = [[t for _, t in reads] for reads in g.reads()]
    width = max((len(s) for s in steps), default=0)
    read_steps = np.full((g.n_blocks, max(width, 1)), -1, dtype=np.int32)
    for b, s in enumerate(steps):
        read_steps[b, :len(s)] = s
    row_trace = np.concatenate([g.trace[g.owners[level][g.read_node[level]]] for level in range(g.n_hidden)])
    row_step = np.concatenate(g.read_step)
    return TreeTables(child, row_at, read_steps, row_trace.astype(np.int32), row_step.astype(np.int32),
                      np.concatenate(g.read_match))


class HLSMData(NamedTuple):
    """A padded corpus of N traces of at most T steps.

    Attributes:
        match: int8[N, T, R, K]; positions where y_t agrees with module (r, k)'s output on
            the teacher-forced history, or -1 where the lengths differ (or no such step).
        length: int32[N, T]; len(y_t) (0 where there is no observed step).
        step_mask: bool[N, T]; True for t < depth of the trace.
        route_intended: int32[N, T]; c_t^r (0 where there is no step or no program).
        skill_intended: int32[N, T]; c_t^k.
        n_chars: A, the alphabet size.
        max_len: MAX_LEN.
        emit_mask: bool[N, T]; the observed steps whose emission is ``match`` (no routing
            can read a hidden entry of their history). ``None``: every step.
        free_mask: bool[N, T]; the steps outside every block (``emit_mask`` and the hidden
            steps that nothing reads). ``None``: every step.
        blocks: the :class:`HiddenBlocks` groups, one per number of enumerated hidden steps.
    """

    match: np.ndarray
    length: np.ndarray
    step_mask: np.ndarray
    route_intended: np.ndarray
    skill_intended: np.ndarray
    n_chars: int
    max_len: int
    emit_mask: np.ndarray | None = None
    free_mask: np.ndarray | None = None
    blocks: tuple = ()

    @property
    def emit(self) -> np.ndarray:
        return self.step_mask if self.emit_mask is None else self.emit_mask

    @property
    def free(self) -> np.ndarray:
        return self.step_mask if self.free_mask is None else self.free_mask

    def arrays(self) -> tuple:
        """The per-step arrays, the argument of the jitted inference functions."""
        return (*self[:5], self.emit, self.free)

    @classmethod
    def from_arrays(cls, arrays, n_chars: int, max_len: int) -> "HLSMData":
        return cls(*arrays[:5], n_chars, max_len, arrays[5], arrays[6])

    @property
    def n_traces(self) -> int:
        return self.match.shape[0]

    @property
    def n_routes(self) -> int:
        return self.match.shape[2]

    @property
    def n_skills(self) -> int:
        return self.match.shape[3]

    @property
    def has_block(self) -> np.ndarray:
        """bool[N]: the traces with at least one block."""
        out = np.zeros(self.n_traces, dtype=bool)
        for g in self.blocks:
            out[g.trace] = True
        return out

    @property
    def block_observed(self) -> np.ndarray:
        """bool[N, T]: the observed steps of the blocks (those that read a hidden entry)."""
        out = np.zeros(self.step_mask.shape, dtype=bool)
        for g in self.blocks:
            for level in range(g.n_hidden):
                out[g.trace[g.owners[level][g.read_node[level]]], g.read_step[level]] = True
        return out

    @property
    def block_steps(self) -> np.ndarray:
        """bool[N, T]: the steps inside blocks (enumerated hidden steps and the observed steps
        that read them)."""
        out = np.zeros(self.step_mask.shape, dtype=bool)
        for g in self.blocks:
            out[g.trace] |= g.steps(self.step_mask.shape[1])
        return out

    def take(self, index) -> "HLSMData":
        """The traces at ``index`` (a slice or an index array), with their blocks."""
        if isinstance(index, slice) and not self.blocks:
            # a chunk of a corpus without blocks: views of the arrays, no O(N) work per chunk
            masks = {name: None if getattr(self, name) is None else getattr(self, name)[index]
                     for name in ("emit_mask", "free_mask")}
            return self._replace(**{name: getattr(self, name)[index] for name in self._fields[:5]}, **masks)
        rows = np.arange(self.n_traces)[index]
        trace_map = np.full(self.n_traces, -1)
        trace_map[rows] = np.arange(rows.size)
        blocks = tuple(g.select(trace_map[g.trace] >= 0, trace_map) for g in self.blocks)
        arrays = tuple(a[rows] for a in self.arrays())
        return HLSMData(*arrays[:5], self.n_chars, self.max_len, arrays[5], arrays[6],
                        tuple(g for g in blocks if g.trace.size))

    def without_blocks(self) -> "HLSMData":
        return self._replace(blocks=())


def log_p_off(length, n_chars: int, max_len: int, xp=jnp):
    """log p_off(y) = -len(y) log A - log(MAX_LEN + 1); ``length: [...]`` -> ``[...]``
    (``xp``: the array module, ``jnp`` or ``np``)."""
    return -length * xp.log(n_chars) - xp.log(max_len + 1.0)


def log_p_on(data: HLSMData, noise):
    """log p_on(y_t | e_{r,k}) = m log(1 - noise) + (len - m) log(noise / (A - 1)):
    ``[N, T, R, K]``, -inf where the lengths differ."""
    match = jnp.asarray(data.match)
    length = jnp.asarray(data.length)[..., None, None]
    return jnp.where(
        match >= 0,
        match * jnp.log1p(-noise) + (length - match) * (jnp.log(noise) - jnp.log(data.n_chars - 1.0)),
        -jnp.inf,
    )


def previous_intended(data: HLSMData, xp=jnp):
    """The previous step's intended routing and skill, ``R`` / ``K`` (start) at t = 1:
    ``(int[N, T], int[N, T])``, the context index of the entangled model (``xp``: the array
    module, ``jnp`` or ``np``)."""
    cr, ck = xp.asarray(data.route_intended), xp.asarray(data.skill_intended)
    prev_r = xp.concatenate([xp.full_like(cr[:, :1], data.n_routes), cr[:, :-1]], axis=1)
    prev_k = xp.concatenate([xp.full_like(ck[:, :1], data.n_skills), ck[:, :-1]], axis=1)
    return prev_r, prev_k


def execution_rows(model: str, route_p, skill_p, data: HLSMData):
    """p(r_t | program) and p(k_t | program) of every step: ``([N, T, R], [N, T, K])``.

    ``route_p`` / ``skill_p`` are ``route_exec`` / ``skill_exec`` (modular) or
    ``route_exec_ctx`` / ``skill_exec_ctx`` (entangled).
    """
    spec = model_spec(model)
    if spec.chain:
        raise ValueError(f"execution rows are for models that use the program, not the chain {model!r}")
    cr, ck = jnp.asarray(data.route_intended), jnp.asarray(data.skill_intended)
    if spec.context:
        prev_r, prev_k = previous_intended(data)
        return jnp.asarray(route_p)[prev_r, cr], jnp.asarray(skill_p)[prev_k, ck]
    return jnp.asarray(route_p)[cr], jnp.asarray(skill_p)[ck]


def log_emission(data: HLSMData, noise, off_module):
    """log p(y_t | r_t, k_t) with the off-module flag summed out: ``[N, T, R, K]``.

    ``(1 - off) p_on(y | e) + off p_off(y)`` with
    ``p_on = (1 - noise)^m (noise / (A - 1))^(len - m)`` (0 when the lengths differ).
    Steps outside ``emit_mask`` get 0.
    """
    off = log_p_off(jnp.asarray(data.length)[..., None, None], data.n_chars, data.max_len)
    le = jnp.logaddexp(jnp.log1p(-off_module) + log_p_on(data, noise), jnp.log(off_module) + off)
    return jnp.where(jnp.asarray(data.emit)[..., None, None], le, 0.0)


def emission_table(noise, off_module, n_chars: int, max_len: int, xp=jnp):
    """p(y | r, k) for every (len(y), m): ``[max_len + 1, max_len + 2]``, column ``m + 1``
    (column 0 is m = -1, lengths differ). Entries with m > len are unused. ``xp``: the array
    module (``np`` computes it in numpy, float64, without a JAX dispatch per operation)."""
    length = xp.arange(max_len + 1.0)[:, None]
    m = xp.arange(-1.0, max_len + 1.0)[None, :]
    on = xp.where(
        (m >= 0) & (m <= length),
        xp.exp(m * xp.log1p(-noise) + (length - m) * (xp.log(noise) - xp.log(n_chars - 1.0))),
        0.0,
    )
    return (1 - off_module) * on + off_module * xp.exp(log_p_off(length, n_chars, max_len, xp))


def on_module_positions(table, off, max_len: int, xp=jnp):
    """The on-module part of :func:`emission_table` (``off``: the off-module term π p_off(y) by
    length) times the matched and the mismatched positions, for every (len(y), m):
    ``(matched, mismatched)``, each ``[max_len + 1, max_len + 2]`` (column ``m + 1``; 0 where m
    is not a count of len(y)). The E-step sums them over the posterior: both are summed
    directly, not one as len(y) p(u = 0 | y) minus the other, which loses the digits of a tiny
    noise."""
    length = xp.arange(max_len + 1.0)[:, None]
    m = xp.arange(-1.0, max_len + 1.0)[None, :]
    valid = (m >= 0) & (m <= length)
    on = table - off[:, None]
    return xp.where(valid, on * m, 0.0), xp.where(valid, on * (length - m), 0.0)


def emission(data: HLSMData, noise, off_module):
    """p(y_t | r_t, k_t) with the off flag summed out, by table lookup: ``[N, T, R, K]``
    (1 outside ``emit_mask``). Float64 holds it without underflow for any step of the world."""
    table = emission_table(noise, off_module, data.n_chars, data.max_len)
    length = jnp.asarray(data.length)
    # one flat index into the table: a 1-D gather, not a 2-D one
    p = table.ravel()[(length * (data.max_len + 2))[..., None, None] + jnp.asarray(data.match).astype(jnp.int32) + 1]
    return jnp.where(jnp.asarray(data.emit)[..., None, None], p, 1.0)
