"""The HLSM with its discrete selections summed out, for gradient-based inference on the globals.

* :func:`global_prior`: only the global sites (``model_spec(model).sites``) with the DESIGN §4
  priors. AutoGuides build their prototype from it (see :mod:`latentsel.inference.svi`).
* :func:`log_evidence_fn`: Σ_n log p(D_n | θ) in closed form as a differentiable function of
  θ, hidden-step blocks included. The modular and entangled models use a sparse form:
  only the modules whose output has the step's length contribute ``p_on``; every other one
  contributes the same ``off_module p_off(y)``, and Σ_{r,k} p(r) p(k) = 1, so

      p(y_t) = off_module p_off(y_t) + (1 - off_module) Σ_{(r, k): len(e) = len(y_t)} p(r) p(k) p_on(y_t | e).

  About a quarter of the R K modules fit a step's length in the default world; the gradient
  scatters into the small parameter arrays only. It is computed in log space, so it stays
  exact at the boundary of the parameter space. The grammar chain uses forward-backward
  (:func:`~latentsel.inference.exact.exact_posterior`).
* :func:`collapsed_model`: the global prior plus one factor, that log evidence. Its log
  density equals the enumerated NumPyro model's; it is the fast potential of NUTS.
* :func:`finite_factors`: a handler that makes the enumerated NumPyro models differentiable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.primitives import Messenger

from latentsel.inference.blocks import block_log_evidence, emission_coefs
from latentsel.inference.chain_blocks import layout_log_evidence
from latentsel.inference.chain_blocks import layouts as chain_layouts
from latentsel.inference.exact import exact_posterior
from latentsel.inference.logspace import safe_log, segment_lse
from latentsel.models.data import HLSMData, log_p_off, previous_intended
from latentsel.models.params import Priors
from latentsel.models.registry import model_spec, params_class

__all__ = ["global_prior", "log_evidence_fn", "collapsed_model", "finite_factors", "params_from_sites", "FACTOR_FLOOR"]

# Any log factor below about -800 is exp() = 0 next to the always finite off-module branch,
# so a floor this low changes no value in float32 or float64 and keeps sums far from -inf.
FACTOR_FLOOR = -1e30


def global_prior(model: str, n_routes: int, n_skills: int, priors: Priors = Priors()):
    """Sample the global sites from their priors; returns the model's params NamedTuple.

    Sites (names of ``model_spec(model).sites``): two row-stochastic arrays shaped as in DESIGN §4
    (Dirichlet rows), ``noise`` and ``off_module`` (Beta).
    """
    conc_r, conc_k = model_spec(model).concentration(priors, n_routes, n_skills)
    names = model_spec(model).sites
    route = numpyro.sample(names[0], dist.Dirichlet(jnp.asarray(conc_r)).to_event(conc_r.ndim - 1))
    skill = numpyro.sample(names[1], dist.Dirichlet(jnp.asarray(conc_k)).to_event(conc_k.ndim - 1))
    noise = numpyro.sample(names[2], dist.Beta(*priors.noise))
    off_module = numpyro.sample(names[3], dist.Beta(*priors.off_module))
    return params_class(model)(route, skill, noise, off_module)


def log_evidence_fn(model: str, data: HLSMData):
    """``f(params) -> Σ_n log p(D_n | θ)``, a jittable, differentiable scalar function.

    Hidden-step blocks enter through their exact block evidence
    (:mod:`latentsel.inference.blocks`, :mod:`latentsel.inference.chain_blocks`).
    """
    if model_spec(model).chain:
        return _grammar_log_evidence(data)
    free = _free_log_evidence(model, data)
    if not data.blocks:
        return free
    arrays = tuple(jnp.asarray(a) for a in (data.route_intended, data.skill_intended, data.length))
    groups = [jax.tree.map(jnp.asarray, g) for g in data.blocks]
    t_max = data.step_mask.shape[1]

    def f(params):
        log_rows = (safe_log(params[0]), safe_log(params[1]))
        coefs = emission_coefs(params.noise, params.off_module, data.n_chars)
        total = free(params)
        for g in groups:
            b = g.trace.shape[0]
            prior_shift = jnp.zeros((b, t_max, data.n_routes, data.n_skills))
            total = total + block_log_evidence(model, data.n_chars, data.max_len, log_rows, coefs, prior_shift,
                                               jnp.zeros((b, t_max)), arrays, g)[0]
        return total

    return f


def _grammar_log_evidence(data: HLSMData):
    rows = np.flatnonzero(~data.has_block)
    fast = data.take(rows).without_blocks() if rows.size < data.n_traces else data
    layouts = chain_layouts(data)

    def f(params):
        total = exact_posterior("grammar", params, fast).log_evidence.sum() if rows.size else 0.0
        if layouts:
            coefs = emission_coefs(params.noise, params.off_module, data.n_chars)
            log_route_trans, log_skill_trans = safe_log(params.route_trans), safe_log(params.skill_trans)
            for layout in layouts:
                g_n = layout.traces.size
                match = jnp.asarray(data.match[layout.traces, : layout.depth])
                length = jnp.asarray(data.length[layout.traces, : layout.depth])
                prior_shift = jnp.zeros((g_n, layout.depth, data.n_routes, data.n_skills))
                total = total + layout_log_evidence(layout.key, data.n_chars, data.max_len, log_route_trans,
                                                    log_skill_trans, coefs, prior_shift,
                                                    jnp.zeros((g_n, layout.depth)), match, length,
                                                    jax.tree.map(jnp.asarray, layout.tree))[0]
        return total

    return f


def _free_log_evidence(model: str, data: HLSMData):
    """The steps outside blocks, in the sparse form of the module docstring."""
    r_n, k_n = data.n_routes, data.n_skills
    mask = np.asarray(data.emit)
    match = np.asarray(data.match)
    n, t, r, k = np.nonzero((match >= 0) & mask[..., None, None])  # the length-consistent modules
    step = n * mask.shape[1] + t  # [E], a flat step index
    m = match[n, t, r, k].astype(np.float64)  # [E]
    length = np.asarray(data.length).astype(np.float64)  # [N, T]
    y_len = length[n, t]
    ctx_r, ctx_k = (np.asarray(a) for a in (data.route_intended, data.skill_intended))
    if model_spec(model).context:
        prev_r, prev_k = (np.asarray(a) for a in previous_intended(data))
        ctx_r, ctx_k = prev_r * r_n + ctx_r, prev_k * k_n + ctx_k
    route_idx = ctx_r[n, t] * r_n + r  # [E], into the flattened route rows
    skill_idx = ctx_k[n, t] * k_n + k
    n_steps = mask.size
    on_steps = np.flatnonzero(mask.ravel())
    log_off = np.asarray(log_p_off(length, data.n_chars, data.max_len)).ravel()[on_steps]

    def f(params):
        log_match = jnp.log1p(-params.noise)
        log_mismatch = jnp.log(params.noise) - jnp.log(data.n_chars - 1.0)
        # log space throughout: exact for tiny noise, off_module and row entries (a zero row
        # entry is a -inf term, which segment_lse and its gradient handle)
        terms = (safe_log(jnp.ravel(params[0]))[route_idx] + safe_log(jnp.ravel(params[1]))[skill_idx]
                 + m * log_match + (y_len - m) * log_mismatch)
        log_p_on = segment_lse(terms, step, n_steps)[on_steps]
        log_p_y = jnp.logaddexp(jnp.log1p(-params.off_module) + log_p_on, jnp.log(params.off_module) + log_off)
        return jnp.sum(log_p_y)

    return f


def collapsed_model(model: str, data: HLSMData, priors: Priors = Priors(), log_evidence=None):
    """The global prior times p(D | θ) in closed form (factor site ``log_evidence``).

    ``log_evidence``: a precomputed :func:`log_evidence_fn` of ``data`` (built when absent).
    """
    params = global_prior(model, data.n_routes, data.n_skills, priors)
    f = log_evidence if log_evidence is not None else log_evidence_fn(model, data)
    numpyro.factor("log_evidence", f(params))


def params_from_sites(model: str, values: dict):
    """The params NamedTuple from a dict keyed by the global site names."""
    cls = params_class(model)
    return cls(*(values[name] for name in model_spec(model).sites))


class _Floored(dist.Distribution):
    """``base`` with its log density floored at :data:`FACTOR_FLOOR`."""

    def __init__(self, base):
        self.base = base
        super().__init__(base.batch_shape, base.event_shape)

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape)

    def log_prob(self, value):
        return jnp.maximum(self.base.log_prob(value), FACTOR_FLOOR)


def _is_factor(fn) -> bool:
    while not isinstance(fn, dist.Unit):
        fn = getattr(fn, "base_dist", None)
        if fn is None:
            return False
    return True


class finite_factors(Messenger):
    """Floor the log density of every ``numpyro.factor`` site at :data:`FACTOR_FLOOR`.

    The models' emission factor is -inf for a module whose output has the wrong length. When
    the enumeration sums out a variable over entries that are all -inf (a routing under
    which no skill fits the step), the gradient of that log-sum-exp is NaN, which poisons
    every SVI and NUTS step. The floor leaves every value unchanged (see FACTOR_FLOOR).
    """

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"] and _is_factor(msg["fn"]):
            msg["fn"] = _Floored(msg["fn"])
