"""EM: exact expected counts, a never-decreasing objective, and recovery on simulated data."""
import itertools

import numpy as np
import pytest

from latentsel.inference.em import e_step, fit_em
from latentsel.models.registry import MODELS, default_params
from latentsel.traces.emission import build_data
from latentsel.traces.simulate import simulate
from tests.inference.test_exact import random_params, random_traces, small_world  # noqa: F401


def brute_counts(trace, params, model, world):
    """Expected transition / execution counts, noise and off counts by enumerating every path."""
    r_n, k_n, a_n, w = world.n_routes, world.n_skills, world.n_chars, world.max_len
    eps, off = params.noise, params.off_module
    hist = [trace.input] + list(trace.steps)
    prog = [(world.route_index(r), world.skill_index(k)) for r, k in trace.program] if trace.program else None
    rc, kc = np.zeros_like(np.asarray(params[0])), np.zeros_like(np.asarray(params[1]))
    noise_c, off_c, total = np.zeros(2), np.zeros(2), 0.0
    modules = list(itertools.product(range(r_n), range(k_n)))
    for path in itertools.product(modules, repeat=trace.depth):
        for us in itertools.product([0, 1], repeat=trace.depth):
            p, idx_r, idx_k, mm = 1.0, [], [], np.zeros(2)
            for t, ((r, k), u) in enumerate(zip(path, us)):
                if model == "modular":
                    ir, ik = (prog[t][0], r), (prog[t][1], k)
                elif model == "entangled":
                    xr, xk = (r_n, k_n) if t == 0 else prog[t - 1]
                    ir, ik = (xr, prog[t][0], r), (xk, prog[t][1], k)
                else:
                    xr, xk = (r_n, k_n) if t == 0 else path[t - 1]
                    ir, ik = (xr, r), (xk, k)
                p *= np.asarray(params[0])[ir] * np.asarray(params[1])[ik]
                idx_r.append(ir)
                idx_k.append(ik)
                y = trace.steps[t]
                if u:
                    p *= off * a_n ** (-len(y)) / (w + 1)
                else:
                    e = world.apply(r, k, hist[: t + 1])
                    if len(e) != len(y):
                        p = 0.0
                        break
                    m = sum(x == z for x, z in zip(e, y))
                    p *= (1 - off) * (1 - eps) ** m * (eps / (a_n - 1)) ** (len(y) - m)
                    mm += [len(y) - m, m]
            if p == 0.0:
                continue
            total += p
            for ir, ik in zip(idx_r, idx_k):
                rc[ir] += p
                kc[ik] += p
            noise_c += p * mm
            off_c += p * np.array([sum(us), trace.depth - sum(us)])
    return rc / total, kc / total, noise_c / total, off_c / total, np.log(total)


@pytest.mark.parametrize("model", list(MODELS))
def test_expected_counts_equal_brute_force(small_world, model):  # noqa: F811
    rng = np.random.default_rng(3)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = random_traces(rng, small_world, 6, max_depth=2, program=model != "grammar")
    stats = e_step(model, params, build_data(traces, small_world, model=model))
    want = [sum(x) for x in zip(*(brute_counts(t, params, model, small_world) for t in traces))]
    for got, ref in zip(stats, want):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("model", list(MODELS))
def test_em_objective_never_decreases(small_world, model):  # noqa: F811
    rng = np.random.default_rng(4)
    traces = random_traces(rng, small_world, 40, program=model != "grammar")
    result = fit_em(model, build_data(traces, small_world, model=model), max_iter=30, tol=0)
    diffs = np.diff(result.objective)
    assert (diffs >= -1e-9 * np.abs(result.objective[1:])).all(), diffs.min()


def _nontrivial_params(world, seed):
    """Execution rows with real errors: 0.75 on the intended entry, a few confusions."""
    rng = np.random.default_rng(seed)
    p = default_params("modular", world.n_routes, world.n_skills, noise=0.03, off_module=0.03)
    rows = []
    for m in (np.asarray(p.route_exec), np.asarray(p.skill_exec)):
        m = np.full_like(m, 0.0)
        for i in range(m.shape[0]):
            others = rng.choice(np.setdiff1d(np.arange(m.shape[0]), [i]), size=2, replace=False)
            m[i, i], m[i, others[0]], m[i, others[1]] = 0.75, 0.15, 0.10
        rows.append(m)
    return p._replace(route_exec=rows[0], skill_exec=rows[1])


