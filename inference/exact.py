"""Exact inference by enumeration, in closed form over the emission tensor.

For the modular and entangled models the steps of a fully observed trace are independent
given the trace, so

    log p(D | θ) = Σ_t log Σ_{r,k} p(r | ·) p(k | ·) p(y_t | r, k)

and the posterior of each step is the normalized summand (computed in probability space). The grammar model is a chain
over executed modules whose transition factorizes over routing and skill,
``p(r_t, k_t | r_{t-1}, k_{t-1}) = route_trans[r_{t-1}, r_t] skill_trans[k_{t-1}, k_t]``, so
forward-backward and Viterbi cost O(R K (R + K)) per step instead of O((R K)^2).

Everything here is a pure function of arrays (jitted JAX, float64 when x64 is enabled).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from latentsel.inference.logspace import log_transition, lse, safe_log
from latentsel.models.data import HLSMData, emission, execution_rows, log_emission, log_p_off
from latentsel.models.registry import model_spec

__all__ = ["ExactPosterior", "ForwardBackward", "exact_posterior", "exact_log_evidence", "independent_posterior",
           "forward_backward", "chain_posterior"]


class ExactPosterior(NamedTuple):
    """Exact per-trace results.

    Attributes:
        log_evidence: [N], log p(y_{1:T} | θ) of each trace.
        route_probs: [N, T, R], p(r_t = r | D, θ).
        skill_probs: [N, T, K], p(k_t = k | D, θ).
        p_off: [N, T], p(u_t = 1 | D, θ).
        map_route: [N, T], map_skill: [N, T]; the MAP selections with the off-module flags
            summed out (per step for the independent models; the Viterbi path for grammar).
        joint_probs: [N, T, R, K], p(r_t, k_t | D, θ); ``None`` when not asked for (it is R·K
            numbers a step, the largest output by far).
    """

    log_evidence: jax.Array
    route_probs: jax.Array
    skill_probs: jax.Array
    p_off: jax.Array
    map_route: jax.Array
    map_skill: jax.Array
    joint_probs: jax.Array


def _off_posterior(post, log_emit, log_off_term):
    """p(u_t = 1 | D) = Σ_{r,k} p(r, k | D) off p_off(y) / p(y | r, k)."""
    p = jnp.sum(post * jnp.exp(log_off_term[..., None, None] - log_emit), axis=(-2, -1))
    return jnp.clip(p, 0.0, 1.0)  # rounding can leave it 1 ulp outside


class ForwardBackward(NamedTuple):
    """Scaled forward-backward quantities of the grammar chain (time-major).

    alphas, betas: [T, N, R, K] with p(s_t | D) ∝ alphas[t] * betas[t]; zs: [T, N] the
    per-step normalizers; e: [T, N, R, K] the emission scaled by exp(-shift); log_evidence: [N].
    """

    alphas: jax.Array
    betas: jax.Array
    zs: jax.Array
    e: jax.Array
    log_evidence: jax.Array


def _forward(route_trans, skill_trans, log_emit, mask):
    """The scaled forward pass of the grammar chain: ``(e [T, N, R, K], alphas [T, N, R, K],
    zs [T, N], log_evidence [N])``, ``e`` the emission scaled by each step's largest entry."""
    n, t_max, r_n, k_n = log_emit.shape
    shift = jnp.max(log_emit, axis=(-2, -1))  # [N, T]; the emission is finite, so this is too
    e = jnp.moveaxis(jnp.exp(log_emit - shift[..., None, None]), 1, 0)  # [T, N, R, K]
    init = route_trans[r_n][:, None] * skill_trans[k_n][None, :]  # [R, K]

    def fwd(alpha, xs):
        e_t, m_t, t = xs
        pred = jnp.where(t == 0, init[None],
                         jnp.einsum("nab,ar,bk->nrk", alpha, route_trans[:r_n], skill_trans[:k_n]))
        a = pred * e_t
        z = a.sum(axis=(1, 2))
        a = a / z[:, None, None]
        return jnp.where(m_t[:, None, None], a, alpha), (a, jnp.where(m_t, z, 1.0))

    _, (alphas, zs) = jax.lax.scan(fwd, jnp.zeros((n, r_n, k_n), log_emit.dtype), (e, mask.T, jnp.arange(t_max)))
    log_evidence = jnp.sum(jnp.log(zs), axis=0) + jnp.sum(jnp.where(mask, shift, 0.0), axis=1)
    return e, alphas, zs, log_evidence


