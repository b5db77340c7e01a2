"""Stochastic variational inference on the HLSM's global parameters (DESIGN §5).

The model is the enumerated NumPyro program (``NUMPYRO_MODELS[model]``) and the loss
``TraceEnum_ELBO``: the discrete selections are summed out exactly, and the guide covers the
global sites only (``model_spec(model).sites``).

Guides:

* ``"delta"`` (``AutoDelta``): a point estimate. By default (``map_in="softmax"``) it is the
  mode of the log posterior in softmax / logit coordinates, the objective J(θ) that EM
  maximizes (:mod:`latentsel.inference.em`): the Jacobian of the softmax (logistic) map
  contributes Σ_j log θ_j per row (log ε + log(1 - ε) per scalar), which is the same as
  raising every Dirichlet concentration and both Beta parameters by one. So AutoDelta runs
  on the model with those shifted priors, and its optimum is EM's. ``map_in="simplex"``
  keeps the priors as given: the mode of the density on the simplex, which does not exist
  for a Dirichlet concentration below 1 (the density is unbounded at the boundary), so rows
  the data do not reach drift towards a vertex.
* ``"normal"`` (``AutoNormal``): a mean-field normal in the unconstrained coordinates; the
  result's ``params`` is the posterior mean of the guide (Monte Carlo), ``median`` the
  transform of its locations, ``std`` its posterior standard deviations.

Everything is a function of its arguments; the seed is one of them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, init_to_value
from numpyro.infer.autoguide import AutoDelta, AutoNormal

from latentsel.inference.collapsed import finite_factors, global_prior, params_from_sites
from latentsel.inference.em import prior_mean_params
from latentsel.inference.exact import exact_log_evidence
from latentsel.models.data import HLSMData
from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.params import Priors
from latentsel.models.registry import model_spec

__all__ = ["SVIResult", "fit_svi", "fit_svi_batches", "softmax_priors", "check_options", "GUIDES"]

GUIDES = ("delta", "normal")


class SVIResult(NamedTuple):
    """The result of :func:`fit_svi`.

    params: the model's params NamedTuple, the point estimate (delta: the optimum; normal:
        the guide's posterior mean); losses: float64[steps], the negative ELBO per step (for
        the delta guide with ``map_in="softmax"``, -J(θ) up to a constant);
    guide: "delta" or "normal"; guide_params: the guide's parameters by NumPyro name
        (``{site}_auto_loc``, ``{site}_auto_scale``; normal: unconstrained coordinates);
    median: params NamedTuple (normal: the transform of the locations; delta: None);
    std: params NamedTuple of posterior standard deviations per entry (normal; delta: None).
    """

    params: tuple
    losses: np.ndarray
    guide: str
    guide_params: dict
    median: tuple | None
    std: tuple | None


def softmax_priors(priors: Priors) -> Priors:
    """Priors whose density on the simplex / interval is the original log posterior's in
    softmax / logit coordinates: every concentration and Beta parameter plus one."""
    return Priors(priors.exec_diag + 1, priors.exec_off + 1, priors.trans + 1,
                  tuple(a + 1 for a in priors.noise), tuple(a + 1 for a in priors.off_module))


def check_options(guide: str, map_in: str, steps: int, priors: Priors) -> Priors:
    """Validate the options of an SVI fit; returns the priors the guide is fitted on."""
    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; choose from {', '.join(GUIDES)}")
    if map_in not in ("softmax", "simplex"):
        raise ValueError(f"map_in must be 'softmax' or 'simplex', got {map_in!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return softmax_priors(priors) if guide == "delta" and map_in == "softmax" else priors


def fit_svi(model: str, data: HLSMData, *, guide: str = "delta", priors: Priors = Priors(), steps: int = 2000,
            lr: float = 0.05, lr_final: float = 0.002, seed: int = 0, init=None, map_in: str = "softmax",
            num_particles: int = 1, posterior_samples: int = 1000, progress: Callable | None = None,
            progress_every: int = 50) -> SVIResult:
    """Fit the guide by Adam on the ``TraceEnum_ELBO`` loss (float64).

    The step size decays geometrically from ``lr`` to ``lr_final`` over the ``steps``; the
    gradient is clipped at 10 per entry (ClippedAdam). ``init``: a params NamedTuple for the
    guide's starting locations (default: every row at its prior mean, noise = off = 0.1).
    ``progress(step, loss)`` is called every ``progress_every`` steps.
    """
    fit_priors = check_options(guide, map_in, steps, priors)
    init = init if init is not None else prior_mean_params(model, data.n_routes, data.n_skills, priors)
    r_n, k_n = data.n_routes, data.n_skills
    with jax.enable_x64(True):
        auto = _guide(model, guide, init, r_n, k_n, fit_priors)
        enumerated = finite_factors(NUMPYRO_MODELS[model])
        decay = (lr_final / lr) ** (1.0 / max(steps - 1, 1))
        optim = numpyro.optim.ClippedAdam(step_size=lambda i: lr * decay ** i, clip_norm=10.0)
        svi = SVI(lambda: enumerated(data, fit_priors), lambda: auto(), optim,
                  TraceEnum_ELBO(num_particles=num_particles, max_plate_nesting=2))
        key_init, key_post = jax.random.split(jax.random.PRNGKey(seed))
        numpyro.handlers.seed(auto, key_init)()  # the prototype, eagerly on the small prior model
        state = jax.jit(svi.init)(key_init)  # the enumerated model traced once, not op by op
        chunk = max(1, min(progress_every, steps))

        @jax.jit
        def run_chunk(state, start):
            def body(s, i):
                new, loss = svi.update(s)
                keep = start + i < steps  # the last chunk may run past the end
                return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, s), loss

            return jax.lax.scan(body, state, jnp.arange(chunk))

        losses = []
        for start in range(0, steps, chunk):
            state, chunk_losses = run_chunk(state, start)
            losses.append(np.asarray(chunk_losses)[: steps - start])
            if progress is not None:
                progress(min(start + chunk, steps), float(losses[-1][-1]))
        losses = np.concatenate(losses)
        return _result(model, auto, svi.get_params(state), losses, guide, key_post, posterior_samples)


def fit_svi_batches(model: str, batches, n_traces: int, n_routes: int, n_skills: int, n_chars: int, max_len: int, *,
                    guide: str = "delta", priors: Priors = Priors(), steps: int = 2000, lr: float = 0.05,
                    lr_final: float = 0.002, seed: int = 0, init=None, map_in: str = "softmax",
                    posterior_samples: int = 1000, progress: Callable | None = None,
                    progress_every: int = 50) -> SVIResult:
    """SVI on minibatches of a corpus too large to hold: each step's loss is the negative ELBO
    with the minibatch's log evidence scaled by ``n_traces / its traces`` (an unbiased
    estimate of the corpus's when the minibatches sample the traces uniformly).

    The discrete selections are summed out in closed form (:func:`~latentsel.inference.exact.exact_log_evidence`,
    its log-space branch where a step underflows), so the objective is :func:`fit_svi`'s,
    ``Trace_ELBO`` over the global sites alone; with one minibatch of the whole corpus the
    optimum is the same. ``batches``: an iterator of ``(data, n)``, a padded
    :class:`~latentsel.models.data.HLSMData` (from a few shapes: one compilation each; any
    hidden-step blocks are left out, so give traces without them) and the number of real
    traces in it. The other arguments are :func:`fit_svi`'s.
    """
    fit_priors = check_options(guide, map_in, steps, priors)
    if n_traces < 1:
        raise ValueError(f"n_traces must be at least 1, got {n_traces}")
    init = init if init is not None else prior_mean_params(model, n_routes, n_skills, priors)
    with jax.enable_x64(True):
        auto = _guide(model, guide, init, n_routes, n_skills, fit_priors)

        def batch_model(arrays, scale):
            params = global_prior(model, n_routes, n_skills, fit_priors)
            data = HLSMData.from_arrays(arrays, n_chars, max_len)
            numpyro.factor("log_evidence", scale * exact_log_evidence(model, params, data).sum())

        decay = (lr_final / lr) ** (1.0 / max(steps - 1, 1))
        optim = numpyro.optim.ClippedAdam(step_size=lambda i: lr * decay ** i, clip_norm=10.0)
        svi = SVI(batch_model, lambda arrays, scale: auto(), optim, Trace_ELBO())
        key_init, key_post = jax.random.split(jax.random.PRNGKey(seed))
        numpyro.handlers.seed(auto, key_init)()  # the prototype, eagerly on the small prior model
        batches = iter(batches)

        def take():
            try:
                data, n = next(batches)
            except StopIteration:
                raise ValueError("the minibatches ran out before the last step") from None
            return tuple(jnp.asarray(a) for a in data.arrays()), jnp.asarray(n_traces / max(int(n), 1), jnp.float64)

        arrays, scale = take()
        state = svi.init(key_init, arrays, scale)
        update = jax.jit(svi.update)  # compiled once per minibatch shape
        losses = np.empty(steps)
        for step in range(steps):
            if step:
                arrays, scale = take()
            state, loss = update(state, arrays, scale)
            losses[step] = float(loss)
            if progress is not None and ((step + 1) % progress_every == 0 or step + 1 == steps):
                progress(step + 1, losses[step])
        return _result(model, auto, svi.get_params(state), losses, guide, key_post, posterior_samples)


def _guide(model: str, guide: str, init, n_routes: int, n_skills: int, priors: Priors):
    """The AutoDelta or AutoNormal guide of the global sites, starting at ``init``."""
    values = {name: jnp.asarray(v, jnp.float64) for name, v in zip(model_spec(model).sites, init)}
    # the guide's prototype comes from the global prior alone: an AutoGuide runs its model
    # op by op to build it, and the enumerated model takes tens of seconds that way
    cls = AutoDelta if guide == "delta" else AutoNormal
    return cls(lambda: global_prior(model, n_routes, n_skills, priors), init_loc_fn=init_to_value(values=values))


def _result(model: str, auto, raw: dict, losses, guide: str, key, posterior_samples: int) -> SVIResult:
    """The :class:`SVIResult` of the fitted guide parameters ``raw``: the delta guide's point, or
    the normal guide's posterior mean, median and standard deviations (``posterior_samples`` draws)."""
    names = model_spec(model).sites
    guide_params = {k: np.asarray(v) for k, v in raw.items()}
    if guide == "delta":
        point = params_from_sites(model, {name: np.asarray(raw[f"{name}_auto_loc"]) for name in names})
        return SVIResult(_as_float(point), losses, guide, guide_params, None, None)
    draws = auto.sample_posterior(key, raw, sample_shape=(posterior_samples,))
    mean = params_from_sites(model, {name: np.asarray(draws[name]).mean(0) for name in names})
    std = params_from_sites(model, {name: np.asarray(draws[name]).std(0) for name in names})
    median = params_from_sites(model, {name: np.asarray(v) for name, v in auto.median(raw).items()})
    return SVIResult(_renormalize(mean), losses, guide, guide_params, _as_float(median), _as_float(std))


def _as_float(params):
    """Scalars as Python floats, arrays as float64 numpy."""
    return type(params)(*(float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64) for v in params))


def _renormalize(params):
    """Rows summing to 1 to float64 precision (a Monte Carlo mean of simplex draws sums to
    1 only up to rounding in each draw)."""
    params = _as_float(params)
    return params._replace(**{f: params[i] / params[i].sum(-1, keepdims=True) for i, f in enumerate(params._fields[:2])})
