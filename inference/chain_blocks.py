"""Exact inference on grammar-model traces with hidden-step blocks.

The grammar model is a chain over executed modules z_t = (r_t, k_t); a block (j = 1 or 2
hidden steps and the observed step after them) makes the emission of its observed step a
factor of all j + 1 states, ψ(z_{t-j}, ..., z_t). Traces with the same layout (depth,
blocks, observed steps) are run together through a scaled forward pass over the dense
S = R·K state space, with each block a clique of j + 1 states. As in
:mod:`latentsel.inference.blocks`, the marginals, the expected transition counts (start row
included) and the noise and off-module counts are the gradient of the log evidence with
respect to log potentials; the MAP path is a Viterbi pass over the same layout.

Cost: O(S^(j+1)) per block and trace — fine for j = 1, heavy for j = 2 in a large world.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentsel.inference.blocks import emission_coefs, leaf_emission

__all__ = ["ChainLayout", "layouts", "layout_log_evidence", "chain_block_posterior", "chain_block_map"]


class ChainLayout(NamedTuple):
    """The traces of one layout: ``traces: int[G]``; ``depth``; ``emit``: per step, whether its
    emission is ``match``; ``blocks``: ``((observed step, j), ...)``; ``dense``: per block,
    ``int8[G, S, ..., S, R, K]`` (j state axes), the observed step's match given the hidden states."""

    traces: np.ndarray
    depth: int
    emit: tuple
    blocks: tuple
    dense: tuple


def layouts(data, rows=None) -> list[ChainLayout]:
    """Group the traces of ``data`` that have blocks (or the traces ``rows``) by layout, with
    each block's dense match table."""
    where = {int(i): [] for i in rows} if rows is not None else {}
    for g in data.blocks:
        for b, (i, t) in enumerate(zip(g.trace.tolist(), g.step.tolist())):
            if rows is None or i in where:
                where.setdefault(i, []).append((t, g.n_hidden, g, b))
    groups: dict = {}
    depth = data.step_mask.sum(axis=1)
    for i, items in where.items():
        items.sort(key=lambda it: it[0])
        key = (int(depth[i]), tuple(bool(e) for e in data.emit[i, : depth[i]]), tuple((t, j) for t, j, _, _ in items))
        groups.setdefault(key, []).append((i, items))
    out = []
    s = data.n_routes * data.n_skills
    for (d, emit, blocks), members in groups.items():
        dense = []
        for pos in range(len(blocks)):
            tables = []
            for _, items in members:
                _, j, g, b = items[pos]
                node = g.nodes[0][b].reshape(s)
                for level in range(1, j):
                    node = g.nodes[level][node].reshape((s,) * (level + 1))
                tables.append(g.leaf_match[node])
            dense.append(np.stack(tables))
        out.append(ChainLayout(np.array([i for i, _ in members]), d, emit, blocks, tuple(dense)))
    return out


def _transition(log_rt, log_st, r_n, k_n):
    rt, st = jnp.exp(log_rt), jnp.exp(log_st)
    tm = (rt[:r_n, None, :, None] * st[None, :k_n, None, :]).reshape(r_n * k_n, r_n * k_n)
    start = (rt[r_n][:, None] * st[k_n][None, :]).reshape(-1)
    return tm, start


def _step_emission(emit, match, length, coefs, mu, n_chars, max_len):
    """p(y_t | z_t) of the free steps: ``[G, T, S]`` (1 where the step is not observed)."""
    g_n, t_n = match.shape[:2]
    e = leaf_emission(match.reshape(g_n * t_n, *match.shape[2:]), length.reshape(-1), coefs, mu.reshape(-1),
                      n_chars, max_len).reshape(g_n, t_n, -1)
    return jnp.where(jnp.asarray(emit)[None, :, None], e, 1.0)


