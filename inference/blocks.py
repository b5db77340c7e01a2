"""Exact inference on hidden-step blocks of the modular and entangled models.

A block (:class:`~latentsel.models.data.HiddenBlocks`) is j = 1 or 2 hidden steps and the
observed step after them. Its evidence sums over the j + 1 selections,

    p(y_t | ·) = Σ_{z_1} p(z_1) Σ_{z_2} p(z_2) ... Σ_{z_t} p(z_t) p(y_t | z_t, hidden outputs of z_1..z_j),

(z = (r, k); the hidden steps are on-module and noise-free), evaluated bottom-up on the
block's tree of distinct hidden outputs. Everything else comes from one gradient of the
log evidence: the selections enter as exponentials of log potentials, so the derivative of
log p(D) with respect to the log prior of (r, k) at a step is its posterior marginal, with
respect to a log execution-row entry its expected count, with respect to log(1 - noise) and
log(noise / (A - 1)) the expected matched and mismatched positions, and with respect to
log off_module / log(1 - off_module) the expected off- and on-module observed steps. The
MAP path is a max-product pass on the same tree.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentsel.models.data import HiddenBlocks

__all__ = ["BlockPosterior", "block_posterior", "block_log_evidence", "block_factors", "block_arrays",
           "emission_coefs", "block_map"]


class BlockPosterior(NamedTuple):
    """Exact results on the B blocks of one group (j hidden steps).

    log_evidence: [B], the log of each block's factor in p(D | θ); joint_probs: [B, j + 1, R, K],
    p(r, k | D) at steps ``step - j, ..., step``; p_off: [B], p(u = 1 | D) at the observed step;
    route_counts / skill_counts: expected counts, shaped like the model's rows;
    noise_counts: [2] (mismatched, matched); off_counts: [2] (off, on) observed steps.
    """

    log_evidence: jax.Array
    joint_probs: jax.Array
    p_off: jax.Array
    route_counts: jax.Array
    skill_counts: jax.Array
    noise_counts: jax.Array
    off_counts: jax.Array


def emission_coefs(noise, off_module, n_chars: int):
    """``(log(1 - noise), log(noise / (A - 1)), log(1 - off_module), log(off_module))``."""
    return (jnp.log1p(-noise), jnp.log(noise) - jnp.log(n_chars - 1.0), jnp.log1p(-off_module), jnp.log(off_module))


def leaf_emission(match, y_len, coefs, log_off_extra, n_chars: int, max_len: int):
    """p(y | r, k) of every leaf: ``match: int[L, R, K]``, ``y_len: [L]`` -> ``[L, R, K]``."""
    la, lb, l_on, l_off = coefs
    m = jnp.maximum(match, 0).astype(la.dtype)
    y = y_len.astype(la.dtype)[:, None, None]
    on = jnp.where(match >= 0, jnp.exp(m * la + (y - m) * lb), 0.0)
    off = jnp.exp(l_off + log_off_extra - y_len * jnp.log(n_chars) - jnp.log(max_len + 1.0))
    return jnp.exp(l_on) * on + off[:, None, None]


def _log_prior(model, log_route, log_skill, ri, si, trace, t):
    """log p(r_t) + log p(k_t) at steps ``t: [B]`` of traces ``trace: [B]``: ``[B, R, K]``."""
    cr, ck = ri[trace, t], si[trace, t]
    if model == "modular":
        lr, lk = log_route[cr], log_skill[ck]
    else:
        r_n, k_n = log_route.shape[-1], log_skill.shape[-1]
        prev = jnp.maximum(t - 1, 0)
        pr = jnp.where(t == 0, r_n, ri[trace, prev])
        pk = jnp.where(t == 0, k_n, si[trace, prev])
        lr, lk = log_route[pr, cr], log_skill[pk, ck]
    return lr[:, :, None] + lk[:, None, :]


def _factors(model, n_chars, max_len, log_rows, coefs, lam, mu, arrays, g: HiddenBlocks):
    """The per-step priors ``[B, R, K]`` (j + 1 of them) and the leaf emissions ``[L, R, K]``."""
    ri, si, length = arrays
    j = len(g.nodes)
    priors = [jnp.exp(_log_prior(model, *log_rows, ri, si, g.trace, g.step - j + level) + lam[:, level])
              for level in range(j + 1)]
    leaf_owner = g.owners[-1]
    y_len = length[g.trace, g.step][leaf_owner]
    return priors, leaf_emission(g.leaf_match, y_len, coefs, mu[leaf_owner], n_chars, max_len)


@partial(jax.jit, static_argnames=("model", "n_chars", "max_len"))
def block_factors(model, n_chars, max_len, params, arrays, g):
    """At ``params``: the per-step priors ``[B, R, K]`` (j + 1 of them) and the leaf emissions ``[L, R, K]``."""
    b, j = g.trace.shape[0], len(g.nodes)
    r_n, k_n = params[0].shape[-1], params[1].shape[-1]
    log_rows = (jnp.log(params[0]), jnp.log(params[1]))
    coefs = emission_coefs(params.noise, params.off_module, n_chars)
    zeros = jnp.zeros((b, j + 1, r_n, k_n)), jnp.zeros((b,))
    return _factors(model, n_chars, max_len, log_rows, coefs, *zeros, arrays, g)


def block_log_evidence(model, n_chars, max_len, log_rows, coefs, lam, mu, arrays, g):
    priors, emit = _factors(model, n_chars, max_len, log_rows, coefs, lam, mu, arrays, g)
    j = len(g.nodes)
    v = jnp.sum(priors[j][g.owners[-1]] * emit, axis=(1, 2))  # [L]
    for level in reversed(range(j)):
        owner = jnp.arange(g.trace.shape[0]) if level == 0 else g.owners[level - 1]
        v = jnp.sum(priors[level][owner] * v[g.nodes[level]], axis=(1, 2))
    log_ev = jnp.log(v)
    return jnp.sum(log_ev), log_ev


@partial(jax.jit, static_argnames=("model", "n_chars", "max_len"))
def _block_posterior(model, n_chars, max_len, params, arrays, g) -> BlockPosterior:
    b, j = g.trace.shape[0], len(g.nodes)
    r_n, k_n = params[0].shape[-1], params[1].shape[-1]
    dtype = jnp.result_type(params.noise, float)
    log_rows = (jnp.log(params[0]), jnp.log(params[1]))
    coefs = emission_coefs(params.noise, params.off_module, n_chars)
    lam = jnp.zeros((b, j + 1, r_n, k_n), dtype)
    mu = jnp.zeros((b,), dtype)
    grad = jax.grad(block_log_evidence, argnums=(3, 4, 5, 6), has_aux=True)
    (d_rows, d_coefs, d_lam, d_mu), log_ev = grad(model, n_chars, max_len, log_rows, coefs, lam, mu, arrays, g)
    la, lb, l_on, l_off = d_coefs
    return BlockPosterior(log_ev, d_lam, d_mu, d_rows[0], d_rows[1], jnp.stack([lb, la]), jnp.stack([l_off, l_on]))


def block_arrays(data):
    """The per-step arrays the block functions read: intended routing, skill, and len(y_t)."""
    return (jnp.asarray(data.route_intended), jnp.asarray(data.skill_intended), jnp.asarray(data.length))


def block_posterior(model: str, params, data, g: HiddenBlocks) -> BlockPosterior:
    """Exact evidence, marginals and expected counts of the blocks ``g`` of ``data`` (jitted)."""
    if model not in ("modular", "entangled"):
        raise ValueError(f"block_posterior is for the modular and entangled models, not {model!r}")
    g = jax.tree.map(jnp.asarray, g)
    return _block_posterior(model, data.n_chars, data.max_len, jax.tree.map(jnp.asarray, params), block_arrays(data), g)


def block_map(model: str, params, data, g: HiddenBlocks) -> np.ndarray:
    """The MAP selections of each block, off flags summed out: ``int[B, j + 1, 2]`` ((r, k) per step)."""
    j, b = g.n_hidden, g.trace.size
    k_n = np.shape(params[1])[-1]
    params = jax.tree.map(jnp.asarray, params)
    priors, emit = block_factors(model, data.n_chars, data.max_len, params, block_arrays(data),
                                 jax.tree.map(jnp.asarray, g))
    priors, emit = [np.asarray(p).reshape(p.shape[0], -1) for p in priors], np.asarray(emit)
    score = priors[j][g.owners[-1]] * emit.reshape(emit.shape[0], -1)
    best, args = score.max(axis=1), [score.argmax(axis=1)]
    for level in reversed(range(j)):
        owner = np.arange(b) if level == 0 else g.owners[level - 1]
        score = priors[level][owner] * best[g.nodes[level].reshape(len(owner), -1)]
        best = score.max(axis=1)
        args.insert(0, score.argmax(axis=1))
    node, path = np.arange(b), []
    for level in range(j):
        z = args[level][node]
        path.append(z)
        node = g.nodes[level].reshape(len(args[level]), -1)[node, z]
    path.append(args[j][node])
    z = np.stack(path, axis=1)  # [B, j + 1]
    return np.stack([z // k_n, z % k_n], axis=-1)