def _scaled_pass_fails(zs, mask, log_evidence):
    """Would the scaled pass lose its normalizers (see :func:`chain_posterior`)? A scalar bool."""
    growth = jnp.sum(jnp.where(mask.T, -jnp.log(jnp.maximum(zs, UNDERFLOW)), 0.0), axis=0)
    return (jnp.any(mask.T & ~(zs >= UNDERFLOW)) | jnp.any(growth > 500.0)
            | jnp.any(~jnp.isfinite(log_evidence)))


def forward_backward(route_trans, skill_trans, log_emit, mask) -> ForwardBackward:
    """Forward-backward over the joint state (r, k) with a factorized transition.

    Args:
        route_trans: [R + 1, R]; skill_trans: [K + 1, K] (last row = start);
        log_emit: [N, T, R, K] log p(y_t | r, k); mask: bool[N, T] (a prefix of each row).
    """
    n, t_max, r_n, k_n = log_emit.shape
    e, alphas, zs, log_evidence = _forward(route_trans, skill_trans, log_emit, mask)
    mask_t = mask.T

    def bwd(beta, xs):
        e_next, m_next, z_next = xs
        # beta_t = Σ trans · e_{t+1} · beta_{t+1} / z_{t+1}; past the last step beta = 1
        b = jnp.einsum("ar,bk,nrk->nab", route_trans[:r_n], skill_trans[:k_n], e_next * beta) / z_next[:, None, None]
        b = jnp.where(m_next[:, None, None], b, 1.0)
        return b, b

    ones = jnp.ones((n, r_n, k_n), log_emit.dtype)
    _, betas = jax.lax.scan(bwd, ones, (e[1:], mask_t[1:], zs[1:]), reverse=True)
    betas = jnp.concatenate([betas, ones[None]], axis=0)
    return ForwardBackward(alphas, betas, zs, e, log_evidence)


def chain_posterior(log_route_trans, log_skill_trans, log_emit, log_off_term, mask) -> ExactPosterior:
    """Forward-backward and Viterbi for the grammar model.

    Args:
        log_route_trans: [R + 1, R]; log_skill_trans: [K + 1, K] (last row = start);
        log_emit: [N, T, R, K]; log_off_term: [N, T]; mask: bool[N, T] (steps ``t < depth``, a prefix).
    """
    # The scaled pass divides the backward messages by the forward normalizers z_t, so a
    # backward message is at most Π_{s > t} 1 / z_s. Where the predicted mass and the
    # emission disagree by ~1e200 (exact zeros in the rows with off_module ~ 1e-250) that
    # product overflows; such chunks go through log space (a bound of e^500 leaves room for
    # the gradient). Ordinary off-module steps (z ~ 1e-20) stay on the fast path.
    log_route_trans_const = jax.lax.stop_gradient(log_route_trans)
    log_skill_trans_const = jax.lax.stop_gradient(log_skill_trans)
    probe = forward_backward(jnp.exp(log_route_trans_const), jnp.exp(log_skill_trans_const),
                             jax.lax.stop_gradient(log_emit), mask)
    risky = _scaled_pass_fails(probe.zs, mask, probe.log_evidence)

    def guard(x):  # no gradient reaches the fast path when it is not used
        return jnp.where(risky, jax.lax.stop_gradient(x), x)

    fb = forward_backward(jnp.exp(guard(log_route_trans)), jnp.exp(guard(log_skill_trans)), guard(log_emit), mask)
    post = jnp.moveaxis(fb.alphas * fb.betas, 0, 1)  # [N, T, R, K]
    post = post / post.sum(axis=(-2, -1), keepdims=True)
    careful = jax.lax.cond(risky, lambda a: log_chain(*a, mask),
                           lambda a: (jnp.zeros_like(post), jnp.zeros_like(fb.log_evidence)),
                           (log_route_trans, log_skill_trans, log_emit))
    post = jnp.where(risky, careful[0], post)
    log_evidence = jnp.where(risky, careful[1], fb.log_evidence)
    maskf = mask.astype(log_emit.dtype)
    post = post * maskf[..., None, None]
    map_route, map_skill = _viterbi(log_route_trans, log_skill_trans, log_emit, mask)
    return ExactPosterior(
        log_evidence=log_evidence,
        route_probs=post.sum(-1),
        skill_probs=post.sum(-2),
        p_off=_off_posterior(post, log_emit, log_off_term) * maskf,
        map_route=map_route,
        map_skill=map_skill,
        joint_probs=post,
    )


