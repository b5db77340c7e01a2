"""Exact per-step inference and MAP-EM for fully observed traces, with two extensions of the
HLSM's execution rows and noise (DESIGN §4):

* **entanglement λ**: step t's rows are the mixture
  ``ρ_t = (1 - λ) route_exec[c_t^r] + λ route_ctx[c_{t-1}^r, c_t^r]`` and
  ``κ_t = (1 - λ) skill_exec[c_t^k] + λ skill_ctx[c_{t-1}^k, c_t^k]`` (context ``R`` / ``K`` at
  t = 1): λ = 0 is the modular model, λ = 1 the entangled one;
* **a noise per executed skill**: ``p_on(y | e) = (1 - ε_k)^m (ε_k / (A - 1))^(len(y) - m)``.

When every step is observed the history is the observed trace, so the steps are independent
given the trace: ``log p(trace | θ) = Σ_t log Σ_{r,k,u} ρ_t[r] κ_t[k] p(u) p(y_t | r, k, u)``, and
everything here is exact. The EM objective is the package's (:mod:`latentsel.inference.em`), the
log posterior density in softmax / logit coordinates: ``log p(D | θ) + Σ_rows Σ_j α_j log θ_j
+ Σ (a log ε + b log(1 - ε)) + a' log π + b' log(1 - π)``, summed over the rows the model uses.
λ has a Beta(1, 1) prior taken on λ itself: no term, so the objective is finite at λ = 0 and 1.

λ is no test of modularity: at any λ > 0 the context rows are free parameters that fit noise,
so the in-sample gain over λ = 0 grows with the corpus even under a modular truth. Compare the
models on held-out traces (:func:`compare_heldout`), or estimate the entanglement ρ of the
hierarchical model (:mod:`latentsel.analysis.entanglement`), whose context rows are integrated out.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latentsel.inference.logspace import log_emission_terms, lse, safe_log
from latentsel.models.data import HLSMData, log_p_off, previous_intended
from latentsel.models.params import EntangledParams, ModularParams, Priors
from latentsel.models.registry import model_spec

__all__ = ["StepParams", "StepJoint", "StepFit", "ROWS", "NOISE", "step_joint", "fit_steps",
           "heldout_loglik", "compare_heldout"]

ROWS = ("modular", "entangled", "mixture")
NOISE = ("shared", "per_skill")


def _concentrations(r_n: int, k_n: int, priors: Priors):
    """Dirichlet concentrations ``([R, R], [K, K], [R+1, R, R], [K+1, K, K])``, as the package's."""
    return (*model_spec("modular").concentration(priors, r_n, k_n), *model_spec("entangled").concentration(priors, r_n, k_n))


def _normalize(a):
    return a / a.sum(axis=-1, keepdims=True)


class StepParams(NamedTuple):
    """Parameters of the λ-mixture with a noise per executed skill.

    Attributes:
        route_exec: [R, R], skill_exec: [K, K]: the modular rows (row = intended module).
        route_ctx: [R + 1, R, R], skill_ctx: [K + 1, K, K]: the entangled rows (first index =
            the previous intended module, ``R`` / ``K`` = start).
        lam: λ in [0, 1], the weight of the context rows in every step's rows.
        noise: float[K], ε_k of the executed skill k (a shared noise is K equal values).
        off: off_module in (0, 1).
    """

    route_exec: np.ndarray
    skill_exec: np.ndarray
    route_ctx: np.ndarray
    skill_ctx: np.ndarray
    lam: float
    noise: np.ndarray
    off: float

    @classmethod
    def from_modular(cls, p: ModularParams) -> StepParams:
        """λ = 0; the context rows repeat the modular rows, so the model is the same at every λ."""
        r, k = np.asarray(p.route_exec, float), np.asarray(p.skill_exec, float)
        return cls(r, k, np.broadcast_to(r, (len(r) + 1, *r.shape)).copy(),
                   np.broadcast_to(k, (len(k) + 1, *k.shape)).copy(), 0.0, np.full(len(k), float(p.noise)),
                   float(p.off_module))

    @classmethod
    def from_entangled(cls, p: EntangledParams, priors: Priors = Priors()) -> StepParams:
        """λ = 1; the (unused) modular rows at the maximizer of their prior, α / Σ α."""
        rc, kc = np.asarray(p.route_exec_ctx, float), np.asarray(p.skill_exec_ctx, float)
        conc_r, conc_k = _concentrations(rc.shape[-1], kc.shape[-1], priors)[:2]
        return cls(_normalize(conc_r), _normalize(conc_k), rc, kc, 1.0, np.full(kc.shape[-1], float(p.noise)),
                   float(p.off_module))


