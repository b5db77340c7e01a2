"""The Pyro programs against the NumPyro programs, the closed form and brute force (DESIGN §5)."""
import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.util import site_is_subsample

import latentsel as ls
from latentsel.analysis.posterior import posterior_from_data
from latentsel.inference.em import fit_em
from latentsel.inference.enumerated import numpyro_log_evidence
from latentsel.inference.pyro_enum import pyro_log_evidence, pyro_map
from latentsel.inference.pyro_svi import fit_pyro_svi
from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.pyro_models import PYRO_MODELS
from latentsel.models.registry import MODELS, model_spec
from latentsel.traces.emission import build_data
from tests.inference.test_exact import brute_force, random_params, random_traces, small_world  # noqa: F401
from tests.inference.test_hidden import brute_force as hidden_brute_force
from tests.inference.test_hidden import hidden_traces, reading_world  # noqa: F401
from tests.inference.test_svi import corpus  # noqa: F401
from tests.models.test_numpyro_models import enum_loss, log_prior

REL = 1e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")
# hidden steps read by the next step and by later ones, two in a row, trailing, never observed
HIDDEN = [(3, (0,)), (3, (1,)), (3, (0, 1)), (3, (2,)), (2, (0, 1))]
GRAMMAR_HIDDEN = [(3, (0,)), (2, (1,)), (3, (1, 2)), (3, (0, 1))]


def pyro_enum_loss(model, params, data):
    def guide(data):
        for name, value in zip(model_spec(model).sites, params):
            value = torch.as_tensor(np.asarray(value), dtype=torch.float64)
            pyro.sample(name, pdist.Delta(value, event_dim=value.dim()))

    with torch.no_grad():
        return TraceEnum_ELBO(max_plate_nesting=2).loss(PYRO_MODELS[model], guide, data)


def corpus_with_hidden(rng, world, model, n=8):
    program = model != "grammar"
    return random_traces(rng, world, n, program=program) + hidden_traces(
        rng, world, program=program, patterns=HIDDEN if program else GRAMMAR_HIDDEN)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_pyro_loss_equals_numpyro_and_closed_form(reading_world, model, seed):  # noqa: F811
    small_world = reading_world
    rng = np.random.default_rng(seed)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    data = build_data(corpus_with_hidden(rng, small_world, model), small_world, model=model)
    closed = posterior_from_data(data, params, model).log_evidence.sum() + log_prior(
        params, model, small_world.n_routes, small_world.n_skills)
    pyro_loss = pyro_enum_loss(model, params, data)
    np.testing.assert_allclose(-pyro_loss, closed, rtol=REL)
    np.testing.assert_allclose(pyro_loss, enum_loss(model, params, data), rtol=REL)


@pytest.mark.parametrize("model", list(MODELS))
def test_per_trace_evidence_of_every_backend_equals_brute_force(reading_world, model):  # noqa: F811
    small_world = reading_world
    rng = np.random.default_rng(3)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = corpus_with_hidden(rng, small_world, model)
    want = np.array([(hidden_brute_force if any(y is None for y in tr.steps) else brute_force)(
        tr, params, model, small_world)[0] for tr in traces])
    for backend in ("closed", "numpyro", "pyro"):
        got = ls.log_evidence(traces, params, model, small_world, backend=backend)
        assert got.dtype == np.float64 and got.shape == (len(traces),)
        np.testing.assert_allclose(got, want, rtol=REL, atol=1e-12, err_msg=backend)
    # chunks that split the corpus (and its blocks) give the same numbers
    data = build_data(traces, small_world, model=model)
    np.testing.assert_allclose(pyro_log_evidence(model, params, data, chunk=3), want, rtol=REL, atol=1e-12)
    np.testing.assert_allclose(numpyro_log_evidence(model, params, data, chunk=3, block_chunk=2), want, rtol=REL,
                               atol=1e-12)


def test_unknown_backend_and_model(small_world):  # noqa: F811
    rng = np.random.default_rng(0)
    params = random_params(rng, "modular", small_world.n_routes, small_world.n_skills)
    traces = random_traces(rng, small_world, 2)
    with pytest.raises(ValueError, match="unknown backend 'stan'"):
        ls.log_evidence(traces, params, "modular", small_world, backend="stan")
    data = build_data(traces, small_world)
    with pytest.raises(ValueError, match="unknown model 'hmm'"):
        pyro_log_evidence("hmm", params, data)
    with pytest.raises(ValueError, match="unknown model 'hmm'"):
        numpyro_log_evidence("hmm", params, data)


