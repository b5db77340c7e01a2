"""Exact inference on the hidden-step blocks of the modular and entangled models.

A block (:class:`~latentsel.models.data.HiddenBlocks`) is a trace's J enumerated hidden steps
and the observed steps that read them. Given the hidden outputs (a node of the block's tree)
the observed steps are independent, so with z = (r, k) and v a node,

    V_J(v) = Π_{reads s at v} Σ_{z_s} p(z_s) p(y_s | z_s, v)
    V_l(v) = Π_{reads s at v} Σ_{z_s} p(z_s) p(y_s | z_s, v) · Σ_{z} p(z_{h_{l+1}} = z) V_{l+1}(child(v, z))

and the block's factor in p(D | θ) is V_0(block), evaluated bottom-up in log space (no
product of many small probabilities underflows). Everything else comes from one gradient of
the log evidence: the selections enter as exponentials of log potentials, so the derivative
of log p(D) with respect to the log prior of (r, k) at a step is its posterior marginal, with
respect to a log execution-row entry its expected count, with respect to log(1 - noise) and
log(noise / (A - 1)) the expected matched and mismatched positions, and with respect to
log off_module / log(1 - off_module) the expected off- and on-module observed steps. The MAP
path is a max-product pass on the same tree; posterior samples go top-down on it.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentsel.inference.logspace import log_emission_terms, lse
from latentsel.models.data import HiddenBlocks
from latentsel.models.registry import MODELS, model_spec

__all__ = ["BlockPosterior", "block_posterior", "block_log_evidence", "block_terms", "block_arrays",
           "emission_coefs", "block_map", "block_sample"]


class BlockPosterior(NamedTuple):
    """Exact results on the B blocks of one group (J hidden steps), T = the corpus's depth.

    log_evidence: [B], the log of each block's factor in p(D | θ); joint_probs: [B, T, R, K],
    p(r_t, k_t | D) at the block's steps (zero elsewhere); p_off: [B, T], p(u_t = 1 | D) at its
    observed steps; route_counts / skill_counts: expected counts, shaped like the model's rows;
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


def _log_prior(model, log_route, log_skill, route_intended, skill_intended, trace, t):
    """log p(r_t) + log p(k_t) at steps ``t: [B]`` of traces ``trace: [B]``: ``[B, R, K]``."""
    cr, ck = route_intended[trace, t], skill_intended[trace, t]
    if not model_spec(model).context:
        lr, lk = log_route[cr], log_skill[ck]
    else:
        r_n, k_n = log_route.shape[-1], log_skill.shape[-1]
        prev = jnp.maximum(t - 1, 0)
        pr = jnp.where(t == 0, r_n, route_intended[trace, prev])
        pk = jnp.where(t == 0, k_n, skill_intended[trace, prev])
        lr, lk = log_route[pr, cr], log_skill[pk, ck]
    return lr[:, :, None] + lk[:, None, :]


def block_terms(model, n_chars, max_len, log_rows, coefs, prior_shift, off_shift, arrays, g: HiddenBlocks):
    """The log potentials of a block group.

    Returns ``(hidden, reads)``: ``hidden[l]: [n_l, R, K]``, log p(z) of hidden step l + 1 at
    every level-l node; ``reads[l]: [Q_l, R, K]``, log p(z) + log p(y | z) of every read row of
    level l + 1. ``prior_shift: [B, T, R, K]`` and ``off_shift: [B, T]`` are added to the log prior
    of a step and to the off-module branch of its emission (zero; their gradients are the marginals
    p(r_t, k_t | D) and p(u_t = 1 | D)).
    """
    route_intended, skill_intended, length = arrays
    hidden, reads = [], []
    for level in range(len(g.nodes)):
        owner = jnp.arange(g.trace.shape[0]) if level == 0 else g.owners[level - 1]
        t = g.hidden[owner, level]
        hidden.append(_log_prior(model, *log_rows, route_intended, skill_intended, g.trace[owner], t)
                      + prior_shift[owner, t])
        block = g.owners[level][g.read_node[level]]
        t = g.read_step[level]
        trace = g.trace[block]
        log_emit = log_emission_terms(g.read_match[level], length[trace, t], coefs, off_shift[block, t], n_chars,
                                      max_len)
        reads.append(_log_prior(model, *log_rows, route_intended, skill_intended, trace, t) + prior_shift[block, t]
                     + log_emit)
    return hidden, reads


