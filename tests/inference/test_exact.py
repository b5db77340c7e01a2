"""Exact inference against brute-force enumeration of the model's definition (DESIGN §4)."""
import itertools
import math

import numpy as np
import pytest

import latentsel as ls
from latentsel.analysis.posterior import posterior
from latentsel.models.params import EntangledParams, GrammarParams, ModularParams
from latentsel.models.registry import MODELS, validate_params
from latentsel.traces import Trace

REL = 1e-6


@pytest.fixture(scope="module")
def small_world():
    base = ls.default_world()
    skills = [base.skills[base.skill_index(n)] for n in ("reverse", "rotl", "shift1", "dedup")]
    routes = [base.routes[base.route_index(n)] for n in ("prev", "input", "cat_prev_input")]
    return ls.World(skills=skills, routes=routes, alphabet="abc", max_len=6)


def _dirichlet_rows(rng, shape):
    return rng.dirichlet(np.full(shape[-1], 0.7), size=shape[:-1])


def random_params(rng, model, r_n, k_n):
    noise, off = rng.uniform(0.05, 0.4), rng.uniform(0.02, 0.3)
    if model == "modular":
        return ModularParams(_dirichlet_rows(rng, (r_n, r_n)), _dirichlet_rows(rng, (k_n, k_n)), noise, off)
    if model == "entangled":
        return EntangledParams(_dirichlet_rows(rng, (r_n + 1, r_n, r_n)), _dirichlet_rows(rng, (k_n + 1, k_n, k_n)),
                               noise, off)
    return GrammarParams(_dirichlet_rows(rng, (r_n + 1, r_n)), _dirichlet_rows(rng, (k_n + 1, k_n)), noise, off)


def random_traces(rng, world, n, max_depth=3, program=True):
    """Steps that match a module exactly, match it with substitutions, or are random."""
    traces = []
    for i in range(n):
        depth = int(rng.integers(1, max_depth + 1))
        x = "".join(rng.choice(list(world.alphabet), size=rng.integers(1, 5)))
        prog = [(world.route_names[rng.integers(world.n_routes)], world.skill_names[rng.integers(world.n_skills)])
                for _ in range(depth)]
        history, steps = [x], []
        for _ in range(depth):
            e = world.apply(int(rng.integers(world.n_routes)), int(rng.integers(world.n_skills)), history)
            u = rng.random()
            if u < 0.2:
                y = "".join(rng.choice(list(world.alphabet), size=rng.integers(0, world.max_len + 1)))
            elif u < 0.5 and e:
                chars = list(e)
                chars[rng.integers(len(e))] = world.alphabet[rng.integers(world.n_chars)]
                y = "".join(chars)
            else:
                y = e
            steps.append(y)
            history.append(y)
        traces.append(Trace(f"t{i}", x, prog if program else None, steps))
    return traces


def brute_force(trace, params, model, world, off_max=False):
    """Enumerate every (r_t, k_t, u_t) path from the definition; return evidence, marginals and
    the MAP path of (r_t, k_t): with the off flags summed out, or maximized too (``off_max``)."""
    r_n, k_n, a_n, w = world.n_routes, world.n_skills, world.n_chars, world.max_len
    eps, off = params.noise, params.off_module
    depth = trace.depth
    history = [trace.input] + list(trace.steps)
    prog = [(world.route_index(r), world.skill_index(k)) for r, k in trace.program] if trace.program else None

    def p_step(t, r, k, u):
        y = trace.steps[t]
        if u:
            return off * a_n ** (-len(y)) / (w + 1)
        e = world.apply(r, k, history[: t + 1])
        if len(e) != len(y):
            return 0.0
        m = sum(a == b for a, b in zip(e, y))
        return (1 - off) * (1 - eps) ** m * (eps / (a_n - 1)) ** (len(y) - m)

    def p_select(t, r, k, prev):
        if model == "modular":
            cr, ck = prog[t]
            return params.route_exec[cr, r] * params.skill_exec[ck, k]
        if model == "entangled":
            cr, ck = prog[t]
            pr, pk = (r_n, k_n) if t == 0 else prog[t - 1]
            return params.route_exec_ctx[pr, cr, r] * params.skill_exec_ctx[pk, ck, k]
        pr, pk = (r_n, k_n) if t == 0 else prev
        return params.route_trans[pr, r] * params.skill_trans[pk, k]

    cache = {}
    total = 0.0
    route_m, skill_m, off_m = np.zeros((depth, r_n)), np.zeros((depth, k_n)), np.zeros(depth)
    best, best_path = -1.0, None
    modules = list(itertools.product(range(r_n), range(k_n)))
    for path in itertools.product(modules, repeat=depth):
        prior = 1.0
        for t, (r, k) in enumerate(path):
            prior *= p_select(t, r, k, path[t - 1] if t else None)
        # sum over the off flags, keeping their marginal
        lik_on = [cache.setdefault((t, r, k, 0), p_step(t, r, k, 0)) for t, (r, k) in enumerate(path)]
        lik_off = [cache.setdefault((t, 0, 0, 1), p_step(t, 0, 0, 1)) for t in range(depth)]
        lik = math.prod(a + b for a, b in zip(lik_on, lik_off))
        p = prior * lik
        total += p
        for t, (r, k) in enumerate(path):
            route_m[t, r] += p
            skill_m[t, k] += p
            off_m[t] += p * lik_off[t] / (lik_on[t] + lik_off[t])
        score = prior * math.prod(max(a, b) for a, b in zip(lik_on, lik_off)) if off_max else p
        if score > best:
            best, best_path = score, path
    return math.log(total), route_m / total, skill_m / total, off_m / total, best_path


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_equals_brute_force(small_world, model, seed):
    rng = np.random.default_rng(seed)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = random_traces(rng, small_world, 12, program=model != "grammar")
    post = posterior(traces, params, model, small_world)
    assert post.log_evidence.dtype == np.float64
    for i, tr in enumerate(traces):
        logz, rm, sm, om, path = brute_force(tr, params, model, small_world)
        d = tr.depth
        np.testing.assert_allclose(post.log_evidence[i], logz, rtol=REL)
        np.testing.assert_allclose(post.route_probs[i, :d], rm, rtol=REL, atol=1e-12)
        np.testing.assert_allclose(post.skill_probs[i, :d], sm, rtol=REL, atol=1e-12)
        np.testing.assert_allclose(post.p_off[i, :d], om, rtol=REL, atol=1e-12)
        if model == "grammar":
            got = list(zip(post.map_route[i, :d].tolist(), post.map_skill[i, :d].tolist()))
            assert got == list(path)


