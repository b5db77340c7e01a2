"""SVI with TraceEnum_ELBO on the modular, entangled and grammar models: AutoDelta reaches
EM's MAP; AutoNormal improves the ELBO (and, on modular, recovers the rows the data reach)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import TraceEnum_ELBO

import latentsel as ls
from latentsel.inference.collapsed import finite_factors
from latentsel.inference.em import e_step, fit_em, objective
from latentsel.inference.svi import fit_svi
from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.params import ModularParams
from latentsel.models.registry import default_params, model_spec
from latentsel.traces.emission import build_data
from latentsel.traces.simulate import simulate
from tests.inference.test_exact import random_params, random_traces, small_world  # noqa: F401
from tests.models.test_numpyro_models import delta_guide

# modular keeps 400 traces so that every skill row is reached > 150 times (the AutoNormal
# recovery test); 200 keep the entangled and grammar fits fast
N_TRACES = {"modular": 400, "entangled": 200, "grammar": 200}


@functools.cache
def _corpus(model: str):
    """Depth-1..3 traces simulated from known parameters of ``model`` on a 3 x 4 world whose
    alphabet is large enough that most steps identify their module. Execution rows put 0.8
    on the intended module; grammar transition rows are drawn from a flat Dirichlet (grammar
    prompts state no program). Returns (truth, data)."""
    base = ls.default_world()
    skills = [base.skills[base.skill_index(n)] for n in ("reverse", "rotl", "shift1", "dedup")]
    routes = [base.routes[base.route_index(n)] for n in ("prev", "input", "cat_prev_input")]
    world = ls.World(skills=skills, routes=routes, alphabet="abcdef", max_len=8)
    rng = np.random.default_rng(0)
    truth = default_params(model, 3, 4, fidelity=0.8, noise=0.05, off_module=0.05)
    if model == "grammar":
        truth = truth._replace(route_trans=rng.dirichlet(np.ones(3), 4), skill_trans=rng.dirichlet(np.ones(4), 5))
    prompts = random_traces(rng, world, N_TRACES[model], program=model != "grammar")
    traces = simulate(prompts, truth, model, world, seed=1)
    return truth, build_data(traces, world, model=model)


@functools.cache
def _em_map(model: str):
    """EM run to J's optimum on ``_corpus(model)``."""
    fit = fit_em(model, _corpus(model)[1], tol=1e-13, max_iter=5000)
    assert fit.converged
    return fit


@pytest.fixture(scope="module")
def corpus():
    return _corpus("modular")


# grammar's 3000 steps take 17-25 s of the default suite's 10 minutes: it runs with -m slow
@pytest.mark.parametrize("model, steps, atol", [("modular", 600, 1e-7), ("entangled", 1500, 1e-6),
                                                 pytest.param("grammar", 3000, 1e-5, marks=pytest.mark.slow)])
def test_delta_reaches_em_map(model, steps, atol):
    """EM maximizes J(θ), the log posterior in softmax coordinates, and the delta guide runs
    on priors raised by one, whose density on the simplex is that same J (fit_svi's
    docstring): one objective, so the optimum must agree.

    At t = 1 the routings prev and input both give the input, so in the start context the
    likelihood fixes only the sum of their two entries. In the entangled start rows
    route_exec_ctx[R, c] the prior alone sets the split, prev : input = 2.0 : 0.5 when c is
    prev, 0.5 : 2.0 when c is input, 1 : 1 otherwise: checked exactly, it pins the shifted
    priors. In the grammar the chain ties that split to route_trans's prev and input rows at
    step 2: a flat ridge. These are the optimizer's slowest directions, hence more steps
    for entangled and grammar than for modular.

    The tolerances are the optimizer's: the delta guide's loss is deterministic (the
    selections are enumerated, nothing is sampled), so Adam, its step size decayed from 0.05
    to 0.002, settles onto the optimum rather than jittering around it. Measured max
    |SVI - EM| over all entries: modular 7e-9, entangled 3e-8, grammar 1e-6; each atol is
    ten or more times that. J is flat to first order at the optimum: measured within 3e-14
    relative of EM's.
    """
    data = _corpus(model)[1]
    em = _em_map(model)
    res = fit_svi(model, data, guide="delta", steps=steps, seed=0)
    assert set(res.guide_params) == {f"{name}_auto_loc" for name in model_spec(model).sites}
    assert res.median is None and res.std is None and res.losses.shape == (steps,)
    for got, want in zip(res.params, em.params):
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    j_svi = objective(model, res.params, e_step(model, res.params, data).log_evidence)
    np.testing.assert_allclose(j_svi, em.objective[-1], rtol=1e-10)
    if model == "entangled":
        start = res.params.route_exec_ctx[data.n_routes]  # [intended c, executed r]; 0 = prev, 1 = input
        np.testing.assert_allclose(start[:, 0] / start[:, 1], [4.0, 0.25, 1.0], rtol=1e-6)


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


@pytest.mark.parametrize("model", ["entangled", pytest.param("grammar", marks=pytest.mark.slow)])  # 14-24 s
def test_normal_improves_elbo(model):
    """AutoNormal on the entangled and grammar models: the ELBO improves, the posterior mean
    is made of probability rows, every posterior sd is finite and positive. noise and
    off_module are informed by every step, so the guide's mean lies within one posterior sd
    of EM's MAP (measured: within 0.25 sd)."""
    data = _corpus(model)[1]
    em = _em_map(model)
    res = fit_svi(model, data, guide="normal", steps=300, seed=0)
    assert res.losses.shape == (300,)
    # one-sample ELBO estimates (spread ~3 nats here) that fall by ~140 (grammar) and ~190
    # (entangled) nats: compare averages
    assert res.losses[-50:].mean() < res.losses[:10].mean() - 50
    assert set(res.guide_params) == {f"{name}_auto_{kind}" for name in model_spec(model).sites for kind in ("loc", "scale")}
    for mean, median in zip(res.params[:2], res.median[:2]):
        assert mean.shape == median.shape and (mean > 0).all()
        np.testing.assert_allclose(mean.sum(-1), 1.0, rtol=1e-12)
    for std in res.std:
        assert np.isfinite(std).all() and (np.asarray(std) > 0).all()
    for name in ("noise", "off_module"):
        assert abs(getattr(res.params, name) - getattr(em.params, name)) < getattr(res.std, name)


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