def log_chain(log_route_trans, log_skill_trans, log_emit, mask):
    """Forward-backward of the grammar chain in log space: ``(post [N, T, R, K], log_evidence [N])``.

    The slow, always exact path (a log-sum-exp per transition entry), used where the scaled
    pass of :func:`forward_backward` would lose its normalizers."""
    n, t_max, r_n, k_n = log_emit.shape
    log_route_no_start, log_skill_no_start = log_route_trans[:r_n], log_skill_trans[:k_n]
    init = log_route_trans[r_n][:, None] + log_skill_trans[k_n][None, :]

    def fwd(log_alpha, xs):
        log_emit_t, m_t, t = xs
        new = (jnp.where(t == 0, init[None], log_transition(log_alpha, log_route_no_start, log_skill_no_start))
               + log_emit_t)
        new = jnp.where(m_t[:, None, None], new, log_alpha)
        return new, new

    zeros = jnp.zeros((n, r_n, k_n), log_emit.dtype)
    last, log_alphas = jax.lax.scan(fwd, zeros, (jnp.moveaxis(log_emit, 1, 0), mask.T, jnp.arange(t_max)))
    log_evidence = lse(last, (1, 2))

    def bwd(log_beta, xs):
        log_emit_next, m_next = xs
        x = log_emit_next + log_beta  # [N, R', K']
        y = lse(log_skill_no_start[None, None, :, :] + x[:, :, None, :], 3)  # [N, R', K]: over k'
        b = lse(log_route_no_start[None, :, :, None] + y[:, None, :, :], 2)  # [N, R, K]: over r'
        b = jnp.where(m_next[:, None, None], b, 0.0)
        return b, b

    _, log_betas = jax.lax.scan(bwd, zeros, (jnp.moveaxis(log_emit, 1, 0)[1:], mask.T[1:]), reverse=True)
    log_betas = jnp.concatenate([log_betas, zeros[None]], axis=0)
    post = jnp.exp(jnp.moveaxis(log_alphas + log_betas, 0, 1) - log_evidence[:, None, None, None])
    return post, log_evidence


def _viterbi(log_route_trans, log_skill_trans, log_emit, mask):
    """The MAP path of the grammar chain; max-product in two stages (skill, then routing)."""
    n, t_max, r_n, k_n = log_emit.shape

    def step(delta, xs):
        log_emit_t, m_t = xs
        # stage 1: best previous skill for each (previous routing, skill)
        s1 = delta[:, :, :, None] + log_skill_trans[None, None, :k_n, :]  # [N, R', K', K]
        best_k = jnp.argmax(s1, axis=2)  # [N, R', K]
        v1 = jnp.max(s1, axis=2)  # [N, R', K]
        # stage 2: best previous routing for each (routing, skill)
        s2 = v1[:, :, None, :] + log_route_trans[None, :r_n, :, None]  # [N, R', R, K]
        best_r = jnp.argmax(s2, axis=1)  # [N, R, K]
        v2 = jnp.max(s2, axis=1) + log_emit_t
        back_k = jnp.take_along_axis(best_k, best_r, axis=1)  # [N, R, K]: best previous skill
        new = jnp.where(m_t[:, None, None], v2, delta)
        return new, (best_r, back_k)

    delta0 = log_route_trans[r_n][None, :, None] + log_skill_trans[k_n][None, None, :] + log_emit[:, 0]
    delta, (bp_r, bp_k) = jax.lax.scan(step, delta0, (jnp.moveaxis(log_emit, 1, 0)[1:], mask.T[1:]))
    flat = jnp.argmax(delta.reshape(n, -1), axis=-1)
    last_r, last_k = flat // k_n, flat % k_n
    depth = mask.sum(axis=1)
    rows = jnp.arange(n)

    def back(carry, xs):
        r, k = carry
        br, bk, t = xs  # back pointers into step t (from step t + 1)
        active = t + 1 < depth  # step t + 1 exists
        pr = jnp.where(active, br[rows, r, k], r)
        pk = jnp.where(active, bk[rows, r, k], k)
        return (pr, pk), (pr, pk)

    ts = jnp.arange(t_max - 1)
    _, (rs, ks) = jax.lax.scan(back, (last_r, last_k), (bp_r, bp_k, ts), reverse=True)
    routes = jnp.concatenate([rs, last_r[None]], axis=0).T  # [N, T]
    skills = jnp.concatenate([ks, last_k[None]], axis=0).T
    # for a trace shorter than T the backtrack holds still until it reaches step depth - 1,
    # so entry t is the path's for every t < depth; the rest is padding
    return jnp.where(mask, routes, -1), jnp.where(mask, skills, -1)


