"""Exact inference on grammar-model traces with hidden-step blocks.

The grammar model is a chain over executed modules z_t = (r_t, k_t). In a trace with a block
(:class:`~latentsel.models.data.HiddenBlocks`) the emission of an observed step that reads a
hidden entry depends on the hidden outputs, that is on the node of the block's tree that the
hidden selections reach. The forward pass therefore runs over the pairs (node, z_t): at a
hidden step each node splits into its children (the child is fixed by the node and z_t), and
at a reading step each node scores the step with its own match counts. The transition
factorizes over routing and skill, so a step costs O(nodes · R K (R + K)). Everything is in
log space. Traces with the same layout (depth, observed steps, hidden steps and reading
steps) run together. As in :mod:`latentsel.inference.blocks`, the marginals, the expected
transition counts (start rows included) and the noise and off-module counts are the gradient
of the log evidence with respect to log potentials; the MAP path is a Viterbi pass over the
same pairs.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentsel.inference.blocks import emission_coefs
from latentsel.inference.logspace import log_emission_terms, log_transition, lse, segment_lse

__all__ = ["ChainLayout", "layouts", "tile", "layout_log_evidence", "chain_block_posterior", "chain_block_map"]


class ChainLayout(NamedTuple):
    """The traces of one layout.

    ``traces: int[G]``; ``depth``; ``emit``: per step, whether it is a free observed step;
    ``hidden``: the enumerated hidden steps; ``reads``: ``((level, step), ...)``, the observed
    steps that read hidden entries, after ``level`` of them; ``tree``: ``(nodes, parents,
    owners, read_rows)`` of the layout's blocks in the order of ``traces`` (see
    :class:`HiddenBlocks`), with ``read_rows[i]: int8[n_level, R, K]`` the match of reading
    step i at every node of its level.
    """

    traces: np.ndarray
    depth: int
    emit: tuple
    hidden: tuple
    reads: tuple
    tree: tuple

    @property
    def key(self) -> tuple:
        return (self.depth, self.emit, self.hidden, self.reads)


def layouts(data, rows=None) -> list[ChainLayout]:
    """Group the traces of ``data`` that have blocks (or all the traces ``rows``) by layout."""
    depth = data.step_mask.sum(axis=1)
    groups: dict = {}
    in_block = np.zeros(data.n_traces, dtype=bool)
    wanted = None if rows is None else set(np.asarray(rows).tolist())
    for gi, g in enumerate(data.blocks):
        reads = g.reads()
        for b, i in enumerate(g.trace.tolist()):
            in_block[i] = True
            if wanted is not None and i not in wanted:
                continue
            key = (int(depth[i]), tuple(bool(e) for e in data.emit[i, : depth[i]]), tuple(g.hidden[b].tolist()),
                   reads[b])
            groups.setdefault((gi, key), []).append((b, i))
    if rows is not None:
        for i in rows.tolist():
            if not in_block[i]:
                key = (int(depth[i]), tuple(bool(e) for e in data.emit[i, : depth[i]]), (), ())
                groups.setdefault((-1, key), []).append((-1, i))
    out = []
    for (gi, (d, emit, hidden, reads)), members in groups.items():
        traces = np.array([i for _, i in members])
        if gi < 0:
            out.append(ChainLayout(traces, d, emit, (), (), ((), (), (), ())))
            continue
        g = data.blocks[gi]
        keep = np.zeros(g.n_blocks, dtype=bool)
        keep[[b for b, _ in members]] = True
        sel = g.select(keep, np.arange(data.n_traces))
        traces = sel.trace.astype(np.int64)  # the group's order
        read_rows = tuple(sel.read_match[level - 1][sel.read_step[level - 1] == t] for level, t in reads)
        out.append(ChainLayout(traces, d, emit, hidden, reads, (sel.nodes, sel.parents, sel.owners, read_rows)))
    return out


def tile(layout: ChainLayout, copies: int) -> ChainLayout:
    """The layout with its traces repeated ``copies`` times (copy c of trace g at c G + g)."""
    g_n = layout.traces.size
    nodes, parents, owners, read_rows = layout.tree
    sizes = [g_n] + [p.shape[0] for p in parents]

    def rep(a, size):
        shift = (np.arange(copies) * size).reshape((copies,) + (1,) * a.ndim)
        return (a[None] + shift).reshape((-1,) + a.shape[1:])

    tree = (tuple(rep(np.asarray(n), sizes[l + 1]) for l, n in enumerate(nodes)),
            tuple(rep(np.asarray(p), sizes[l]) for l, p in enumerate(parents)),
            tuple(rep(np.asarray(o), g_n) for o in owners),
            tuple(np.tile(np.asarray(r), (copies, 1, 1)) for r in read_rows))
    return layout._replace(traces=np.tile(layout.traces, copies), tree=tree)


def layout_log_evidence(key, n_chars, max_len, log_route_trans, log_skill_trans, coefs, prior_shift, off_shift, match,
                        length, tree):
    """``(Σ log p(D_g), log p(D_g): [G])`` of the traces of one layout.

    ``prior_shift: [G, depth, R, K]`` is added to the log potential of z_t and ``off_shift: [G,
    depth]`` to the off-module branch of step t (zero; their gradients are the marginals
    p(z_t | D) and p(u_t = 1 | D)); ``match: [G, depth, R, K]`` and ``length: [G, depth]`` are
    the layout's rows of the corpus arrays.
    """
    depth, emit, hidden, reads = key
    nodes, parents, owners, read_rows = tree
    r_n, k_n = log_route_trans.shape[-1], log_skill_trans.shape[-1]
    g_n = match.shape[0]
    read_at = {t: i for i, (_, t) in enumerate(reads)}
    owner = jnp.arange(g_n)
    log_alpha = None
    for t in range(depth):
        if log_alpha is None:
            pred = jnp.broadcast_to(log_route_trans[r_n][:, None] + log_skill_trans[k_n][None, :],
                                    (owner.shape[0], r_n, k_n))
        else:
            pred = log_transition(log_alpha, log_route_trans[:r_n], log_skill_trans[:k_n])
        pred = pred + prior_shift[owner, t]
        if t in hidden:
            level = hidden.index(t)
            n_new = parents[level].shape[0]
            # node c is reached from its parent by the selections that map there
            reach = nodes[level][parents[level]] == jnp.arange(n_new)[:, None, None]
            log_alpha = jnp.where(reach, pred[parents[level]], -jnp.inf)
            owner = owners[level]
        elif t in read_at:
            log_emit = log_emission_terms(read_rows[read_at[t]], length[owner, t], coefs, off_shift[owner, t], n_chars,
                                          max_len)
            log_alpha = pred + log_emit
        elif emit[t]:
            log_alpha = pred + log_emission_terms(match[owner, t], length[owner, t], coefs, off_shift[owner, t],
                                                  n_chars, max_len)
        else:
            log_alpha = pred
    log_ev = segment_lse(lse(log_alpha, (1, 2)), owner, g_n)
    return jnp.sum(log_ev), log_ev


def _layout_arrays(data, layout: ChainLayout):
    rows = layout.traces
    return (jnp.asarray(data.match[rows, : layout.depth]), jnp.asarray(data.length[rows, : layout.depth]),
            jax.tree.map(jnp.asarray, layout.tree))


@partial(jax.jit, static_argnames=("key", "n_chars", "max_len"))
def _posterior(key, n_chars, max_len, params, match, length, tree, prior_shift):
    g_n, depth = match.shape[0], key[0]
    dtype = jnp.result_type(params.noise, float)
    coefs = emission_coefs(params.noise, params.off_module, n_chars)
    off_shift = jnp.zeros((g_n, depth), dtype)
    grad = jax.grad(layout_log_evidence, argnums=(3, 4, 5, 6, 7), has_aux=True)
    (route_counts, skill_counts, d_coefs, joint_probs, p_off), log_ev = grad(
        key, n_chars, max_len, jnp.log(params.route_trans), jnp.log(params.skill_trans), coefs, prior_shift, off_shift,
        match, length, tree)
    return log_ev, joint_probs, p_off, route_counts, skill_counts, d_coefs


def chain_block_posterior(params, data, layout: ChainLayout, clamp=None):
    """Exact results for the traces of one layout.

    ``clamp: int[G, depth]``, if given, conditions step t on z_t = clamp[:, t] = r K + k
    where it is ≥ 0 (the evidence then includes that event).
    Returns ``(log_evidence [G], joint_probs [G, depth, R, K], p_off [G, depth],
    route_counts [R + 1, R], skill_counts [K + 1, K], noise_counts [2], off_counts [2])``.
    """
    r_n, k_n = data.n_routes, data.n_skills
    g_n, s = layout.traces.size, r_n * k_n
    prior_shift = np.zeros((g_n, layout.depth, s))
    if clamp is not None:
        prior_shift = np.where((clamp[..., None] < 0) | (clamp[..., None] == np.arange(s)), 0.0, -np.inf)
    prior_shift = jnp.asarray(prior_shift.reshape(g_n, layout.depth, r_n, k_n), jnp.result_type(params.noise, float))
    log_ev, joint, p_off, route_counts, skill_counts, (matched, mismatched, on, off) = _posterior(
        layout.key, data.n_chars, data.max_len, jax.tree.map(jnp.asarray, params), *_layout_arrays(data, layout),
        prior_shift)
    return log_ev, joint, p_off, route_counts, skill_counts, jnp.stack([mismatched, matched]), jnp.stack([off, on])


def _np_log_emission(match, y_len, params, n_chars: int, max_len: int):
    """log p(y | r, k), off flag summed out, in numpy: ``match: int[n, R, K]``, ``y_len: [n]``."""
    noise, off = float(params.noise), float(params.off_module)
    log_match, log_mismatch = np.log1p(-noise), np.log(noise) - np.log(n_chars - 1.0)
    y = np.asarray(y_len, dtype=np.float64)[:, None, None]
    m = np.maximum(match, 0)
    on = np.where(match >= 0, np.log1p(-off) + m * log_match + (y - m) * log_mismatch, -np.inf)
    return np.logaddexp(on, np.log(off) - y * np.log(n_chars) - np.log(max_len + 1.0))


def chain_block_map(params, data, layout: ChainLayout) -> np.ndarray:
    """The Viterbi path of each trace of the layout, off flags summed out: ``int[G, depth, 2]``."""
    r_n, k_n = data.n_routes, data.n_skills
    depth, _, hidden, _ = layout.key
    nodes, parents, owners, read_rows = (jax.tree.map(np.asarray, part) for part in layout.tree)
    match, length = data.match[layout.traces, :depth], data.length[layout.traces, :depth]
    read_at = {t: i for i, (_, t) in enumerate(layout.reads)}
    with np.errstate(divide="ignore"):
        log_route_trans = np.log(np.asarray(params.route_trans))
        log_skill_trans = np.log(np.asarray(params.skill_trans))
    g_n = layout.traces.size
    owner = np.arange(g_n)
    delta, back = None, []  # back[t]: (best previous r, best previous k, parent of each node or None)
    for t in range(depth):
        if delta is None:
            d = np.broadcast_to(log_route_trans[r_n][:, None] + log_skill_trans[k_n][None, :], (g_n, r_n, k_n)).copy()
            br = bk = None
        else:
            s1 = delta[:, :, :, None] + log_skill_trans[None, None, :k_n, :]  # [n, R', K', K]
            best_k, v1 = s1.argmax(axis=2), s1.max(axis=2)  # [n, R', K]
            s2 = v1[:, :, None, :] + log_route_trans[None, :r_n, :, None]  # [n, R', R, K]
            br, d = s2.argmax(axis=1), s2.max(axis=1)
            bk = np.take_along_axis(best_k, br, axis=1)
        parent = None
        if t in hidden:
            level = hidden.index(t)
            parent = parents[level]
            reach = nodes[level][parent] == np.arange(parent.size)[:, None, None]
            d = np.where(reach, d[parent], -np.inf)
            owner = owners[level]
        elif t in read_at:
            d = d + _np_log_emission(read_rows[read_at[t]], length[owner, t], params, data.n_chars, data.max_len)
        elif layout.emit[t]:
            d = d + _np_log_emission(match[owner, t], length[owner, t], params, data.n_chars, data.max_len)
        back.append((br, bk, parent))
        delta = d
    flat = delta.reshape(delta.shape[0], -1)
    node_best = flat.max(axis=1)
    # per trace, the node whose best state scores highest (nodes are grouped by trace)
    order = np.lexsort((-node_best, owner))
    first = np.ones(order.size, dtype=bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    node = order[first]
    z = flat[node].argmax(axis=1)
    path = np.zeros((g_n, depth), dtype=np.int64)
    for t in reversed(range(depth)):
        path[:, t] = z
        br, bk, parent = back[t]
        if parent is not None:
            node = parent[node]
        if br is not None:
            r, k = z // k_n, z % k_n
            z = br[node, r, k] * k_n + bk[node, r, k]
    return np.stack([path // k_n, path % k_n], axis=-1)
