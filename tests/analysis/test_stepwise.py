"""Stepwise inference for fully observed traces: exact against brute force over every path of
(r_t, k_t, u_t); EM against the package's EM; statistical checks of per-skill noise and λ."""
import numpy as np
import pytest
from scipy.special import logsumexp

from latentsel.analysis.posterior import log_evidence
from latentsel.analysis.stepwise import (
    StepParams,
    compare_heldout,
    fit_steps,
    heldout_loglik,
    step_joint,
)
from latentsel.inference.em import fit_em
from latentsel.models.params import EntangledParams, ModularParams
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from tests.inference.test_exact import random_traces, small_world  # noqa: F401

REL = 1e-6


def _rows(rng, shape, conc=0.7):
    return rng.dirichlet(np.full(shape[-1], conc), size=shape[:-1])


def random_step_params(rng, r_n, k_n, lam=0.3, per_skill=True):
    noise = rng.uniform(0.05, 0.4, size=k_n) if per_skill else np.full(k_n, rng.uniform(0.05, 0.4))
    return StepParams(_rows(rng, (r_n, r_n)), _rows(rng, (k_n, k_n)), _rows(rng, (r_n + 1, r_n, r_n)),
                      _rows(rng, (k_n + 1, k_n, k_n)), lam, noise, rng.uniform(0.02, 0.3))


def fidelity_rows(n, fidelity, context=False):
    """``fidelity`` on the intended entry, the rest spread evenly."""
    m = np.full((n, n), (1 - fidelity) / (n - 1)) + np.eye(n) * (fidelity - (1 - fidelity) / (n - 1))
    return np.broadcast_to(m, (n + 1, n, n)).copy() if context else m


def simulate_steps(world, p: StepParams, n, seed, depth=3):
    """Fully observed traces from the λ-mixture with a noise per executed skill, written out
    from the definition: draw (r, k) from the mixed rows, u ~ Bernoulli(off); an off step is a
    uniform length and uniform characters; an on step is e with each character replaced, with
    probability noise[k], by a uniform other character. Teacher-forced history."""
    rng = np.random.default_rng(seed)
    r_n, k_n, alphabet = world.n_routes, world.n_skills, list(world.alphabet)
    traces = []
    for i in range(n):
        x = "".join(rng.choice(alphabet, size=rng.integers(2, 6)))
        prog = [(int(rng.integers(r_n)), int(rng.integers(k_n))) for _ in range(depth)]
        history = [x]
        for t, (cr, ck) in enumerate(prog):
            pr, pk = (r_n, k_n) if t == 0 else prog[t - 1]
            rho = (1 - p.lam) * p.route_exec[cr] + p.lam * p.route_ctx[pr, cr]
            kappa = (1 - p.lam) * p.skill_exec[ck] + p.lam * p.skill_ctx[pk, ck]
            r, k = int(rng.choice(r_n, p=rho)), int(rng.choice(k_n, p=kappa))
            if rng.random() < p.off:
                y = "".join(rng.choice(alphabet, size=rng.integers(world.max_len + 1)))
            else:
                y = "".join(c if rng.random() >= p.noise[k] else rng.choice([a for a in alphabet if a != c])
                            for c in world.apply(r, k, history))
            history.append(y)
        names = [(world.route_names[r], world.skill_names[k]) for r, k in prog]
        traces.append(Trace(f"s{i}", x, names, history[1:]))
    return traces


def brute_force(trace, p: StepParams, world):
    """Every path of (r_t, k_t, u_t), t = 1..depth, in log space: returns
    (on [depth, R, K], off [depth], log p(trace))."""
    r_n, k_n, a_n, w = world.n_routes, world.n_skills, world.n_chars, world.max_len
    prog = [(world.route_index(r), world.skill_index(k)) for r, k in trace.program]
    history = [trace.input] + list(trace.steps)
    tables = []
    with np.errstate(divide="ignore"):
        for t, y in enumerate(trace.steps):
            (cr, ck), (pr, pk) = prog[t], ((r_n, k_n) if t == 0 else prog[t - 1])
            rho = (1 - p.lam) * p.route_exec[cr] + p.lam * p.route_ctx[pr, cr]
            kappa = (1 - p.lam) * p.skill_exec[ck] + p.lam * p.skill_ctx[pk, ck]
            f = np.full((r_n, k_n, 2), -np.inf)
            for r in range(r_n):
                for k in range(k_n):
                    prior = np.log(rho[r]) + np.log(kappa[k])
                    f[r, k, 1] = prior + np.log(p.off) - len(y) * np.log(a_n) - np.log(w + 1)
                    e = world.apply(r, k, history[: t + 1])
                    if len(e) == len(y):
                        m = sum(a == b for a, b in zip(e, y))
                        f[r, k, 0] = (prior + np.log1p(-p.off) + m * np.log1p(-p.noise[k])
                                      + (len(y) - m) * np.log(p.noise[k] / (a_n - 1)))
            tables.append(f.reshape(-1))
    d = len(tables)
    joint = sum(tab.reshape([-1 if s == t else 1 for s in range(d)]) for t, tab in enumerate(tables))
    log_z = logsumexp(joint)
    marg = np.stack([np.exp(logsumexp(joint, axis=tuple(s for s in range(d) if s != t)) - log_z)
                     for t in range(d)]).reshape(d, r_n, k_n, 2)
    return marg[..., 0], marg[..., 1].sum(axis=(1, 2)), log_z