class StepJoint(NamedTuple):
    """The exact per-step posterior of a fully observed corpus (zero past a trace's depth).

    on: [N, T, R, K], p(r_t = r, k_t = k, u_t = 0 | y_t, θ); off: [N, T], p(u_t = 1 | y_t, θ);
    log_lik: [N], log p(trace | θ) = Σ_t log p(y_t | θ).
    """

    on: np.ndarray
    off: np.ndarray
    log_lik: np.ndarray


class StepFit(NamedTuple):
    """params: the MAP :class:`StepParams`; log_joint: the objective there (log likelihood +
    log prior); iterations: EM steps taken; converged: bool; history: float[iterations + 1],
    the objective at every iterate (non-decreasing)."""

    params: StepParams
    log_joint: float
    iterations: int
    converged: bool
    history: np.ndarray


class _Stats(NamedTuple):
    """The E-step: the posterior, and expected counts of the complete data."""

    joint: StepJoint
    route_mod: jax.Array  # [R, R]: steps whose route came from the modular row (row = intended)
    skill_mod: jax.Array  # [K, K]
    route_ctx: jax.Array  # [R + 1, R, R]: ... from the context row
    skill_ctx: jax.Array  # [K + 1, K, K]
    mismatched: jax.Array  # [K]: E[mismatched positions] of on-module steps, by executed skill
    matched: jax.Array  # [K]
    n_off: jax.Array  # E[off-module steps]
    n_steps: jax.Array
    n_ctx: jax.Array  # E[route and skill draws from the context rows]


def _check_observed(data: HLSMData) -> None:
    bad = int(np.sum(np.asarray(data.step_mask) & ~(np.asarray(data.free) & np.asarray(data.emit))))
    if bad:
        raise ValueError(f"stepwise inference needs fully observed traces: {bad} step(s) are hidden or read a "
                         f"hidden step's output; use latentsel.analysis.posterior for such corpora")


def _mixture_rows(mod, ctx, lam):
    """ρ = (1 - λ) mod + λ ctx and each component's share of it (0 where ρ = 0)."""
    rho = (1 - lam) * mod + lam * ctx
    pos = rho > 0
    inv = 1.0 / jnp.where(pos, rho, 1.0)
    return rho, jnp.where(pos, (1 - lam) * mod * inv, 0.0), jnp.where(pos, lam * ctx * inv, 0.0)


