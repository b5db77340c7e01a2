"""The boundary of the parameter space: every backend exact or a one-line refusal, never NaN.

Exact zeros in the execution or transition rows, ``off_module`` and ``noise`` down to 1e-300
and up to 1 - 1e-12, on traces with hidden steps and with steps no module can produce. The
reference is the brute force of the definition, in log space (``test_hidden.brute_force``).
"""
import numpy as np
import pytest

import latentsel as ls
from latentsel.analysis.posterior import posterior
from latentsel.models.registry import MODELS, default_params
from tests.inference.test_exact import random_params, random_traces
from tests.inference.test_hidden import brute_force, hidden_traces, reading_world  # noqa: F401

REL = 1e-6
BACKENDS = ("closed", "numpyro", "pyro")


def _with_zeros(params, rng):
    """Rows with about a third of their entries exactly zero (never a whole row)."""
    rows = []
    for a in params[:2]:
        a = np.array(a)
        drop = rng.random(a.shape) < 0.35
        drop[..., 0] &= ~drop[..., 1:].all(axis=-1)  # keep at least one entry per row
        a = np.where(drop, 0.0, a)
        rows.append(a / a.sum(axis=-1, keepdims=True))
    return params._replace(**dict(zip(params._fields[:2], rows)))


CASES = {
    "zero_rows": lambda p, rng: _with_zeros(p, rng),
    "off_1e-290": lambda p, rng: p._replace(off_module=1e-290),
    "noise_1e-300": lambda p, rng: p._replace(noise=1e-300),
    "noise_near_1": lambda p, rng: p._replace(noise=1 - 1e-12),
    "zeros_and_tiny_off": lambda p, rng: _with_zeros(p, rng)._replace(off_module=1e-250, noise=1e-100),
}


def corpus(rng, world, model):
    program = model != "grammar"
    traces = hidden_traces(rng, world, program=program, patterns=[(3, (0,)), (3, (1,)), (2, ())])
    # random traces hold steps that no module can produce (only the off-module branch explains them)
    return traces + random_traces(rng, world, 4, program=program)


# the generative programs (NumPyro, Pyro) compile for each case, so they run on the cases
# that combine the boundaries; the closed form runs on every case
ALL_BACKENDS = {"zeros_and_tiny_off", "off_1e-290", "noise_1e-300"}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_backend_exact_at_the_boundary(reading_world, model, case):  # noqa: F811
    world = reading_world
    rng = np.random.default_rng(sorted(CASES).index(case))
    params = CASES[case](random_params(rng, model, world.n_routes, world.n_skills), rng)
    traces = corpus(rng, world, model)
    want = [brute_force(tr, params, model, world) for tr in traces]
    for backend in BACKENDS if case in ALL_BACKENDS else ("closed",):
        got = ls.log_evidence(traces, params, model, world, backend=backend)
        assert np.isfinite(got).all(), backend
        np.testing.assert_allclose(got, [w[0] for w in want], rtol=REL, err_msg=backend)
    post = posterior(traces, params, model, world)
    for field in ("route_probs", "skill_probs", "p_off"):
        assert np.isfinite(getattr(post, field)).all(), field
    for i, (tr, w) in enumerate(zip(traces, want)):
        d = tr.depth
        np.testing.assert_allclose(post.route_probs[i, :d], w[1], rtol=REL, atol=1e-12, err_msg=tr.id)
        np.testing.assert_allclose(post.skill_probs[i, :d], w[2], rtol=REL, atol=1e-12, err_msg=tr.id)
        np.testing.assert_allclose(post.p_off[i, :d], w[3], rtol=REL, atol=1e-12, err_msg=tr.id)


@pytest.mark.parametrize("model", ["modular", "grammar"])
def test_backends_agree_on_the_default_world_with_exact_zeros(world, model):
    """Faithful execution rows (fidelity 1: every other entry is 0) and a tiny off_module on
    the default world, where torch's probability clamping used to change the evidence."""
    params = default_params(model, world.n_routes, world.n_skills, fidelity=1.0, off_module=1e-200)
    rng = np.random.default_rng(0)
    traces = random_traces(rng, world, 3, max_depth=3, program=model != "grammar")
    got = {b: ls.log_evidence(traces, params, model, world, backend=b) for b in BACKENDS}
    assert np.isfinite(got["closed"]).all()
    for b in BACKENDS[1:]:
        np.testing.assert_allclose(got[b], got["closed"], rtol=REL, err_msg=b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_parameters_are_refused(reading_world, backend):  # noqa: F811
    world = reading_world
    rng = np.random.default_rng(0)
    params = random_params(rng, "modular", world.n_routes, world.n_skills)
    traces = random_traces(rng, world, 2)
    with pytest.raises(ValueError, match=r"noise = 1e-310 is subnormal"):
        ls.log_evidence(traces, params._replace(noise=1e-310), "modular", world, backend=backend)
    rows = np.array(params.route_exec)
    rows[0, 1] = 1e-310
    rows[0] /= rows[0].sum()
    with pytest.raises(ValueError, match=r"route_exec\[0, 1\] = [0-9.]+e-310 is subnormal"):
        ls.log_evidence(traces, params._replace(route_exec=rows), "modular", world, backend=backend)
    with pytest.raises(ValueError, match=r"off_module must lie in \(0, 1\), got 0.0"):
        ls.log_evidence(traces, params._replace(off_module=0.0), "modular", world, backend=backend)
