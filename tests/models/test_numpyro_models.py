"""The NumPyro programs give the closed form's TraceEnum_ELBO loss (DESIGN §5)."""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import TraceEnum_ELBO
from scipy import stats

from latentsel.analysis.posterior import posterior_from_data
from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.params import Priors
from latentsel.models.registry import MODELS, model_spec
from latentsel.traces.emission import build_data
from tests.inference.test_exact import random_params, random_traces, small_world  # noqa: F401


def log_prior(params, model, r_n, k_n, priors=Priors()):
    conc_r, conc_k = model_spec(model).concentration(priors, r_n, k_n)
    lp = 0.0
    for rows, conc in ((params[0], conc_r), (params[1], conc_k)):
        rows, conc = np.asarray(rows).reshape(-1, conc.shape[-1]), conc.reshape(-1, conc.shape[-1])
        lp += sum(stats.dirichlet.logpdf(x, c) for x, c in zip(rows, conc))
    return lp + stats.beta.logpdf(params.noise, *priors.noise) + stats.beta.logpdf(params.off_module, *priors.off_module)


def delta_guide(model, params):
    def guide(data, priors=Priors()):
        for name, value in zip(model_spec(model).sites, params):
            value = jnp.asarray(value)
            numpyro.sample(name, dist.Delta(value, event_dim=value.ndim))

    return guide


def enum_loss(model, params, data):
    """The TraceEnum_ELBO loss with a Delta guide at ``params``, float64. Jitted whole: op-by-op
    dispatch compiles every primitive of the enumerated contraction separately, many times slower."""
    with jax.enable_x64(True):
        loss = jax.jit(lambda key: TraceEnum_ELBO(max_plate_nesting=2).loss(
            key, {}, NUMPYRO_MODELS[model], delta_guide(model, params), data))
        return float(loss(jax.random.PRNGKey(0)))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_trace_enum_elbo_equals_closed_form(small_world, model, seed):  # noqa: F811
    rng = np.random.default_rng(seed)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = random_traces(rng, small_world, 10, program=model != "grammar")
    data = build_data(traces, small_world, model=model)
    closed = posterior_from_data(data, params, model).log_evidence.sum() + log_prior(
        params, model, small_world.n_routes, small_world.n_skills)
    np.testing.assert_allclose(-enum_loss(model, params, data), closed, rtol=1e-6)