@partial(jax.jit, static_argnames=("n_chars", "max_len"))
def _e_step(arrays, n_chars, max_len, p: StepParams) -> _Stats:
    data = HLSMData.from_arrays(arrays, n_chars, max_len)
    mask = data.step_mask
    r_n, k_n = data.n_routes, data.n_skills
    cr, ck = data.route_intended, data.skill_intended
    prev_r, prev_k = previous_intended(data)
    rho, mod_r, ctx_r = _mixture_rows(p.route_exec[cr], p.route_ctx[prev_r, cr], p.lam)  # [N, T, R]
    kappa, mod_k, ctx_k = _mixture_rows(p.skill_exec[ck], p.skill_ctx[prev_k, ck], p.lam)  # [N, T, K]
    # the on-module branch alone (log off_module = -inf); the noise broadcasts over the executed skill
    coefs = (jnp.log1p(-p.noise), jnp.log(p.noise) - jnp.log(n_chars - 1.0), jnp.log1p(-p.off), jnp.array(-jnp.inf))
    log_on = log_emission_terms(data.match, data.length, coefs, jnp.zeros(mask.shape), n_chars, max_len)
    log_off = jnp.log(p.off) + log_p_off(data.length, n_chars, max_len)  # [N, T]
    a = safe_log(rho)[..., :, None] + safe_log(kappa)[..., None, :] + log_on  # [N, T, R, K]
    log_py = jnp.logaddexp(lse(a, (-2, -1)), log_off)
    on = jnp.where(mask[..., None, None], jnp.exp(a - log_py[..., None, None]), 0.0)
    off = jnp.where(mask, jnp.exp(log_off - log_py), 0.0)
    joint = StepJoint(on, off, jnp.sum(jnp.where(mask, log_py, 0.0), axis=1))
    # p(r_t | y_t): the off branch draws (r, k) from the rows too
    w_r = on.sum(-1) + off[..., None] * rho
    w_k = on.sum(-2) + off[..., None] * kappa
    m = jnp.maximum(data.match, 0)
    length = data.length[..., None, None]
    n_steps = jnp.sum(mask)
    return _Stats(joint,
                  jnp.zeros((r_n, r_n)).at[cr].add(w_r * mod_r), jnp.zeros((k_n, k_n)).at[ck].add(w_k * mod_k),
                  jnp.zeros((r_n + 1, r_n, r_n)).at[prev_r, cr].add(w_r * ctx_r),
                  jnp.zeros((k_n + 1, k_n, k_n)).at[prev_k, ck].add(w_k * ctx_k),
                  jnp.sum(on * (length - m), axis=(0, 1, 2)), jnp.sum(on * m, axis=(0, 1, 2)),
                  jnp.sum(off), n_steps, jnp.sum(w_r * ctx_r) + jnp.sum(w_k * ctx_k))


def _run(data: HLSMData, p: StepParams, arrays=None) -> _Stats:
    with jax.enable_x64(True):
        p = StepParams(*(jnp.asarray(x, jnp.float64) for x in p))
        arrays = data.arrays() if arrays is None else arrays
        return jax.tree.map(np.asarray, _e_step(arrays, data.n_chars, data.max_len, p))


def step_joint(data: HLSMData, p: StepParams) -> StepJoint:
    """The exact per-step posterior and per-trace log likelihood (:class:`StepJoint`) of a fully
    observed corpus; ValueError if a step is hidden."""
    _check_observed(data)
    return _run(data, p).joint


def heldout_loglik(data: HLSMData, p: StepParams) -> np.ndarray:
    """float64[N]: log p(trace_n | θ) at the point estimate ``p`` (a predictive log likelihood
    when ``data`` was not used to fit ``p``)."""
    return step_joint(data, p).log_lik