def _block_emission(dense, y_len, mu, coefs, n_chars, max_len):
    """p(y_t | hidden states, z_t) of a block: ``dense: int8[G, S, ..., R, K]``, ``y_len, mu: [G]`` -> ``[G, S, ..., S]``."""
    r_n, k_n = dense.shape[-2:]
    rep = dense[0].size // (r_n * k_n)
    e = leaf_emission(dense.reshape(-1, r_n, k_n), jnp.repeat(y_len, rep), coefs, jnp.repeat(mu, rep), n_chars,
                      max_len)
    return e.reshape(dense.shape[:-2] + (r_n * k_n,))


def layout_log_evidence(key, n_chars, max_len, log_rt, log_st, coefs, lam, mu, match, length, dense_tables):
    depth, emit, blocks = key
    r_n, k_n = log_rt.shape[-1], log_st.shape[-1]
    tm, start = _transition(log_rt, log_st, r_n, k_n)
    pot = jnp.exp(lam)  # [G, T, S]
    e_free = _step_emission(emit, match, length, coefs, mu, n_chars, max_len)
    starts = {t - j: (t, j, pos) for pos, (t, j) in enumerate(blocks)}
    alpha, log_z, t = None, 0.0, 0
    while t < depth:
        pred = start[None] if alpha is None else alpha @ tm
        if t in starts:
            t_obs, j, pos = starts[t]
            e = _block_emission(dense_tables[pos], length[:, t_obs], mu[:, t_obs], coefs, n_chars, max_len)
            w = pred * pot[:, t]
            if j == 1:
                a = jnp.einsum("gx,xz,gxz->gz", w, tm, e)
            else:
                a = jnp.einsum("gx,xy,gy,yz,gxyz->gz", w, tm, pot[:, t + 1], tm, e)
            a = a * pot[:, t_obs]
            t = t_obs + 1
        else:
            a = pred * pot[:, t] * e_free[:, t]
            t += 1
        z = a.sum(axis=-1)
        alpha = a / z[:, None]
        log_z = log_z + jnp.log(z)
    return jnp.sum(log_z), log_z


@partial(jax.jit, static_argnames=("key", "n_chars", "max_len"))
def _posterior(key, n_chars, max_len, params, match, length, dense_tables, lam):
    g_n, depth = match.shape[0], key[0]
    r_n, k_n = params.route_trans.shape[-1], params.skill_trans.shape[-1]
    dtype = jnp.result_type(params.noise, float)
    coefs = emission_coefs(params.noise, params.off_module, n_chars)
    mu = jnp.zeros((g_n, depth), dtype)
    grad = jax.grad(layout_log_evidence, argnums=(3, 4, 5, 6, 7), has_aux=True)
    (d_rt, d_st, d_coefs, d_lam, d_mu), log_ev = grad(key, n_chars, max_len, jnp.log(params.route_trans),
                                                      jnp.log(params.skill_trans), coefs, lam, mu, match, length,
                                                      dense_tables)
    return log_ev, d_lam.reshape(g_n, depth, r_n, k_n), d_mu, d_rt, d_st, d_coefs


def chain_block_posterior(params, data, layout: ChainLayout, clamp=None):
    """Exact results for the traces of one layout.

    ``clamp: int[G, depth]``, if given, conditions step t on z_t = clamp[:, t] = r K + k
    where it is ≥ 0 (the evidence then includes that event).
    Returns ``(log_evidence [G], joint_probs [G, depth, R, K], p_off [G, depth],
    route_counts [R + 1, R], skill_counts [K + 1, K], noise_counts [2], off_counts [2])``.
    """
    rows = layout.traces
    match = jnp.asarray(data.match[rows, : layout.depth])
    length = jnp.asarray(data.length[rows, : layout.depth])
    key = (layout.depth, layout.emit, layout.blocks)
    s = data.n_routes * data.n_skills
    lam = np.zeros((rows.size, layout.depth, s))
    if clamp is not None:
        lam = np.where((clamp[..., None] < 0) | (clamp[..., None] == np.arange(s)), 0.0, -np.inf)
    log_ev, joint, p_off, d_rt, d_st, (la, lb, l_on, l_off) = _posterior(
        key, data.n_chars, data.max_len, jax.tree.map(jnp.asarray, params), match, length,
        tuple(jnp.asarray(d) for d in layout.dense), jnp.asarray(lam, jnp.result_type(params.noise, float)))
    return log_ev, joint, p_off, d_rt, d_st, jnp.stack([lb, la]), jnp.stack([l_off, l_on])