def test_em_recovers_reached_rows(world):
    """2,000 simulated depth-3 traces whose programs use 5 routings and 6 skills.

    Reached rows (visited ~1,200 and ~1,000 times) are recovered within 0.05 max-abs: with
    fidelity 0.75 a row's sampling sd is about sqrt(0.75 * 0.25 / 1000) = 0.014, so 0.05 is
    ~3.5 sd. Rows the data never reach stay at their prior mean. MAP accuracy is >= 0.98 on
    the on-module steps whose true module is the only one consistent with the step.
    """
    from latentsel.analysis.posterior import posterior_from_data
    from latentsel.inference.em import prior_mean_params
    from latentsel.traces import Trace
    from latentsel.traces.consistency import consistent_modules

    truth = _nontrivial_params(world, 0)
    rng = np.random.default_rng(1)
    routes, skills = rng.choice(10, 5, replace=False), rng.choice(24, 6, replace=False)
    prompts = []
    for i in range(2000):
        x = "".join(rng.choice(list(world.alphabet), size=rng.integers(4, 9)))
        prog = [(world.route_names[rng.choice(routes)], world.skill_names[rng.choice(skills)]) for _ in range(3)]
        prompts.append(Trace(f"p{i}", x, prog, [None] * 3))
    traces = simulate(prompts, truth, "modular", world, seed=2)
    data = build_data(traces, world, model="modular")
    fit = fit_em("modular", data, tol=1e-10, max_iter=500)
    assert fit.converged
    err_r = np.abs(fit.params.route_exec - truth.route_exec).max(-1)
    err_k = np.abs(fit.params.skill_exec - truth.skill_exec).max(-1)
    assert err_r[routes].max() < 0.05 and err_k[skills].max() < 0.05, (err_r[routes], err_k[skills])
    prior = prior_mean_params("modular", 10, 24)
    unreached_r, unreached_k = np.setdiff1d(np.arange(10), routes), np.setdiff1d(np.arange(24), skills)
    np.testing.assert_allclose(fit.params.route_exec[unreached_r], prior.route_exec[unreached_r], atol=1e-12)
    np.testing.assert_allclose(fit.params.skill_exec[unreached_k], prior.skill_exec[unreached_k], atol=1e-12)

    post = posterior_from_data(data, fit.params, "modular")
    consistent = consistent_modules(traces, world)
    hits = []
    for i, tr in enumerate(traces):
        for t in range(3):
            r, k = world.route_index(tr.truth.routes[t]), world.skill_index(tr.truth.skills[t])
            if tr.truth.off[t] or consistent[i][t].sum() != 1 or not consistent[i][t][r, k]:
                continue
            hits.append(post.map_route[i, t] == r and post.map_skill[i, t] == k)
    assert len(hits) > 500
    assert np.mean(hits) >= 0.98, np.mean(hits)


@pytest.mark.parametrize("model", ["modular", "grammar"])
def test_accelerated_em_reaches_plain_em_optimum(small_world, model):  # noqa: F811
    rng = np.random.default_rng(9)
    traces = random_traces(rng, small_world, 60, program=model != "grammar")
    data = build_data(traces, small_world, model=model)
    plain = fit_em(model, data, max_iter=2000, tol=1e-12, accelerate=False)
    fast = fit_em(model, data, max_iter=2000, tol=1e-12)
    assert plain.converged and fast.converged
    assert (np.diff(fast.objective) >= -1e-9 * np.abs(fast.objective[1:])).all()
    # both stop within 1e-12 relative of a local maximum of J; the same one here
    np.testing.assert_allclose(fast.objective[-1], plain.objective[-1], rtol=1e-8)
    np.testing.assert_allclose(fast.params[0], plain.params[0], atol=1e-3)
    assert fast.e_steps < plain.e_steps