def block_log_evidence(model, n_chars, max_len, log_rows, coefs, prior_shift, off_shift, arrays, g):
    """``(Σ_b log V_0(b), log V_0: [B])`` of a block group (see the module docstring)."""
    hidden, reads = block_terms(model, n_chars, max_len, log_rows, coefs, prior_shift, off_shift, arrays, g)
    below = None
    for level in reversed(range(len(g.nodes))):
        n_next = g.parents[level].shape[0]
        v = jax.ops.segment_sum(lse(reads[level], (1, 2)), g.read_node[level], num_segments=n_next)
        if below is not None:
            v = v + below
        below = lse(hidden[level] + v[g.nodes[level]], (1, 2))
    return jnp.sum(below), below


@partial(jax.jit, static_argnames=("model", "n_chars", "max_len", "t_max"))
def _block_posterior(model, n_chars, max_len, t_max, params, arrays, g) -> BlockPosterior:
    b = g.trace.shape[0]
    r_n, k_n = params[0].shape[-1], params[1].shape[-1]
    dtype = jnp.result_type(params.noise, float)
    log_rows = (jnp.log(params[0]), jnp.log(params[1]))
    coefs = emission_coefs(params.noise, params.off_module, n_chars)
    prior_shift = jnp.zeros((b, t_max, r_n, k_n), dtype)
    off_shift = jnp.zeros((b, t_max), dtype)
    grad = jax.grad(block_log_evidence, argnums=(3, 4, 5, 6), has_aux=True)
    (d_rows, d_coefs, joint_probs, p_off), log_ev = grad(model, n_chars, max_len, log_rows, coefs, prior_shift,
                                                         off_shift, arrays, g)
    matched, mismatched, on, off = d_coefs
    return BlockPosterior(log_ev, joint_probs, p_off, d_rows[0], d_rows[1], jnp.stack([mismatched, matched]),
                          jnp.stack([off, on]))


def block_arrays(data):
    """The per-step arrays the block functions read: intended routing, skill, and len(y_t)."""
    return (jnp.asarray(data.route_intended), jnp.asarray(data.skill_intended), jnp.asarray(data.length))


def _check_model(model: str) -> None:
    if model_spec(model).chain:
        covered = " and ".join(name for name, spec in MODELS.items() if spec.uses_program)
        raise ValueError(f"the block functions are for the {covered} models, not {model!r}")


def block_posterior(model: str, params, data, g: HiddenBlocks) -> BlockPosterior:
    """Exact evidence, marginals and expected counts of the blocks ``g`` of ``data`` (jitted)."""
    _check_model(model)
    return _block_posterior(model, data.n_chars, data.max_len, data.step_mask.shape[1],
                            jax.tree.map(jnp.asarray, params), block_arrays(data), jax.tree.map(jnp.asarray, g))


@partial(jax.jit, static_argnames=("model", "n_chars", "max_len", "t_max"))
def _terms_at(model, n_chars, max_len, t_max, params, arrays, g):
    b = g.trace.shape[0]
    r_n, k_n = params[0].shape[-1], params[1].shape[-1]
    log_rows = (jnp.log(params[0]), jnp.log(params[1]))
    coefs = emission_coefs(params.noise, params.off_module, n_chars)
    return block_terms(model, n_chars, max_len, log_rows, coefs, jnp.zeros((b, t_max, r_n, k_n)),
                       jnp.zeros((b, t_max)), arrays, g)


def _numpy_terms(model, params, data, g):
    """The log potentials of :func:`block_terms` at ``params`` as flat numpy arrays ``[n, R K]``."""
    hidden, reads = _terms_at(model, data.n_chars, data.max_len, data.step_mask.shape[1],
                              jax.tree.map(jnp.asarray, params), block_arrays(data), jax.tree.map(jnp.asarray, g))
    return [_flat(np.asarray(a)) for a in hidden], [_flat(np.asarray(a)) for a in reads]