def _check_against_brute_force(traces, p, world):
    data = build_data(traces, world)
    got = step_joint(data, p)
    assert all(np.isfinite(a).all() for a in got)
    for i, tr in enumerate(traces):
        on, off, log_z = brute_force(tr, p, world)
        d = tr.depth
        np.testing.assert_allclose(got.log_lik[i], log_z, rtol=REL)
        np.testing.assert_allclose(got.on[i, :d], on, rtol=REL, atol=1e-12)
        np.testing.assert_allclose(got.off[i, :d], off, rtol=REL, atol=1e-12)
        assert (got.on[i, d:] == 0).all() and (got.off[i, d:] == 0).all()
    np.testing.assert_allclose(got.on.sum(axis=(2, 3)) + got.off, data.step_mask, atol=1e-12)


@pytest.mark.parametrize("case", ["modular", "entangled", "mixture", "per_skill"])
def test_step_joint_equals_brute_force(small_world, case):  # noqa: F811
    rng = np.random.default_rng(["modular", "entangled", "mixture", "per_skill"].index(case))
    r_n, k_n = small_world.n_routes, small_world.n_skills
    p = random_step_params(rng, r_n, k_n, per_skill=case == "per_skill")
    if case == "modular":
        p = StepParams.from_modular(ModularParams(p.route_exec, p.skill_exec, p.noise[0], p.off))
    elif case == "entangled":
        p = StepParams.from_entangled(EntangledParams(p.route_ctx, p.skill_ctx, p.noise[0], p.off))
    _check_against_brute_force(random_traces(rng, small_world, 10), p, small_world)


def test_step_joint_at_the_boundary(small_world):  # noqa: F811
    """Rows with exact zeros (one-hot rows too), off_module 1e-300 and a noise of 1e-200: no
    NaN, and still the brute force (in log space)."""
    rng = np.random.default_rng(7)
    r_n, k_n = small_world.n_routes, small_world.n_skills
    p = random_step_params(rng, r_n, k_n)
    rows = []
    for a in p[:4]:
        a = np.where(rng.random(a.shape) < 0.4, 0.0, a)
        a[..., 0] += (a.sum(-1) == 0)  # a row with no mass left becomes one-hot
        rows.append(a / a.sum(-1, keepdims=True))
    rows[0][0] = np.eye(r_n)[1]
    p = StepParams(*rows, 0.3, np.array([1e-200, 0.2, 1e-12, 0.5]), 1e-300)
    _check_against_brute_force(random_traces(rng, small_world, 10), p, small_world)


def test_hidden_steps_are_refused(small_world):  # noqa: F811
    traces = random_traces(np.random.default_rng(0), small_world, 5)
    traces[0].steps[-1] = None
    data = build_data(traces, small_world)
    p = StepParams.from_modular(ModularParams(np.eye(3), np.eye(4), 0.1, 0.1))
    with pytest.raises(ValueError, match="1 step"):
        step_joint(data, p)
    with pytest.raises(ValueError, match="fully observed"):
        fit_steps(data)


@pytest.mark.parametrize("model", ["modular", "entangled"])
def test_fit_reaches_the_package_em_optimum(small_world, model):  # noqa: F811
    traces = random_traces(np.random.default_rng(11), small_world, 60)
    data = build_data(traces, small_world, model=model)
    ours = fit_steps(data, rows=model, max_iter=5000, tol=1e-15)
    ref = fit_em(model, data, max_iter=5000, tol=1e-15)
    assert ours.converged and ref.converged
    np.testing.assert_allclose(ours.log_joint, ref.objective[-1], rtol=1e-10)
    p = ours.params
    rows = (p.route_exec, p.skill_exec) if model == "modular" else (p.route_ctx, p.skill_ctx)
    for got, want in zip(rows, ref.params[:2]):
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(p.noise, ref.params.noise, atol=1e-6)
    np.testing.assert_allclose(p.off, ref.params.off_module, atol=1e-6)
    pkg = (ModularParams(p.route_exec, p.skill_exec, p.noise[0], p.off) if model == "modular"
           else EntangledParams(p.route_ctx, p.skill_ctx, p.noise[0], p.off))
    np.testing.assert_allclose(heldout_loglik(data, p), log_evidence(traces, pkg, model, small_world), rtol=1e-10)