def compare_heldout(ll_a, ll_b) -> dict:
    """Paired comparison of two models' per-trace log likelihoods ``[n]`` on the same traces:
    ``diff_mean`` = mean(a - b), ``diff_se`` = sd(a - b) / sqrt(n)."""
    a, b = np.asarray(ll_a, float), np.asarray(ll_b, float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two [n] arrays of the same traces (n >= 2), got shapes {a.shape} and {b.shape}")
    d = a - b
    return {"diff_mean": float(d.mean()), "diff_se": float(d.std(ddof=1) / np.sqrt(d.size)), "per_trace_a": a,
            "per_trace_b": b, "n": int(d.size)}


def _log_prior(p: StepParams, rows: str, noise: str, conc, priors: Priors) -> float:
    terms = []
    if rows != "entangled":
        terms += [(conc[0], p.route_exec), (conc[1], p.skill_exec)]
    if rows != "modular":
        terms += [(conc[2], p.route_ctx), (conc[3], p.skill_ctx)]
    eps = np.asarray(p.noise)[:1] if noise == "shared" else np.asarray(p.noise)
    (a, b), (a2, b2) = priors.noise, priors.off_module
    with np.errstate(divide="ignore"):
        lp = sum(float(np.sum(c * np.log(x))) for c, x in terms)
    return lp + float(np.sum(a * np.log(eps) + b * np.log1p(-eps))) + a2 * np.log(p.off) + b2 * np.log1p(-p.off)


def _m_step(s: _Stats, rows: str, noise: str, lam, conc, priors: Priors) -> StepParams:
    route_exec, skill_exec = _normalize(s.route_mod + conc[0]), _normalize(s.skill_mod + conc[1])
    route_ctx, skill_ctx = _normalize(s.route_ctx + conc[2]), _normalize(s.skill_ctx + conc[3])
    if rows == "modular":
        route_ctx = np.broadcast_to(route_exec, route_ctx.shape).copy()
        skill_ctx = np.broadcast_to(skill_exec, skill_ctx.shape).copy()
    (a, b), (a2, b2) = priors.noise, priors.off_module
    mis, mat = s.mismatched, s.matched
    if noise == "shared":
        mis, mat = np.full_like(mis, mis.sum()), np.full_like(mat, mat.sum())
    n = float(s.n_steps)
    lam = min(1.0, float(s.n_ctx) / (2 * n)) if lam is None else lam  # rounding can pass 1
    return StepParams(route_exec, skill_exec, route_ctx, skill_ctx, lam, (a + mis) / (a + b + mis + mat),
                      float((a2 + s.n_off) / (a2 + b2 + n)))


def _start(init, r_n: int, k_n: int, conc, noise: str, lam) -> StepParams:
    if init is None:
        p = StepParams(*(_normalize(c) for c in conc), 0.5, np.full(k_n, 0.1), 0.1)
    else:
        p = StepParams(*(np.asarray(x, float) for x in init[:4]), float(init.lam),
                       np.broadcast_to(np.asarray(init.noise, float), (k_n,)).copy(), float(init.off))
    if noise == "shared":
        p = p._replace(noise=np.full(k_n, float(np.mean(p.noise))))
    return p if lam is None else p._replace(lam=float(lam))


def fit_steps(data: HLSMData, *, rows: str = "modular", noise: str = "shared", lam: float | None = None,
              init: StepParams | None = None, priors: Priors = Priors(), max_iter: int = 500,
              tol: float = 1e-10) -> StepFit:
    """MAP-EM (module docstring's objective) on a fully observed corpus.

    ``rows``: ``"modular"`` (λ = 0; the context rows repeat the modular rows), ``"entangled"``
    (λ = 1; the modular rows stay at their prior maximizer) or ``"mixture"`` (both; λ fixed at
    ``lam``, or estimated when ``lam`` is None: the E-step gives each step's probability that its
    route, and separately its skill, came from the context row, and λ's M-step pools both).
    ``noise``: ``"shared"`` (one ε, one Beta prior) or ``"per_skill"`` (ε_k, a Beta prior each).
    Stops when the objective improves by less than ``tol * |objective|``.
    Default start: every row at α / Σ α, ε = off = 0.1, λ = 0.5.
    """
    if rows not in ROWS or noise not in NOISE:
        raise ValueError(f"rows must be one of {ROWS} and noise one of {NOISE}, got {rows!r}, {noise!r}")
    if lam is not None and (rows != "mixture" or not 0 <= lam <= 1):
        raise ValueError(f"a fixed lam in [0, 1] is for rows='mixture' (modular is 0, entangled 1), got {lam!r}")
    _check_observed(data)
    lam = {"modular": 0.0, "entangled": 1.0}.get(rows, lam)
    conc = _concentrations(data.n_routes, data.n_skills, priors)
    p = _start(init, data.n_routes, data.n_skills, conc, noise, lam)
    with jax.enable_x64(True):
        arrays = tuple(jnp.asarray(a) for a in data.arrays())
    stats = _run(data, p, arrays)
    history = [float(stats.joint.log_lik.sum()) + _log_prior(p, rows, noise, conc, priors)]
    converged, it = False, 0
    while it < max_iter and not converged:
        p = _m_step(stats, rows, noise, lam, conc, priors)
        stats, it = _run(data, p, arrays), it + 1
        history.append(float(stats.joint.log_lik.sum()) + _log_prior(p, rows, noise, conc, priors))
        converged = history[-1] - history[-2] < tol * abs(history[-1])
    return StepFit(p, history[-1], it, converged, np.asarray(history))
