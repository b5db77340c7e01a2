"""Log-space reductions that stay finite, and finite in their gradients, at the boundary.

Exact zeros are legitimate probabilities in the HLSM (an execution row with zeros, a module
whose output has the wrong length), so log potentials of -inf are everywhere. ``jax.nn.logsumexp``
of a slice that is all -inf is -inf, as it should be, but its gradient is NaN, and a NaN
gradient poisons every marginal and expected count of the corpus even where it is multiplied
by zero. :func:`lse` returns -inf there with a zero gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["lse", "segment_lse", "safe_log", "log_transition", "log_emission_terms"]


def lse(x, axis):
    """log Σ exp(x) over ``axis`` (an int or a tuple); -inf, with zero gradient, where every
    entry is -inf."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
    ok = s > 0
    out = jnp.where(ok, jnp.log(jnp.where(ok, s, 1.0)) + m, -jnp.inf)
    return jnp.squeeze(out, axis=axis)


def safe_log(x):
    """log x with log 0 = -inf and a zero gradient there. An exact zero is on the boundary of
    the simplex, where the derivative along the entry is taken as 0 (NUTS and SVI move in
    unconstrained coordinates, where no entry is ever exactly 0)."""
    pos = x > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, x, 1.0)), -jnp.inf)


def segment_lse(x, segment_ids, num_segments: int):
    """log Σ exp(x) over the entries of each segment: ``x: [Q]`` -> ``[num_segments]``
    (-inf, with zero gradient, for an empty segment or one that is all -inf)."""
    m = jax.lax.stop_gradient(jax.ops.segment_max(x, segment_ids, num_segments=num_segments))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jax.ops.segment_sum(jnp.exp(x - m[segment_ids]), segment_ids, num_segments=num_segments)
    ok = s > 0
    return jnp.where(ok, jnp.log(jnp.where(ok, s, 1.0)) + m, -jnp.inf)


def log_transition(log_alpha, log_route_trans, log_skill_trans):
    """log Σ_{z'} exp(log_alpha[z']) p(z | z') for the grammar's factorized transition
    p((r, k) | (r', k')) = route_trans[r', r] skill_trans[k', k]: ``log_alpha: [n, R, K]`` ->
    ``[n, R, K]`` (``log_route_trans: [R, R]``, ``log_skill_trans: [K, K]``, start rows excluded);
    O(R K (R + K)) per row."""
    a1 = lse(log_alpha[:, :, :, None] + log_skill_trans[None, None, :, :], 2)  # [n, R', K]: over k'
    return lse(a1[:, :, None, :] + log_route_trans[None, :, :, None], 1)  # over r'


def log_emission_terms(match, y_len, coefs, log_off_extra, n_chars: int, max_len: int):
    """log p(y | r, k), the off-module flag summed out, for match counts ``match: int[..., R, K]``
    (-1 where the lengths differ) of a step of length ``y_len: [...]``.

    ``coefs = (log(1 - noise), log(noise / (A - 1)), log(1 - off_module), log(off_module))``;
    ``log_off_extra: [...]`` is added to the off-module branch (zero; its gradient is the
    posterior probability of the branch). Every term is a sum of logs, so nothing underflows
    for any parameter in (0, 1).
    """
    log_match, log_mismatch, log_on, log_off = coefs
    m = jnp.maximum(match, 0).astype(log_match.dtype)
    y_len = jnp.asarray(y_len).astype(log_match.dtype)
    y = y_len[..., None, None]
    on = jnp.where(match >= 0, log_on + m * log_match + (y - m) * log_mismatch, -jnp.inf)
    off = (log_off + log_off_extra - y_len * jnp.log(n_chars) - jnp.log(max_len + 1.0))[..., None, None]
    return jnp.logaddexp(on, off)