@pytest.mark.parametrize("rows,noise", [("modular", "per_skill"), ("entangled", "shared"),
                                        ("mixture", "per_skill"), ("mixture", "shared")])
def test_em_objective_never_decreases(small_world, rows, noise):  # noqa: F811
    traces = random_traces(np.random.default_rng(4), small_world, 40)
    fit = fit_steps(build_data(traces, small_world), rows=rows, noise=noise, max_iter=40, tol=0)
    # tol=0 runs until an iterate gains nothing (at most a rounding error): at the optimum
    assert fit.history.shape == (fit.iterations + 1,) and np.isfinite(fit.history).all()
    assert (np.diff(fit.history) >= -1e-9 * np.abs(fit.history[1:])).all(), np.diff(fit.history).min()
    if rows == "mixture":
        assert 0 <= fit.params.lam <= 1


def _modular_truth(world, noise, off=0.05):
    r = fidelity_rows(world.n_routes, 0.9)
    k = fidelity_rows(world.n_skills, 0.9)
    return StepParams(r, k, np.broadcast_to(r, (world.n_routes + 1, *r.shape)).copy(),
                      np.broadcast_to(k, (world.n_skills + 1, *k.shape)).copy(), 0.0, np.asarray(noise), off)


def _heldout_gain(world, truth, seed):
    """Per-skill minus shared noise: fitted on 300 traces, compared on 300 others."""
    train = build_data(simulate_steps(world, truth, 300, seed), world)
    test = build_data(simulate_steps(world, truth, 300, seed + 1), world)
    fits = {noise: fit_steps(train, noise=noise) for noise in ("per_skill", "shared")}
    assert all(f.converged for f in fits.values())
    return fits, compare_heldout(heldout_loglik(test, fits["per_skill"].params),
                                 heldout_loglik(test, fits["shared"].params))


def test_per_skill_noise_is_recovered_and_predicts_better(small_world):  # noqa: F811
    """Truth ε = (0.02, 0.3, 0.05, 0.2) by executed skill. About 900 steps, ~220 per skill of
    ~3.5 characters: sd of each ε̂ ≈ sqrt(0.3 · 0.7 / 770) ≈ 0.017, so 0.06 is ~3.5 sd (plus the
    little confusion between modules with equal outputs). The held-out gain must be > 2 se."""
    noise = np.array([0.02, 0.3, 0.05, 0.2])
    fits, cmp = _heldout_gain(small_world, _modular_truth(small_world, noise), 21)
    np.testing.assert_allclose(fits["per_skill"].params.noise, noise, atol=0.06)
    assert cmp["n"] == 300 and cmp["diff_mean"] > 2 * cmp["diff_se"], cmp


def test_per_skill_noise_does_not_beat_shared_when_shared(small_world):  # noqa: F811
    """With one true ε the per-skill fit only adds estimation noise: its held-out gain is not
    significant (< 2 se; fails about 2.5% of seeds by construction, seeded here)."""
    fits, cmp = _heldout_gain(small_world, _modular_truth(small_world, np.full(4, 0.15)), 31)
    assert np.ptp(fits["per_skill"].params.noise) < 0.1
    assert cmp["diff_mean"] < 2 * cmp["diff_se"], cmp


def _entangled_truth(world):
    """After intended skill 0 the next step executes the skill after its intended one (a swap
    the modular rows cannot express)."""
    truth = _modular_truth(world, np.full(4, 0.1))._replace(lam=1.0)
    truth.skill_ctx[0] = np.eye(world.n_skills)[(np.arange(world.n_skills) + 1) % world.n_skills]
    return truth


@pytest.mark.parametrize("entangled", [False, True])
def test_heldout_mixture_beats_modular_only_when_entangled(small_world, entangled):  # noqa: F811
    """The valid test of entanglement: held-out log likelihood of the mixture fit (λ free)
    against the modular fit, paired by trace. Modular truth: no significant gain (< 2 se; in 6
    seeds z ranged -1.6 to 1.3). Entangled truth: a clear gain (z 8.6 to 13.7 in 6 seeds)."""
    truth = _entangled_truth(small_world) if entangled else _modular_truth(small_world, np.full(4, 0.1))
    train = build_data(simulate_steps(small_world, truth, 200, 41), small_world)
    test = build_data(simulate_steps(small_world, truth, 200, 141), small_world)
    mixture, modular = fit_steps(train, rows="mixture"), fit_steps(train)
    cmp = compare_heldout(heldout_loglik(test, mixture.params), heldout_loglik(test, modular.params))
    if entangled:
        assert cmp["diff_mean"] > 4 * cmp["diff_se"] and mixture.params.lam > 0.9, (cmp, mixture.params.lam)
    else:
        assert cmp["diff_mean"] < 2 * cmp["diff_se"], cmp
