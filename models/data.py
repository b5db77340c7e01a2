"""The arrays a model sees: emission statistics, intended modules and masks.

The emission of step t under module (r, k) depends on the data only through ``len(y_t)``
and ``m``, the number of positions where ``y_t`` agrees with the module's output ``e``
(``m = -1`` when the lengths differ). :class:`HLSMData` holds those counts, so the emission
tensor for any ``noise`` and ``off_module`` is a lookup in a small table (:func:`emission`)
or, in log space, one fused expression (:func:`log_emission`).

Hidden steps (DESIGN §4). A hidden step is on-module and noise-free, so the observed step
after a run of j = 1 or 2 hidden steps depends on the selections of all j + 1 steps: such a
run and its observed step form a *block* (:class:`HiddenBlocks`), enumerated jointly. Many
modules give the same hidden output, so a block stores a tree: each hidden step's (r, k)
maps to one of the *distinct* outputs given the path so far, and each leaf (a distinct path
of hidden outputs) holds the match counts of the observed step under every module. Steps
after a block's observed step read a hidden entry of their history as the intended module's
output on the teacher-forced history (the block's own observed step sees the enumerated
one). Hidden steps with no observed step after them contribute a factor 1.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = ["HLSMData", "HiddenBlocks", "log_p_on", "log_p_off", "log_emission", "emission_table", "emission", "previous_intended",
           "execution_rows"]


class HiddenBlocks(NamedTuple):
    """The B blocks of a corpus that have j hidden steps (j = ``len(nodes)``, 1 or 2).

    Block b covers steps ``step[b] - j, ..., step[b]`` of trace ``trace[b]``; the last is observed.

    Attributes:
        trace: int32[B]; step: int32[B], the observed step (0-based).
        nodes: j arrays; ``nodes[0]: int32[B, R, K]`` maps the first hidden step's (r, k) to a
            level-1 node, ``nodes[l]: int32[n_l, R, K]`` maps a level-l node and the next hidden
            step's (r, k) to a level-(l + 1) node. The last level's nodes are the leaves.
        owners: j arrays; ``owners[l]: int32[n_{l+1}]``, the block of each level-(l + 1) node.
        leaf_match: int8[n_j, R, K]; the observed step's match under each module, given the
            leaf's hidden outputs (-1 where the lengths differ).
    """

    trace: np.ndarray
    step: np.ndarray
    nodes: tuple
    owners: tuple
    leaf_match: np.ndarray

    @property
    def n_hidden(self) -> int:
        return len(self.nodes)

    def select(self, keep, trace_map) -> "HiddenBlocks":
        """The blocks where ``keep: bool[B]``, their traces renumbered by ``trace_map``."""
        keep_node = np.asarray(keep)
        nodes, owners = [], []
        block_new = np.cumsum(keep_node) - 1
        parent_keep = keep_node
        for node, owner in zip(self.nodes, self.owners):
            # every child of a kept parent belongs to the same block, so it is kept too
            child_keep = keep_node[owner]
            child_new = np.cumsum(child_keep) - 1
            nodes.append(child_new[node[parent_keep]].astype(np.int32))
            owners.append(block_new[owner[child_keep]].astype(np.int32))
            parent_keep = child_keep
        return HiddenBlocks(trace_map[self.trace[keep_node]].astype(np.int32), self.step[keep_node], tuple(nodes),
                            tuple(owners), self.leaf_match[parent_keep])


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
        emit_mask: bool[N, T]; the observed steps whose emission is ``match`` (not after a
            hidden step). ``None``: every step.
        free_mask: bool[N, T]; the steps outside every block (``emit_mask`` and trailing
            hidden steps). ``None``: every step.
        blocks: the :class:`HiddenBlocks` groups, one per number of hidden steps.
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
        """bool[N, T]: the observed steps of the blocks."""
        out = np.zeros(self.step_mask.shape, dtype=bool)
        for g in self.blocks:
            out[g.trace, g.step] = True
        return out

    def take(self, index) -> "HLSMData":
        """The traces at ``index`` (a slice or an index array), with their blocks."""
        rows = np.arange(self.n_traces)[index]
        trace_map = np.full(self.n_traces, -1)
        trace_map[rows] = np.arange(rows.size)
        blocks = tuple(g.select(trace_map[g.trace] >= 0, trace_map) for g in self.blocks)
        arrays = tuple(a[rows] for a in self.arrays())
        return HLSMData(*arrays[:5], self.n_chars, self.max_len, arrays[5], arrays[6],
                        tuple(g for g in blocks if g.trace.size))

    def without_blocks(self) -> "HLSMData":
        return self._replace(blocks=())


def log_p_off(length, n_chars: int, max_len: int):
    """log p_off(y) = -len(y) log A - log(MAX_LEN + 1); ``length: [...]`` -> ``[...]``."""
    return -length * jnp.log(n_chars) - jnp.log(max_len + 1.0)


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


def previous_intended(data: HLSMData):
    """The previous step's intended routing and skill, ``R`` / ``K`` (start) at t = 1:
    ``(int[N, T], int[N, T])``, the context index of the entangled model."""
    cr, ck = jnp.asarray(data.route_intended), jnp.asarray(data.skill_intended)
    prev_r = jnp.concatenate([jnp.full_like(cr[:, :1], data.n_routes), cr[:, :-1]], axis=1)
    prev_k = jnp.concatenate([jnp.full_like(ck[:, :1], data.n_skills), ck[:, :-1]], axis=1)
    return prev_r, prev_k


def execution_rows(model: str, route_p, skill_p, data: HLSMData):
    """p(r_t | program) and p(k_t | program) of every step: ``([N, T, R], [N, T, K])``.

    ``route_p`` / ``skill_p`` are ``route_exec`` / ``skill_exec`` (modular) or
    ``route_exec_ctx`` / ``skill_exec_ctx`` (entangled).
    """
    cr, ck = jnp.asarray(data.route_intended), jnp.asarray(data.skill_intended)
    if model == "modular":
        return jnp.asarray(route_p)[cr], jnp.asarray(skill_p)[ck]
    if model == "entangled":
        prev_r, prev_k = previous_intended(data)
        return jnp.asarray(route_p)[prev_r, cr], jnp.asarray(skill_p)[prev_k, ck]
    raise ValueError(f"execution rows are for the modular and entangled models, not {model!r}")


def log_emission(data: HLSMData, noise, off_module):
    """log p(y_t | r_t, k_t) with the off-module flag summed out: ``[N, T, R, K]``.

    ``(1 - off) p_on(y | e) + off p_off(y)`` with
    ``p_on = (1 - noise)^m (noise / (A - 1))^(len - m)`` (0 when the lengths differ).
    Steps outside ``emit_mask`` get 0.
    """
    off = log_p_off(jnp.asarray(data.length)[..., None, None], data.n_chars, data.max_len)
    le = jnp.logaddexp(jnp.log1p(-off_module) + log_p_on(data, noise), jnp.log(off_module) + off)
    return jnp.where(jnp.asarray(data.emit)[..., None, None], le, 0.0)


def emission_table(noise, off_module, n_chars: int, max_len: int):
    """p(y | r, k) for every (len(y), m): ``[max_len + 1, max_len + 2]``, column ``m + 1``
    (column 0 is m = -1, lengths differ). Entries with m > len are unused."""
    length = jnp.arange(max_len + 1.0)[:, None]
    m = jnp.arange(-1.0, max_len + 1.0)[None, :]
    on = jnp.where(
        (m >= 0) & (m <= length),
        jnp.exp(m * jnp.log1p(-noise) + (length - m) * (jnp.log(noise) - jnp.log(n_chars - 1.0))),
        0.0,
    )
    return (1 - off_module) * on + off_module * jnp.exp(log_p_off(length, n_chars, max_len))


def emission(data: HLSMData, noise, off_module):
    """p(y_t | r_t, k_t) with the off flag summed out, by table lookup: ``[N, T, R, K]``
    (1 outside ``emit_mask``). Float64 holds it without underflow for any step of the world."""
    table = emission_table(noise, off_module, data.n_chars, data.max_len)
    length = jnp.asarray(data.length)
    p = table[length[..., None, None], jnp.asarray(data.match).astype(jnp.int32) + 1]
    return jnp.where(jnp.asarray(data.emit)[..., None, None], p, 1.0)