@pytest.mark.parametrize("model", list(MODELS))
def test_infer_discrete_map_equals_brute_force(small_world, model):  # noqa: F811
    """Pyro's infer_discrete maximizes over the off-module flags too: its (r, k) path is the
    brute-force argmax of p(r, k, u | D). Where no flag is likely to be on, that is also our
    MAP with the flags summed out."""
    rng = np.random.default_rng(5)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = random_traces(rng, small_world, 12, program=model != "grammar")
    data = build_data(traces, small_world, model=model)
    route, skill = pyro_map(model, params, data)
    post = posterior_from_data(data, params, model)
    agree = 0
    for i, tr in enumerate(traces):
        d = tr.depth
        want = brute_force(tr, params, model, small_world, off_max=True)[4]
        assert list(zip(route[i, :d].tolist(), skill[i, :d].tolist())) == list(want), tr.id
        assert (route[i, d:] == -1).all() and (skill[i, d:] == -1).all()
        if (post.p_off[i, :d] < 0.5).all():
            assert (route[i, :d] == post.map_route[i, :d]).all() and (skill[i, :d] == post.map_skill[i, :d]).all()
            agree += 1
    assert agree >= 3  # the comparison with our MAP is not vacuous


@pytest.mark.slow  # 30-45 s of JIT compilation; the default suite keeps to 10 minutes
def test_pyro_svi_reaches_numpyro_optimum(corpus):  # noqa: F811
    """The same run as test_svi.test_delta_reaches_em_map, in Pyro: its delta guide reaches
    EM's optimum, and its first loss is NumPyro's. Pyro's ClippedAdam decays the step size
    from 0.05 to 0.002 over 300 steps here; it then settles to ~1e-6 in θ (measured 6e-7)."""
    from latentsel.inference.svi import fit_svi

    _, data = corpus
    em = fit_em("modular", data, tol=1e-13, max_iter=5000)
    res = fit_pyro_svi("modular", data, guide="delta", steps=300, seed=0)
    ref = fit_svi("modular", data, guide="delta", steps=1, seed=0)
    np.testing.assert_allclose(res.losses[0], ref.losses[0], rtol=1e-10)
    assert res.losses.shape == (300,) and res.median is None and res.std is None
    for got, want in zip(res.params, em.params):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_pyro_gradient_is_finite_where_no_module_fits(small_world):  # noqa: F811
    """A step whose length no module reproduces has -inf on-module factors everywhere; the
    off-module flag keeps the loss finite, and the gradient must stay finite too."""
    rng = np.random.default_rng(2)
    params = random_params(rng, "modular", 3, 4)
    data = build_data(random_traces(rng, small_world, 8), small_world)
    assert ((np.asarray(data.match) < 0).all(axis=(2, 3)) & np.asarray(data.step_mask)).any()
    values = [torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True) for v in params]

    def guide(data):
        for name, value in zip(model_spec("modular").sites, values):
            pyro.sample(name, pdist.Delta(value, event_dim=value.dim()))

    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(PYRO_MODELS["modular"], guide, data)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v.grad).all() for v in values)


def test_same_site_names_as_numpyro(small_world):  # noqa: F811
    import jax
    import numpyro

    rng = np.random.default_rng(4)
    for model in ("modular", "grammar"):
        params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
        data = build_data(corpus_with_hidden(rng, small_world, model, n=4), small_world, model=model)
        np_sites = []

        def names(data=data, model=model, np_sites=np_sites):
            tr = numpyro.handlers.trace(numpyro.handlers.seed(NUMPYRO_MODELS[model], 0)).get_trace(data)
            np_sites.extend(k for k, v in tr.items() if v["type"] == "sample")
            return 0

        jax.eval_shape(names)  # the site names, without compiling every operation
        values = {name: torch.as_tensor(np.asarray(v)) for name, v in zip(model_spec(model).sites, params)}
        tr = pyro.poutine.trace(pyro.poutine.condition(PYRO_MODELS[model], values)).get_trace(data)
        pyro_sites = [k for k, v in tr.nodes.items() if v["type"] == "sample" and not site_is_subsample(v)]
        assert pyro_sites == np_sites
        assert set(model_spec(model).sites) < set(np_sites) and ("off" in np_sites or "off_2" in np_sites)
        assert any(name.startswith("route_read") for name in np_sites) or model == "grammar"


@pytest.mark.parametrize("model", ["entangled", "grammar"])
@pytest.mark.parametrize("guide", ["delta", "normal"])
def test_pyro_svi_runs_on_every_model_with_hidden_steps(small_world, model, guide):  # noqa: F811
    """Both guides run on the entangled and grammar programs with hidden-step blocks: finite
    losses and estimates, rows on the simplex, the delta guide's loss falling, the normal
    guide's standard deviations positive."""
    rng = np.random.default_rng(6)
    data = build_data(corpus_with_hidden(rng, small_world, model, n=30), small_world, model=model)
    seen = []
    res = fit_pyro_svi(model, data, guide=guide, steps=40, seed=1, posterior_samples=50,
                       progress=lambda step, loss: seen.append(step), progress_every=20)
    assert seen == [20, 40] and res.losses.shape == (40,) and np.isfinite(res.losses).all()
    assert all(np.isfinite(np.asarray(v)).all() for v in res.params)
    np.testing.assert_allclose(res.params[0].sum(-1), 1.0, rtol=1e-9)
    if guide == "delta":
        assert res.losses[-1] < res.losses[0]
    else:
        assert (np.asarray(res.std[1]) > 0).all() and res.median is not None
