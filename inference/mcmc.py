"""NUTS over the HLSM's global parameters with the discrete selections summed out (DESIGN §5).

The potential is -log p(θ | D) + const in NumPyro's unconstrained coordinates (stick-breaking
for the rows, logit for noise and off_module, Jacobians included):

* ``potential="closed"``: the global prior plus the closed-form log evidence
  (:func:`~latentsel.inference.collapsed.log_evidence_fn`), hidden-step blocks included.
* ``potential="enumerated"``: the enumerated NumPyro program, summed out by NumPyro's funsor
  enumeration (any corpus the model covers; several times slower).
* ``"auto"``: closed.

The collapsed model's log density equals the enumerated program's ``TraceEnum_ELBO`` log
joint (tests, 1e-6 relative in float64). The enumerated potential is larger by a constant:
NumPyro's funsor ``log_density`` counts each padded (masked) step as the log of the number
of enumerated values; the constant does not depend on θ, so the draws are the same.

Chains: ``chain_method=None`` runs them in parallel when JAX has a device per chain (on CPU
only if ``numpyro.set_host_device_count`` ran before JAX started, which a library cannot
do), otherwise sequentially. Sequential rather than vectorized: each chain adapts and runs
its own trees, whereas vectorized chains advance in lockstep, every step costing the longest
tree of any chain; sequential chains reuse one compiled kernel and keep NumPyro's progress bar.

Results are numpy arrays with a chain dimension, ``[chains, draws, ...]``, so that the
diagnostics module can build ArviZ InferenceData from them; this module does not use ArviZ.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.contrib.funsor import enum
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, trace
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import constrain_fn, potential_energy

from latentsel.inference.collapsed import (
    collapsed_model,
    finite_factors,
    global_prior,
    log_evidence_fn,
    params_from_sites,
)
from latentsel.models.data import HLSMData
from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.params import Priors
from latentsel.models.registry import model_spec

__all__ = ["MCMCResult", "fit_nuts", "potential_fn", "diagnostics", "summary", "POTENTIALS"]

POTENTIALS = ("auto", "closed", "enumerated")
MAX_PLATE_NESTING = 2


class MCMCResult(NamedTuple):
    """Posterior draws of the global parameters and the sampler's statistics.

    params: the model's params NamedTuple at the posterior mean;
    samples: {site: float64[chains, draws, *site_shape]} (constrained, site names of
        ``model_spec(model).sites``);
    diverging: bool[chains, draws]; accept_prob: float64[chains, draws], the mean
        acceptance probability of each NUTS tree; num_steps: int[chains, draws], leapfrog
        steps per tree; potential_energy: float64[chains, draws];
    step_size: float64[chains], the adapted step size; chain_method, potential: what ran.
    """

    params: tuple
    samples: dict
    diverging: np.ndarray
    accept_prob: np.ndarray
    num_steps: np.ndarray
    potential_energy: np.ndarray
    step_size: np.ndarray
    chain_method: str
    potential: str


def _resolve_potential(potential: str, data: HLSMData) -> str:
    if potential not in POTENTIALS:
        raise ValueError(f"unknown potential {potential!r}; choose from {', '.join(POTENTIALS)}")
    return "closed" if potential == "auto" else potential


def potential_fn(model: str, data: HLSMData, priors: Priors = Priors(), potential: str = "auto"):
    """``U(z) = -log p(θ(z), D) - log |det ∂θ/∂z|``, with ``z``: {site: unconstrained array}."""
    kind = _resolve_potential(potential, data)
    if kind == "closed":
        f = log_evidence_fn(model, data)
        return lambda z: potential_energy(lambda: collapsed_model(model, data, priors, f), (), {}, z)
    enumerated = enum(finite_factors(NUMPYRO_MODELS[model]), first_available_dim=-MAX_PLATE_NESTING - 1)
    return lambda z: potential_energy(lambda: enumerated(data, priors), (), {}, z, enum=True)


def _unconstrained_shapes(model: str, n_routes: int, n_skills: int, priors: Priors) -> dict:
    def draw(key):
        tr = trace(seed(lambda: global_prior(model, n_routes, n_skills, priors), key)).get_trace()
        return {name: biject_to(s["fn"].support).inv(s["value"]) for name, s in tr.items() if s["type"] == "sample"}

    return jax.eval_shape(draw, jax.random.PRNGKey(0))


def fit_nuts(model: str, data: HLSMData, *, priors: Priors = Priors(), num_warmup: int = 500, num_samples: int = 500,
             num_chains: int = 2, seed: int = 0, chain_method: str | None = None, potential: str = "auto",
             target_accept_prob: float = 0.8, max_tree_depth: int = 8, init_radius: float = 2.0,
             progress_bar: bool = False) -> MCMCResult:
    """NUTS with a diagonal mass matrix, in float64.

    ``progress_bar`` shows NumPyro's bars when x64 is enabled globally (the CLI does).
    Each chain starts at z ~ Uniform(-init_radius, init_radius) in the unconstrained
    coordinates (NumPyro's ``init_to_uniform``), so that R-hat compares chains from
    different starting points.
    """
    for name, value, low in (("num_warmup", num_warmup, 0), ("num_samples", num_samples, 1),
                             ("num_chains", num_chains, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    kind = _resolve_potential(potential, data)
    # NumPyro's progress-bar callback returns its counter in the thread's default integer
    # type, which mismatches inside a local enable_x64 scope; with x64 on globally it works
    progress_bar = progress_bar and bool(jax.config.read("jax_enable_x64"))
    if chain_method is None:
        chain_method = "parallel" if jax.local_device_count() >= num_chains else "sequential"
    r_n, k_n = data.n_routes, data.n_skills
    with jax.enable_x64(True):
        shapes = _unconstrained_shapes(model, r_n, k_n, priors)
        key_init, key_run = jax.random.split(jax.random.PRNGKey(seed))
        keys = jax.random.split(key_init, len(shapes))
        init = {name: jax.random.uniform(key, (num_chains, *s.shape), jnp.float64, -init_radius, init_radius)
                for key, (name, s) in zip(keys, sorted(shapes.items()))}
        if num_chains == 1:
            init = {name: v[0] for name, v in init.items()}
        kernel = NUTS(potential_fn=jax.jit(potential_fn(model, data, priors, kind)),
                      target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth)
        mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                    chain_method=chain_method, progress_bar=progress_bar)
        mcmc.run(key_run, init_params=init,
                 extra_fields=("diverging", "accept_prob", "num_steps", "potential_energy", "adapt_state.step_size"))
        z = mcmc.get_samples(group_by_chain=True)
        prior = lambda: global_prior(model, r_n, k_n, priors)  # noqa: E731
        constrained = jax.jit(lambda z: constrain_fn(prior, (), {}, z, batch_ndims=2))(z)
        extra = mcmc.get_extra_fields(group_by_chain=True)
    samples = {name: np.asarray(constrained[name], np.float64) for name in model_spec(model).sites}
    mean = params_from_sites(model, {name: v.mean(axis=(0, 1)) for name, v in samples.items()})
    mean = type(mean)(*(float(v) if np.ndim(v) == 0 else v for v in mean))
    mean = mean._replace(**{f: mean[i] / mean[i].sum(-1, keepdims=True) for i, f in enumerate(mean._fields[:2])})
    return MCMCResult(
        params=mean,
        samples=samples,
        diverging=np.asarray(extra["diverging"], bool),
        accept_prob=np.asarray(extra["accept_prob"], np.float64),
        num_steps=np.asarray(extra["num_steps"]),
        potential_energy=np.asarray(extra["potential_energy"], np.float64),
        step_size=np.asarray(extra["adapt_state.step_size"], np.float64)[:, -1],
        chain_method=chain_method,
        potential=kind,
    )


def diagnostics(samples: dict) -> dict:
    """Split R-hat and effective sample size of every entry: ``{site: (r_hat, ess)}``, each
    shaped like the site (``samples[site]: [chains, draws, *shape]``, at least 4 draws)."""
    return {name: (np.asarray(split_gelman_rubin(v)), np.asarray(effective_sample_size(v))) for name, v in samples.items()}


def summary(result: MCMCResult) -> dict:
    """Per-site convergence summary (JSON-ready): the worst entry's split R-hat and ESS."""
    chains, draws = result.diverging.shape
    out = {"chains": chains, "draws": draws, "divergences": int(result.diverging.sum()),
           "accept_prob": float(result.accept_prob.mean()), "mean_tree_steps": float(result.num_steps.mean()),
           "sites": {}}
    for name, (r_hat, ess) in diagnostics(result.samples).items():
        out["sites"][name] = {"r_hat_max": float(np.nanmax(r_hat)), "ess_min": float(np.nanmin(ess)),
                              "ess_median": float(np.nanmedian(ess))}
    return out