def _flat(a):
    """``[n, R, K]`` -> ``[n, R K]`` (n may be 0)."""
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2])


def _reached_rows(g, level, node):
    """The read rows of level ``level + 1`` at the nodes ``node: int[..., B]`` (one per block):
    ``bool[..., Q]``."""
    owner = g.owners[level][g.read_node[level]]
    return node[..., owner] == g.read_node[level]


def block_map(model: str, params, data, g: HiddenBlocks) -> np.ndarray:
    """The MAP selections of each block, off flags summed out: ``int[B, T, 2]`` ((r, k) per
    step; -1 outside the block's steps)."""
    _check_model(model)
    k_n = data.n_skills
    hidden, reads = _numpy_terms(model, params, data, g)
    j, b = g.n_hidden, g.n_blocks
    best_hidden, best_read = [None] * j, [None] * j
    below = None
    for level in reversed(range(j)):
        n_next = g.parents[level].size
        best_read[level] = reads[level].argmax(axis=1)
        v = np.zeros(n_next)
        np.add.at(v, g.read_node[level], reads[level].max(axis=1))
        if below is not None:
            v = v + below
        score = hidden[level] + v[_flat(g.nodes[level])]
        best_hidden[level] = score.argmax(axis=1)
        below = score.max(axis=1)
    z = np.full((b, data.step_mask.shape[1]), -1)
    node, blocks = np.arange(b), np.arange(b)
    for level in range(j):
        pick = best_hidden[level][node]
        z[blocks, g.hidden[:, level]] = pick
        node = _flat(g.nodes[level])[node, pick]
        rows = _reached_rows(g, level, node)
        z[g.owners[level][g.read_node[level][rows]], g.read_step[level][rows]] = best_read[level][rows]
    return np.stack([np.where(z >= 0, z // k_n, -1), np.where(z >= 0, z % k_n, -1)], axis=-1)


def _categorical_log(rng: np.random.Generator, log_w: np.ndarray) -> np.ndarray:
    """One draw per row of unnormalized log weights ``[..., M]``: ``int[...]``."""
    w = np.exp(log_w - log_w.max(axis=-1, keepdims=True))
    cdf = np.cumsum(w, axis=-1)
    u = rng.random(cdf.shape[:-1] + (1,)) * cdf[..., -1:]
    return np.minimum((cdf <= u).sum(axis=-1), w.shape[-1] - 1)


def block_sample(model: str, params, data, g: HiddenBlocks, rng: np.random.Generator, n_samples: int):
    """Exact draws of each block's selections, top-down on its tree.

    Returns ``z: int[S, B, T]``, z = r K + k at the block's steps (-1 elsewhere).
    """
    _check_model(model)
    hidden, reads = _numpy_terms(model, params, data, g)
    j, b = g.n_hidden, g.n_blocks
    values = [None] * j  # log V_{l+1} of the level-(l + 1) nodes
    below = None
    for level in reversed(range(j)):
        v = np.zeros(g.parents[level].size)
        np.add.at(v, g.read_node[level], _np_lse(reads[level]))
        if below is not None:
            v = v + below
        values[level] = v
        below = _np_lse(hidden[level] + v[_flat(g.nodes[level])])
    z = np.full((n_samples, b, data.step_mask.shape[1]), -1)
    node = np.broadcast_to(np.arange(b), (n_samples, b))
    draws = np.arange(n_samples)[:, None]
    for level in range(j):
        table = _flat(g.nodes[level])
        pick = _categorical_log(rng, hidden[level][node] + values[level][table[node]])
        z[draws, np.arange(b)[None], g.hidden[None, :, level]] = pick
        node = table[node, pick]
        rows = _reached_rows(g, level, node)  # [S, Q]
        s_idx, q_idx = np.nonzero(rows)
        z[s_idx, g.owners[level][g.read_node[level][q_idx]], g.read_step[level][q_idx]] = \
            _categorical_log(rng, reads[level][q_idx])
    return z


def _np_lse(x):
    m = x.max(axis=-1)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - m[..., None]).sum(axis=-1)) + m