@partial(jax.jit, static_argnames=("key", "n_chars", "max_len"))
def _map_factors(key, n_chars, max_len, params, match, length, dense_tables):
    """Log transition, start, free-step emissions ``[G, T, S]`` and block emissions."""
    r_n, k_n = params.route_trans.shape[-1], params.skill_trans.shape[-1]
    tm, start = _transition(jnp.log(params.route_trans), jnp.log(params.skill_trans), r_n, k_n)
    coefs = emission_coefs(params.noise, params.off_module, n_chars)
    zeros = jnp.zeros(length.shape)
    e_free = _step_emission(key[1], match, length, coefs, zeros, n_chars, max_len)
    dense_e = tuple(jnp.log(_block_emission(dense, length[:, t_obs], zeros[:, t_obs], coefs, n_chars, max_len))
                    for (t_obs, _), dense in zip(key[2], dense_tables))
    return jnp.log(tm), jnp.log(start), jnp.log(e_free), dense_e


def chain_block_map(params, data, layout: ChainLayout) -> np.ndarray:
    """The Viterbi path of each trace of the layout, off flags summed out: ``int[G, depth, 2]``."""
    r_n, k_n = data.n_routes, data.n_skills
    s = r_n * k_n
    rows = layout.traces
    key = (layout.depth, layout.emit, layout.blocks)
    with jax.enable_x64(True):
        log_tm, log_start, e_free, dense_e = jax.tree.map(np.asarray, _map_factors(
            key, data.n_chars, data.max_len, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params),
            jnp.asarray(data.match[rows, : layout.depth]), jnp.asarray(data.length[rows, : layout.depth]),
            tuple(jnp.asarray(d) for d in layout.dense)))
    g_n = rows.size
    starts = {t - j: (t, j, pos) for pos, (t, j) in enumerate(layout.blocks)}
    delta, back, t = None, [], 0  # back: (first step, last step, argmax table [G, S] -> earlier states)
    while t < layout.depth:
        if delta is None:
            d1, bp1 = np.broadcast_to(log_start, (g_n, s)), None
        else:
            cand = delta[:, :, None] + log_tm[None]
            d1, bp1 = cand.max(axis=1), cand.argmax(axis=1)
        if t in starts:
            t_obs, j, pos = starts[t]
            score = d1[:, :, None] + log_tm[None]  # [G, z_t-j, z_next]
            if j == 2:
                score = score[..., None] + log_tm[None, None]
            score = score + dense_e[pos]
            flat = score.reshape(g_n, -1, s)
            delta, arg = flat.max(axis=1), flat.argmax(axis=1)
            back.append((t, t_obs, bp1, arg, j))
            t = t_obs + 1
        else:
            delta = d1 + e_free[:, t]
            back.append((t, t, bp1, None, 0))
            t += 1
    path = np.zeros((g_n, layout.depth), dtype=np.int64)
    z = delta.argmax(axis=1)
    rows_g = np.arange(g_n)
    for first, last, bp1, arg, j in reversed(back):
        path[:, last] = z
        if j:
            inner = np.unravel_index(arg[rows_g, z], (s,) * j)
            for level in range(j):
                path[:, first + level] = inner[level]
        z_first = path[:, first]
        if bp1 is not None:
            z = bp1[rows_g, z_first]
    return np.stack([path // k_n, path % k_n], axis=-1)
