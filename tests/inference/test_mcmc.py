"""NUTS over the globals: the closed-form potential equals the enumerated model's, and the
draws match a posterior known in closed form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import TraceEnum_ELBO
from numpyro.infer.util import constrain_fn, log_density
from scipy import stats

import latentsel as ls
from latentsel.inference.collapsed import collapsed_model, global_prior, params_from_sites
from latentsel.inference.mcmc import (
    _resolve_potential,
    _unconstrained_shapes,
    diagnostics,
    fit_nuts,
    potential_fn,
    summary,
)
from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.params import Priors
from latentsel.models.registry import MODELS
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from tests.inference.test_exact import random_traces, small_world  # noqa: F401
from tests.inference.test_hidden import reading_world  # noqa: F401
from tests.models.test_numpyro_models import delta_guide


@pytest.mark.parametrize("model", list(MODELS))
def test_closed_potential_equals_enumerated_model(small_world, model):  # noqa: F811
    """The collapsed model's log density is the TraceEnum_ELBO log joint of the enumerated
    program (a Delta guide at the same point), and the two NUTS potentials differ by a
    constant: NumPyro's funsor log_density counts every padded (masked) step as the log of
    the number of enumerated values, which does not depend on θ."""
    rng = np.random.default_rng(11)
    traces = random_traces(rng, small_world, 12, program=model != "grammar")
    data = build_data(traces, small_world, model=model)
    closed = jax.jit(potential_fn(model, data, potential="closed"))
    # one jitted program each: NumPyro run op by op compiles every operation separately
    enumerated = jax.jit(potential_fn(model, data, potential="enumerated"))
    elbo_loss = jax.jit(lambda p: TraceEnum_ELBO(max_plate_nesting=2).loss(
        jax.random.PRNGKey(0), {}, NUMPYRO_MODELS[model], delta_guide(model, p), data))
    shapes = _unconstrained_shapes(model, small_world.n_routes, small_world.n_skills, Priors())
    prior = lambda: global_prior(model, small_world.n_routes, small_world.n_skills)  # noqa: E731
    u_closed, u_enum = [], []
    for _ in range(3):
        z = {name: rng.normal(0, 1.5, s.shape) for name, s in shapes.items()}
        values = {k: np.asarray(v) for k, v in constrain_fn(prior, (), {}, z).items()}
        params = params_from_sites(model, values)
        elbo = -elbo_loss(params)
        collapsed, _ = log_density(lambda: collapsed_model(model, data), (), {}, values)
        np.testing.assert_allclose(float(collapsed), float(elbo), rtol=1e-6)
        u_closed.append(float(closed(z)))
        u_enum.append(float(enumerated(z)))
    np.testing.assert_allclose(np.diff(u_closed), np.diff(u_enum), rtol=1e-6, atol=1e-9 * np.abs(u_closed).max())


@pytest.mark.parametrize("model", ["modular", "grammar"])  # entangled blocks share the modular code
def test_closed_log_evidence_with_hidden_steps(reading_world, model):
    """With hidden-step blocks (hidden entries read by later steps) the differentiable closed
    form, the NUTS potential, equals the exact evidence (itself pinned to brute force in
    test_hidden.py), and its gradient is finite, exact zeros in the rows included."""
    from latentsel.analysis.posterior import posterior_from_data
    from latentsel.inference.collapsed import log_evidence_fn
    from tests.inference.test_boundary import _with_zeros
    from tests.inference.test_exact import random_params
    from tests.inference.test_hidden import hidden_traces

    small_world = reading_world
    rng = np.random.default_rng(5)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = hidden_traces(rng, small_world, patterns=[(3, (0,)), (3, (0, 1)), (4, (0, 2)), (2, ())]) \
        + random_traces(rng, small_world, 4, program=True)
    data = build_data(traces, small_world, model=model)
    assert data.blocks and _resolve_potential("auto", data) == "closed"
    f = jax.jit(log_evidence_fn(model, data))
    with jax.enable_x64(True):
        p = jax.tree.map(jnp.asarray, params)
        np.testing.assert_allclose(float(f(p)), posterior_from_data(data, params, model).log_evidence.sum(), rtol=1e-6)
        grads = jax.grad(f)(p)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    zeros = _with_zeros(params, rng)._replace(off_module=1e-250)
    with jax.enable_x64(True):
        p = jax.tree.map(jnp.asarray, zeros)
        np.testing.assert_allclose(float(f(p)), posterior_from_data(data, zeros, model).log_evidence.sum(), rtol=1e-6)
        grads = jax.grad(f)(p)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.fixture(scope="module")
def pinned_world():
    base = ls.default_world()
    skills = [base.skills[base.skill_index(n)] for n in ("reverse", "rotl", "shift1", "swap_ends")]
    routes = [base.routes[base.route_index(n)] for n in ("prev", "cat_prev_input")]
    return ls.World(skills=skills, routes=routes, alphabet="abcdefgh", max_len=16)


def test_nuts_matches_conjugate_posterior(pinned_world):
    """Depth-1 traces whose executed module is the only one that reproduces the step (distinct
    letters: the four skills and two routings give six different strings, two or more
    positions apart). With noise and off_module pinned near 0 by ~100 exact steps, a wrong
    module's likelihood ratio is below 1e-6, so the posterior of the visited rows is
    Dirichlet(prior + executed counts), and rows no step reaches keep their prior."""
    w = pinned_world
    rng = np.random.default_rng(3)
    skill_counts = np.array([50, 15, 10, 5])  # executed skills under intended `reverse`
    route_counts = np.array([70, 10])  # executed routings under intended `prev`
    skills = np.repeat(np.arange(4), skill_counts)
    routes = np.repeat(np.arange(2), route_counts)
    traces = []
    for i, (r, k) in enumerate(zip(routes, rng.permutation(skills))):
        x = "".join(rng.permutation(list(w.alphabet))[: rng.integers(4, 7)])
        traces.append(Trace(f"t{i}", x, [("prev", "reverse")], [w.apply(int(r), int(k), [x])]))
    data = build_data(traces, w)
    res = fit_nuts("modular", data, num_warmup=300, num_samples=600, num_chains=2, seed=1)
    assert res.samples["skill_exec"].shape == (2, 600, 4, 4)
    assert res.diverging.shape == res.accept_prob.shape == (2, 600) and res.step_size.shape == (2,)
    s = summary(res)
    assert s["chains"] == 2 and s["draws"] == 600 and s["divergences"] <= 5
    assert max(site["r_hat_max"] for site in s["sites"].values()) < 1.05
    _, ess = zip(*diagnostics(res.samples).values())
    checks = [
        (res.samples["skill_exec"][..., 0, :], ess[1][0], np.array([2.0, 0.5, 0.5, 0.5]) + skill_counts),
        (res.samples["route_exec"][..., 0, :], ess[0][0], np.array([2.0, 0.5]) + route_counts),
        (res.samples["skill_exec"][..., 2, :], ess[1][2], np.array([0.5, 0.5, 2.0, 0.5])),  # never reached
    ]
    for draws, row_ess, alpha in checks:
        want_mean = alpha / alpha.sum()
        want_std = np.sqrt(stats.dirichlet.var(alpha))
        # each entry is Beta(α_i, α_0 - α_i); its kurtosis sets the sampling error of a std
        kurtosis = np.array([stats.beta(a, alpha.sum() - a).stats(moments="k") for a in alpha]) + 3
        got = draws.reshape(-1, alpha.size)
        # Monte Carlo error of a mean: std / sqrt(ESS); of a std: std sqrt((kurtosis - 1) / (4 ESS))
        # (σ / sqrt(2 ESS) for a normal). Four of those is a 4-sigma band for every entry.
        np.testing.assert_array_less(np.abs(got.mean(0) - want_mean), 4 * want_std / np.sqrt(row_ess))
        np.testing.assert_array_less(np.abs(got.std(0) - want_std),
                                     4 * want_std * np.sqrt((kurtosis - 1) / (4 * row_ess)))
    assert res.params.noise < 0.02 and res.params.off_module < 0.03
    np.testing.assert_allclose(res.params.skill_exec.sum(-1), 1.0, rtol=1e-12)


def test_nuts_rejects_bad_options(small_world):  # noqa: F811
    data = build_data(random_traces(np.random.default_rng(0), small_world, 3), small_world)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        fit_nuts("modular", data, num_samples=0)
    with pytest.raises(ValueError, match="unknown potential 'exact'"):
        fit_nuts("modular", data, potential="exact")
