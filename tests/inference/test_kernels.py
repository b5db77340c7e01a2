"""The compiled evidence and posterior equal the jitted closed form, field by field, and flag
exactly the traces the closed form must recompute in log space."""
import jax
import numpy as np
import pytest

from latentsel.inference.corpus import corpus_log_evidence, corpus_posterior
from latentsel.inference.exact import UNDERFLOW, exact_posterior
from latentsel.inference.kernels import independent_log_evidence, independent_posterior_arrays
from latentsel.traces.emission import build_data
from tests.inference.test_exact import random_params, random_traces, small_world  # noqa: F401


def _jitted(model, params, data, joint=True):
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, exact_posterior(model, params, data.without_blocks(), joint=joint))


def _jitted_p_y(model, params, data):
    """p(y_t) of every observed step by the jitted path's probability-space sum."""
    from latentsel.models.data import emission, execution_rows
    with jax.enable_x64(True):
        rho, kappa = execution_rows(model, params[0], params[1], data)
        p = np.einsum("ntrk,ntr,ntk->nt", np.asarray(emission(data, params.noise, params.off_module)),
                      np.asarray(rho), np.asarray(kappa))
    return np.where(data.emit, p, 1.0)


@pytest.mark.parametrize("model", ["modular", "entangled"])
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_posterior_equals_the_jitted_one(small_world, model, seed):  # noqa: F811
    rng = np.random.default_rng(seed)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    data = build_data(random_traces(rng, small_world, 80, max_depth=4), small_world, model=model)
    *got, careful = independent_posterior_arrays(model, params, data, UNDERFLOW, joint=True)
    assert not careful.any()
    want = _jitted(model, params, data)
    for name, g, w in zip(want._fields, got, want):
        if name.startswith("map"):
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15, err_msg=name)
    ev, careful = independent_log_evidence(model, params, data, UNDERFLOW)
    np.testing.assert_allclose(ev, want.log_evidence, rtol=1e-12)
    assert not careful.any()


@pytest.mark.parametrize("model", ["modular", "entangled"])
def test_underflowing_traces_are_flagged_and_recomputed(small_world, model, monkeypatch):  # noqa: F811
    """Tiny noise and off-module, and execution rows with zeros: some steps' p(y_t) underflows
    (a random step matching no module it may execute). Exactly those traces are flagged, and
    the corpus functions give the log-space numbers for them (finite or -inf), never NaN."""
    rng = np.random.default_rng(5)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    rows = np.asarray(params[0]).copy()
    rows[..., 0] = 0.0  # routing 0 never executes
    rows /= rows.sum(-1, keepdims=True)
    params = params._replace(**{params._fields[0]: rows}, noise=1e-200, off_module=1e-300)
    data = build_data(random_traces(rng, small_world, 60, max_depth=3), small_world, model=model)
    p_y = _jitted_p_y(model, params, data)
    want_flags = (~(p_y >= UNDERFLOW)).any(axis=1)
    assert 0 < want_flags.sum() < data.n_traces  # the case is built to have both kinds
    _, careful = independent_log_evidence(model, params, data, UNDERFLOW)
    np.testing.assert_array_equal(careful, want_flags)
    assert np.array_equal(independent_posterior_arrays(model, params, data, UNDERFLOW, joint=False)[-1], want_flags)
    want = _jitted(model, params, data, joint=False)
    monkeypatch.setenv("LATENTSEL_COMPILED", "always")  # the corpus functions take the compiled pass
    got = corpus_posterior(model, params, data, joint=False)
    assert not np.isnan(got.log_evidence).any()
    np.testing.assert_allclose(got.log_evidence, want.log_evidence, rtol=1e-12)
    np.testing.assert_allclose(got.route_probs, want.route_probs, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got.map_route, want.map_route)
    np.testing.assert_allclose(corpus_log_evidence(model, params, data), want.log_evidence, rtol=1e-12)


def test_the_chain_is_refused(small_world):  # noqa: F811
    rng = np.random.default_rng(0)
    params = random_params(rng, "grammar", small_world.n_routes, small_world.n_skills)
    data = build_data(random_traces(rng, small_world, 5, program=False), small_world, model="grammar")
    with pytest.raises(ValueError, match="not the chain"):
        independent_log_evidence("grammar", params, data, UNDERFLOW)


def _hide(traces, rng):
    """Hide some steps: a step read by later ones (a block) or a trailing one (free, unobserved)."""
    for tr in traces:
        if tr.depth >= 2 and rng.random() < 0.4:
            tr.steps[int(rng.integers(tr.depth))] = None
    return traces


@pytest.mark.parametrize("model", ["modular", "entangled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_e_step_equals_the_jitted_one(small_world, model, seed, monkeypatch):  # noqa: F811
    """The E-step's counts with the compiled kernel equal the jitted ones on the same corpus,
    hidden steps (blocks and unobserved free steps) included."""
    from latentsel.inference.em import e_step
    from latentsel.inference.kernels import independent_counts

    rng = np.random.default_rng(10 + seed)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    data = build_data(_hide(random_traces(rng, small_world, 90, max_depth=4), rng), small_world, model=model)
    assert data.blocks and (data.free & ~data.emit).any()
    stats = {}
    for mode in ("never", "always"):
        monkeypatch.setenv("LATENTSEL_COMPILED", mode)
        stats[mode] = [np.asarray(f) for f in e_step(model, params, data)]
    for name, g, w in zip(("route", "skill", "noise", "off", "log_evidence"), stats["always"], stats["never"]):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-13, err_msg=name)
    *_, careful = independent_counts(model, params, data, UNDERFLOW)
    assert not careful.any()


@pytest.mark.parametrize("model", ["modular", "entangled"])
def test_compiled_e_step_leaves_underflowing_traces_to_the_jitted_path(small_world, model, monkeypatch):  # noqa: F811
    """Where a step's p(y_t) underflows, the kernel counts nothing of its trace (flagged) and the
    E-step adds the jitted path's counts of it: both modes give the same numbers."""
    from latentsel.inference.em import e_step
    from latentsel.inference.kernels import independent_counts

    rng = np.random.default_rng(5)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    rows = np.asarray(params[0]).copy()
    rows[..., 0] = 0.0
    rows /= rows.sum(-1, keepdims=True)
    params = params._replace(**{params._fields[0]: rows}, noise=1e-200, off_module=1e-300)
    data = build_data(random_traces(rng, small_world, 60, max_depth=3), small_world, model=model)
    *_, careful = independent_counts(model, params, data, UNDERFLOW)
    assert 0 < careful.sum() < data.n_traces
    got = {}
    for mode in ("never", "always"):
        monkeypatch.setenv("LATENTSEL_COMPILED", mode)
        got[mode] = [np.asarray(f) for f in e_step(model, params, data)]
    for g, w in zip(got["always"], got["never"]):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-13, equal_nan=True)
    # and the traces it did count are the jitted path's on them alone
    keep = np.flatnonzero(~careful)
    monkeypatch.setenv("LATENTSEL_COMPILED", "never")
    want = [np.asarray(f) for f in e_step(model, params, data.take(keep))]
    values = independent_counts(model, params, data.take(keep), UNDERFLOW)[:-1]
    for g, w in zip(values, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-13)
