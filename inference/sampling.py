"""Exact posterior samples of the selections (r_t, k_t, u_t) of every step.

* Modular and entangled models: the steps outside blocks are independent given the trace,
  so each is drawn from its exact joint posterior; a block is drawn top-down on its tree of
  hidden outputs, each hidden step from its exact conditional given the ones before it, and
  the observed steps that read them given the node reached.
* Grammar: sequential conditioning. p(z_1 | D) is exact; clamping z_1 and recomputing gives
  p(z_2 | z_1, D), and so on — ``depth`` exact passes per trace layout.
* Off-module flags are drawn last, from p(u_t = 1 | z_t, y_t); hidden steps are on-module.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from latentsel.inference.blocks import block_sample, emission_coefs
from latentsel.inference.chain_blocks import chain_block_posterior, layouts, tile
from latentsel.inference.corpus import block_chunks, corpus_posterior
from latentsel.models.data import HLSMData
from latentsel.models.registry import model_spec

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
    """p(u = 1 | z, y) from the match count ``m`` of y under z (-1: lengths differ), in log space."""
    coefs = tuple(np.asarray(c) for c in emission_coefs(params.noise, params.off_module, data.n_chars))
    m = np.asarray(match)
    y = np.asarray(y_len, dtype=np.float64)
    log_off = coefs[3] - y * np.log(data.n_chars) - np.log(data.max_len + 1.0)
    mm = np.maximum(m, 0)
    log_on = np.where(m >= 0, coefs[2] + mm * coefs[0] + (y - mm) * coefs[1], -np.inf)
    return np.exp(log_off - np.logaddexp(log_on, log_off))


def _sample_chain(params, data, rng, n_samples):
    """Grammar draws for every trace: ``z: int[S, N, T]`` (-1 past the depth)."""
    n, t_max = data.step_mask.shape
    z = np.full((n_samples, n, t_max), -1)
    for layout in layouts(data, rows=np.arange(n)):
        big = tile(layout, n_samples)
        rows = big.traces
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
        if model_spec(model).chain:
            z = _sample_chain(params, data, rng, n_samples)
        else:
            post = corpus_posterior(model, params, data)
            flat = post.joint_probs.reshape(n, t_max, -1)
            z = _categorical(rng, np.broadcast_to(flat, (n_samples,) + flat.shape))
            for group in data.blocks:
                for g in block_chunks(group, n):
                    zb = block_sample(model, params, data, g, rng, n_samples)
                    bi, ti = np.nonzero(g.steps(t_max))
                    z[:, g.trace[bi], ti] = zb[:, bi, ti]
    z = np.where(data.step_mask[None], z, -1)
    route, skill = np.where(z >= 0, z // k_n, -1), np.where(z >= 0, z % k_n, -1)
    zc = np.maximum(z, 0)
    # the observed step's match under the drawn module: free steps from ``match``; block
    # steps under the drawn hidden outputs (grammar: the chain's draws of them)
    m = np.take_along_axis(data.match.reshape(n, t_max, -1)[None], zc[..., None], axis=-1)[..., 0]
    observed = data.emit | data.block_observed
    if data.blocks:
        m = np.where(data.block_observed[None], _block_read_match(data, zc), m)
    p_off = _p_off_given(m, np.broadcast_to(data.length, m.shape), params, data)
    off = observed[None] & (rng.random(z.shape) < np.where(observed[None], p_off, 0.0))
    return Selections(route, skill, off)


def _block_read_match(data: HLSMData, z) -> np.ndarray:
    """The match of each observed block step under the drawn path ``z: int[S, N, T]`` (z = r K + k;
    the drawn hidden selections pick the node): ``int[S, N, T]``, -2 at the other steps."""
    out = np.full(z.shape, -2)
    k_n = data.n_skills
    for g in data.blocks:
        hidden = np.take_along_axis(z[:, g.trace], g.hidden[None], axis=-1)  # [S, B, J]
        for level in range(g.n_hidden):
            node = g.node_index(hidden // k_n, hidden % k_n, levels=level + 1)  # [S, B]
            block = g.owners[level][g.read_node[level]]
            s_idx, q_idx = np.nonzero(node[:, block] == g.read_node[level][None])
            trace, step = g.trace[block[q_idx]], g.read_step[level][q_idx]
            flat = g.read_match[level].reshape(-1, data.n_routes * data.n_skills)
            out[s_idx, trace, step] = flat[q_idx, z[s_idx, trace, step]]
    return out