UNDERFLOW = 1e-280
"""A step whose p(y_t) computes below this in probability space is recomputed in log space:
above it, every term that could have underflowed (< 2.2e-308) is below 1e-27 of p(y_t)."""


def independent_posterior(route_prior, skill_prior, p_emit, log_emit, log_off_term, mask, emit=None,
                          with_joint: bool = True) -> ExactPosterior:
    """Exact posterior of the independent-step models.

    The fast path is probability space (the emission a table lookup, no transcendental
    function per entry). Where a step's p(y_t) falls below :data:`UNDERFLOW` (tiny
    ``off_module`` or ``noise``, execution rows with zeros where the step matches), the chunk
    is recomputed in log space, so the result is exact for every parameter in range.

    Args:
        route_prior: [N, T, R]; skill_prior: [N, T, K]; p_emit: [N, T, R, K] p(y_t | r, k)
        (1 where the step is not observed); log_emit: a function returning log p(y_t | r, k),
        [N, T, R, K] (0 where not observed); log_off_term: [N, T] log(off_module p_off(y_t));
        mask: bool[N, T], the steps to give a posterior; emit: bool[N, T], the observed ones
        among them (default: all); with_joint: also return ``joint_probs``.
    """
    emit = mask if emit is None else emit
    n, t, r, k = p_emit.shape

    def fast(_):
        joint = route_prior[..., :, None] * skill_prior[..., None, :] * p_emit
        return joint, jnp.log(joint.sum(axis=(-2, -1)))

    def careful(_):
        with_zero = jnp.where(route_prior > 0, route_prior, 1.0), jnp.where(skill_prior > 0, skill_prior, 1.0)
        lr = jnp.where(route_prior > 0, jnp.log(with_zero[0]), -jnp.inf)
        lk = jnp.where(skill_prior > 0, jnp.log(with_zero[1]), -jnp.inf)
        log_joint = lr[..., :, None] + lk[..., None, :] + log_emit()
        log_p_y = lse(log_joint, (-2, -1))
        # scaled so the largest term of each step is 1: the marginals and the MAP are unchanged
        return jnp.exp(log_joint - log_p_y[..., None, None]), log_p_y

    joint, log_p_y = fast(None)
    risky = jnp.any(emit & ~(log_p_y >= jnp.log(UNDERFLOW)))
    joint, log_p_y = jax.lax.cond(risky, careful, lambda _: (joint, log_p_y), None)
    flat_map = jnp.argmax(joint.reshape(n, t, r * k), axis=-1)
    # in the careful branch joint is already normalized (its sum is 1, not p_y)
    total = joint.sum(axis=(-2, -1))
    post = joint * (mask.astype(joint.dtype) / jnp.where(mask, total, 1.0))[..., None, None]
    return ExactPosterior(
        log_evidence=jnp.sum(jnp.where(emit, log_p_y, 0.0), axis=1),
        route_probs=post.sum(-1),
        skill_probs=post.sum(-2),
        # Σ_{r,k} p(r) p(k) = 1, so p(u = 1 | D) = off p_off(y) / p(y)
        p_off=jnp.clip(jnp.where(emit & mask, jnp.exp(log_off_term - jnp.where(emit, log_p_y, 0.0)), 0.0), 0.0, 1.0),
        map_route=jnp.where(mask, flat_map // k, -1),
        map_skill=jnp.where(mask, flat_map % k, -1),
        joint_probs=post if with_joint else None,
    )


def exact_posterior(model: str, params, data: HLSMData, *, joint: bool = True) -> ExactPosterior:
    """Exact posterior of the steps outside hidden-step blocks under ``model`` at ``params``
    (jitted). Block steps are left at zero here; :mod:`latentsel.inference.blocks` and
    :mod:`latentsel.inference.chain_blocks` fill them in. For ``grammar`` every trace must
    be free of blocks."""
    return _exact_posterior(model, data.n_chars, data.max_len, params, data.arrays(), joint=joint)


@partial(jax.jit, static_argnames=("model", "n_chars", "max_len", "joint"))
def _exact_posterior(model, n_chars, max_len, params, arrays, joint=True) -> ExactPosterior:
    data = HLSMData.from_arrays(arrays, n_chars, max_len)
    mask = jnp.asarray(data.free)
    emit = jnp.asarray(data.emit)
    length = jnp.asarray(data.length)
    if model_spec(model).chain:
        log_emit = log_emission(data, params.noise, params.off_module)
        log_off_term = jnp.where(emit, jnp.log(params.off_module) + log_p_off(length, data.n_chars, data.max_len),
                                 -jnp.inf)
        post = chain_posterior(safe_log(params.route_trans), safe_log(params.skill_trans), log_emit, log_off_term, mask)
        return post if joint else post._replace(joint_probs=None)
    route_prior, skill_prior = execution_rows(model, params[0], params[1], data)
    p_emit = emission(data, params.noise, params.off_module)
    log_off_term = jnp.log(params.off_module) + log_p_off(length, data.n_chars, data.max_len)
    return independent_posterior(route_prior, skill_prior, p_emit,
                                 lambda: log_emission(data, params.noise, params.off_module), log_off_term, mask, emit,
                                 joint)


def exact_log_evidence(model: str, params, data: HLSMData):
    """log p(D_n | θ) of every trace from its steps outside hidden-step blocks, ``[N]`` (jitted):
    the evidence alone, without the posterior, MAP or off-module marginals of
    :func:`exact_posterior` (and its log-space fallbacks where those would lose their
    normalizers, so the same numbers). For ``grammar`` every trace must be free of blocks."""
    return _exact_log_evidence(model, data.n_chars, data.max_len, params, data.arrays())


@partial(jax.jit, static_argnames=("model", "n_chars", "max_len"))
def _exact_log_evidence(model, n_chars, max_len, params, arrays):
    data = HLSMData.from_arrays(arrays, n_chars, max_len)
    mask = jnp.asarray(data.free)
    emit = jnp.asarray(data.emit)
    if model_spec(model).chain:
        log_emit = log_emission(data, params.noise, params.off_module)
        log_rt, log_st = safe_log(params.route_trans), safe_log(params.skill_trans)
        # the forward pass alone, scaled, as in chain_posterior; log space where it would under/overflow
        _, _, zs, fast = _forward(jnp.exp(log_rt), jnp.exp(log_st), log_emit, mask)
        risky = _scaled_pass_fails(zs, mask, fast)
        return jax.lax.cond(risky, lambda a: log_chain(*a, mask)[1], lambda a: fast, (log_rt, log_st, log_emit))
    route_prior, skill_prior = execution_rows(model, params[0], params[1], data)
    length = jnp.asarray(data.length)
    p_emit = emission(data, params.noise, params.off_module)  # 1 where no step is observed
    p_y = jnp.einsum("ntr,ntr->nt", jnp.einsum("ntrk,ntk->ntr", p_emit, skill_prior), route_prior)
    fast = jnp.sum(jnp.where(emit, jnp.log(p_y), 0.0), axis=1)
    risky = jnp.any(emit & ~(jnp.log(p_y) >= jnp.log(UNDERFLOW)))

    def careful(_):  # the full path's log-space branch: exact where p(y_t) underflows
        log_off_term = jnp.log(params.off_module) + log_p_off(length, data.n_chars, data.max_len)
        return independent_posterior(route_prior, skill_prior, p_emit,
                                     lambda: log_emission(data, params.noise, params.off_module), log_off_term, mask,
                                     emit, False).log_evidence

    return jax.lax.cond(risky, careful, lambda _: fast, None)
