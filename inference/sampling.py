"""Exact posterior samples of the selections (r_t, k_t, u_t) of every step.

* Modular and entangled models: the steps outside blocks are independent given the trace,
  so each is drawn from its exact joint posterior; a block is drawn top-down on its tree of
  hidden outputs, each level from its exact conditional given the levels above.
* Grammar: sequential conditioning. p(z_1 | D) is exact; clamping z_1 and recomputing gives
  p(z_2 | z_1, D), and so on — ``depth`` exact passes per trace layout.
* Off-module flags are drawn last, from p(u_t = 1 | z_t, y_t); hidden steps are on-module.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentsel.inference.blocks import block_arrays, block_factors
from latentsel.inference.chain_blocks import chain_block_posterior, layouts
from latentsel.inference.corpus import block_chunks, corpus_posterior
from latentsel.models.data import HLSMData, emission_table, log_p_off

__all__ = ["Selections", "sample_selections"]


class Selections(NamedTuple):
    """S posterior draws: ``route, skill: int[S, N, T]`` (-1 past a trace's depth) and
    ``off: bool[S, N, T]`` (False on hidden steps and past the depth)."""

    route: np.ndarray
    skill: np.ndarray
    off: np.ndarray


def _categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One draw per row of unnormalized ``weights: [..., M]``: ``int[...]``."""
    cdf = np.cumsum(weights, axis=-1)
    u = rng.random(cdf.shape[:-1] + (1,)) * cdf[..., -1:]
    return np.minimum((cdf <= u).sum(axis=-1), weights.shape[-1] - 1)


def _p_off_given(match, y_len, params, data: HLSMData) -> np.ndarray:
    """p(u = 1 | z, y) from the match count ``m`` of y under z (-1: lengths differ)."""
    table = np.asarray(emission_table(params.noise, params.off_module, data.n_chars, data.max_len))
    off = params.off_module * np.exp(np.asarray(log_p_off(np.asarray(y_len, float), data.n_chars, data.max_len)))
    return off / table[y_len, match.astype(np.int64) + 1]


def _sample_blocks(model, params, data, g, rng, n_samples):
    """Draws of a block group's selections: ``z: int[S, B, j + 1]`` (z = r K + k)."""
    j, b = g.n_hidden, g.trace.size
    factors = block_factors(model, data.n_chars, data.max_len, params, block_arrays(data), jax.tree.map(jnp.asarray, g))
    priors, emit = jax.tree.map(np.asarray, factors)
    priors = [p.reshape(b, -1) for p in priors]
    emit = emit.reshape(emit.shape[0], -1)  # [L, S_states], off summed out
    owner_leaf = g.owners[-1]
    values = [None] * (j + 1)
    values[j] = (priors[j][owner_leaf] * emit).sum(axis=1)  # [L]
    for level in reversed(range(j)):
        owner = np.arange(b) if level == 0 else g.owners[level - 1]
        values[level] = (priors[level][owner] * values[level + 1][g.nodes[level].reshape(len(owner), -1)]).sum(axis=1)
    node = np.broadcast_to(np.arange(b), (n_samples, b))
    z = np.zeros((n_samples, b, j + 1), dtype=np.int64)
    for level in range(j):
        table = g.nodes[level].reshape(-1, priors[0].shape[1])
        owner = np.arange(b) if level == 0 else g.owners[level - 1]
        weights = priors[level][owner[node]] * values[level + 1][table[node]]
        z[..., level] = _categorical(rng, weights)
        node = table[node, z[..., level]]
    z[..., j] = _categorical(rng, priors[j][owner_leaf[node]] * emit[node])
    return z


def _sample_chain(params, data, rng, n_samples):
    """Grammar draws for every trace: ``z: int[S, N, T]`` (-1 past the depth)."""
    n, t_max = data.step_mask.shape
    z = np.full((n_samples, n, t_max), -1)
    for layout in layouts(data, rows=np.arange(n)):
        rows = np.tile(layout.traces, n_samples)
        big = layout._replace(traces=rows, dense=tuple(np.tile(d, (n_samples,) + (1,) * (d.ndim - 1))
                                                       for d in layout.dense))
        clamp = np.full((rows.size, layout.depth), -1)
        for t in range(layout.depth):
            joint = np.asarray(chain_block_posterior(params, data, big, clamp)[1][:, t])
            clamp[:, t] = _categorical(rng, joint.reshape(rows.size, -1))
        z[:, layout.traces, : layout.depth] = clamp.reshape(n_samples, layout.traces.size, layout.depth)
    return z


def sample_selections(model: str, params, data: HLSMData, n_samples: int, seed: int = 0) -> Selections:
    """``n_samples`` exact draws from p(r, k, u | D, θ) of every trace (numpy, float64)."""
    rng = np.random.default_rng(seed)
    n, t_max = data.step_mask.shape
    k_n = data.n_skills
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        if model == "grammar":
            z = _sample_chain(params, data, rng, n_samples)
        else:
            post = corpus_posterior(model, params, data)
            flat = post.joint_probs.reshape(n, t_max, -1)
            z = _categorical(rng, np.broadcast_to(flat, (n_samples,) + flat.shape))
            for group in data.blocks:
                for g in block_chunks(group, n):
                    zb = _sample_blocks(model, params, data, g, rng, n_samples)
                    steps = g.step[:, None] - g.n_hidden + np.arange(g.n_hidden + 1)[None, :]
                    z[:, g.trace[:, None], steps] = zb
    z = np.where(data.step_mask[None], z, -1)
    route, skill = np.where(z >= 0, z // k_n, -1), np.where(z >= 0, z % k_n, -1)
    zc = np.maximum(z, 0)
    # the observed step's match under the drawn module: free steps from ``match``; block
    # steps from their leaves, which the draws above reached
    m = np.take_along_axis(data.match.reshape(n, t_max, -1)[None], zc[..., None], axis=-1)[..., 0]
    observed = data.emit.copy()
    for g in data.blocks:
        observed[g.trace, g.step] = True
        m[:, g.trace, g.step] = _block_match(g, zc, k_n)
    p_off = _p_off_given(m, np.broadcast_to(data.length, m.shape), params, data)
    off = observed[None] & (rng.random(z.shape) < np.where(observed[None], p_off, 0.0))
    return Selections(route, skill, off)


def _block_match(g, z, k_n):
    """The match of each block's observed step under the drawn path: ``int[S, B]``."""
    j = g.n_hidden
    node = np.broadcast_to(np.arange(g.trace.size), (z.shape[0], g.trace.size))
    for level in range(j):
        table = g.nodes[level].reshape(-1, g.nodes[level].shape[1] * g.nodes[level].shape[2])
        node = table[node, z[:, g.trace, g.step - j + level]]
    return g.leaf_match.reshape(g.leaf_match.shape[0], -1)[node, z[:, g.trace, g.step]]
