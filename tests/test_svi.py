"""SVI with TraceEnum_ELBO: AutoDelta reaches EM's MAP; AutoNormal improves the ELBO and
recovers the rows the data reach."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import TraceEnum_ELBO

import latentsel as ls
from latentsel.api import exact
from latentsel.emission import build_data
from latentsel.inference.collapsed import finite_factors
from latentsel.inference.em import fit_em, objective
from latentsel.inference.svi import fit_svi
from latentsel.models.numpyro_models import GLOBAL_SITES, NUMPYRO_MODELS
from latentsel.models.params import ModularParams, default_params
from latentsel.simulate import simulate

from test_exact import random_params, random_traces, small_world  # noqa: F401
from test_numpyro_models import delta_guide


@pytest.fixture(scope="module")
def corpus():
    """400 depth-1..3 traces simulated from known modular parameters on a 3 x 4 world whose
    alphabet is large enough that most steps identify their module."""
    base = ls.default_world()
    skills = [base.skills[base.skill_index(n)] for n in ("reverse", "rotl", "shift1", "dedup")]
    routes = [base.routes[base.route_index(n)] for n in ("prev", "input", "cat_prev_input")]
    world = ls.World(skills=skills, routes=routes, alphabet="abcdef", max_len=8)
    rng = np.random.default_rng(0)
    truth = default_params("modular", 3, 4, fidelity=0.8, noise=0.05, off_module=0.05)
    traces = simulate(random_traces(rng, world, 400), truth, "modular", world, seed=1)
    return truth, build_data(traces, world)


def test_delta_reaches_em_map(corpus):
    """EM maximizes J(θ), the log posterior in softmax coordinates, and the delta guide runs
    on priors raised by one, whose density on the simplex is that same J (fit_svi's
    docstring): one objective, so the optimum must agree. The tolerance is the optimizer's:
    Adam with the step size decayed to 0.002 over 600 steps settles to ~1e-5 in θ."""
    _, data = corpus
    em = fit_em("modular", data, tol=1e-13, max_iter=5000)
    res = fit_svi("modular", data, guide="delta", steps=600, seed=0)
    assert set(res.guide_params) == {f"{name}_auto_loc" for name in GLOBAL_SITES["modular"]}
    assert res.median is None and res.std is None and res.losses.shape == (600,)
    for got, want in zip(res.params, em.params):
        np.testing.assert_allclose(got, want, atol=1e-4)
    j_svi = objective("modular", res.params, exact(data, res.params, "modular").log_evidence.sum())
    np.testing.assert_allclose(j_svi, em.objective[-1], rtol=1e-9)


def test_normal_improves_elbo_and_recovers_reached_rows(corpus):
    truth, data = corpus
    seen = []
    res = fit_svi("modular", data, guide="normal", steps=600, seed=0, progress=lambda s, loss: seen.append(s),
                  progress_every=200)
    assert seen == [200, 400, 600]
    # the loss is a one-sample ELBO estimate per step (spread ~1 nat here): compare averages
    assert res.losses[-50:].mean() < res.losses[:10].mean() - 50
    assert {k.rsplit("_auto_", 1)[1] for k in res.guide_params} == {"loc", "scale"}
    visits = np.bincount(np.asarray(data.skill_intended)[np.asarray(data.step_mask)], minlength=4)
    assert (visits > 150).all()
    # every row is reached > 150 times: the posterior std of an entry is at most
    # sqrt(0.25 / 150) = 0.04, and a mean-field guide's mean lies within a few of those
    np.testing.assert_allclose(res.params.skill_exec, truth.skill_exec, atol=0.1)
    np.testing.assert_allclose(res.params.route_exec, truth.route_exec, atol=0.1)
    assert abs(res.params.noise - truth.noise) < 0.02 and abs(res.params.off_module - truth.off_module) < 0.02
    np.testing.assert_allclose(res.params.skill_exec.sum(-1), 1.0, rtol=1e-12)
    assert (res.std.skill_exec > 0).all() and (res.std.skill_exec < 0.1).all()


def test_finite_factors_keeps_the_loss_and_makes_the_gradient_finite(small_world):  # noqa: F811
    """A step whose length no module reproduces makes the raw program's gradient NaN."""
    rng = np.random.default_rng(2)
    params = random_params(rng, "modular", 3, 4)
    traces = random_traces(rng, small_world, 8)
    data = build_data(traces, small_world)
    assert ((np.asarray(data.match) < 0).all(axis=(2, 3)) & np.asarray(data.step_mask)).any()

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: TraceEnum_ELBO(max_plate_nesting=2).loss(
            jax.random.PRNGKey(0), {}, model, delta_guide("modular", p), data)))

    p = ModularParams(*(jnp.asarray(a) for a in params))
    raw, raw_grad = loss(NUMPYRO_MODELS["modular"])(p)
    fixed, fixed_grad = loss(finite_factors(NUMPYRO_MODELS["modular"]))(p)
    assert float(raw) == pytest.approx(float(fixed), rel=1e-12)
    assert np.isnan(np.asarray(raw_grad.route_exec)).any()
    assert all(np.isfinite(np.asarray(g)).all() for g in fixed_grad)


def test_bad_options(corpus):
    _, data = corpus
    with pytest.raises(ValueError, match="unknown guide 'laplace'"):
        fit_svi("modular", data, guide="laplace")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        fit_svi("modular", data, steps=0)