def test_marginals_sum_to_one_and_padding_is_zero(small_world):
    rng = np.random.default_rng(5)
    traces = random_traces(rng, small_world, 30, max_depth=4)
    post = posterior(traces, random_params(rng, "modular", 3, 4), "modular", small_world)
    depth = np.array([t.depth for t in traces])
    mask = np.arange(post.route_probs.shape[1])[None] < depth[:, None]
    np.testing.assert_allclose(post.route_probs.sum(-1), mask.astype(float), atol=1e-12)
    np.testing.assert_allclose(post.skill_probs.sum(-1), mask.astype(float), atol=1e-12)
    assert ((post.p_off >= 0) & (post.p_off <= 1)).all()
    assert (post.map_route[~mask] == -1).all()


def test_log_evidence_default_world(world):
    from latentsel.models.registry import default_params
    from latentsel.traces.regimes import generate

    traces = generate("eval-ood", 50, seed=0)
    le = ls.log_evidence(traces, default_params("modular", 10, 24), model="modular", world=world)
    assert le.shape == (50,) and le.dtype == np.float64 and np.isfinite(le).all()


@pytest.mark.parametrize("change, message", [
    (dict(route_exec=np.full((3, 3), 0.5)), r"route_exec row \(0,\) sums to 1.5"),
    (dict(route_exec=np.full((3, 2), 0.5)), r"route_exec must have shape \[3, 3\]"),
    (dict(skill_exec=np.full((4, 4), np.nan)), "skill_exec has NaN"),
    (dict(noise=1.5), r"noise must lie in \(0, 1\)"),
    (dict(off_module=float("nan")), r"off_module must lie in \(0, 1\)"),
])
def test_bad_params(small_world, change, message):
    params = ModularParams(np.full((3, 3), 1 / 3), np.full((4, 4), 0.25), 0.1, 0.1)._replace(**change)
    with pytest.raises(ValueError, match=message):
        validate_params(params, "modular", 3, 4)


def test_bad_model_and_params_type(small_world):
    traces = random_traces(np.random.default_rng(0), small_world, 2)
    params = ModularParams(np.full((3, 3), 1 / 3), np.full((4, 4), 0.25), 0.1, 0.1)
    with pytest.raises(KeyError, match="unknown model 'hmm'"):
        posterior(traces, params, "hmm", small_world)
    with pytest.raises(TypeError, match="model='entangled' takes EntangledParams, got ModularParams"):
        posterior(traces, params, "entangled", small_world)
    with pytest.raises(ValueError, match="corpus is empty"):
        posterior([], params, "modular", small_world)


@pytest.mark.parametrize("model", list(MODELS))
def test_without_joint_gives_the_same_posterior(small_world, model):
    from latentsel.analysis.posterior import posterior_from_data
    from latentsel.traces.emission import build_data

    rng = np.random.default_rng(11)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = random_traces(rng, small_world, 20, program=model != "grammar")
    data = build_data(traces, small_world, model=model)
    full, lean = posterior_from_data(data, params, model), posterior_from_data(data, params, model, joint=False)
    assert lean.joint_probs is None and full.joint_probs is not None
    for name in ("log_evidence", "route_probs", "skill_probs", "p_off"):
        np.testing.assert_allclose(getattr(lean, name), getattr(full, name), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(lean.map_route, full.map_route)
    np.testing.assert_array_equal(lean.map_skill, full.map_skill)
    np.testing.assert_allclose(full.joint_probs.sum(-1), full.route_probs, atol=1e-15)


@pytest.mark.parametrize("model", ["modular", "entangled", "grammar"])
def test_evidence_alone_is_the_posteriors_evidence(world, model):
    """The evidence-only path (no marginals, MAP or off-module posterior) gives the full path's
    numbers, over several padded chunks."""
    from latentsel.analysis.posterior import log_evidence_from_data, posterior_from_data
    from latentsel.traces.emission import build_data

    rng = np.random.default_rng(7)
    data = build_data(random_traces(rng, world, 150, max_depth=4, program=model != "grammar"), world, model=model)
    params = random_params(rng, model, world.n_routes, world.n_skills)
    want = posterior_from_data(data, params, model, joint=False, chunk=64).log_evidence
    got = log_evidence_from_data(data, params, model, chunk=64)
    np.testing.assert_allclose(got, want, rtol=1e-12)
