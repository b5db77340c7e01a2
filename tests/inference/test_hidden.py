"""Hidden steps (DESIGN §4) against brute-force enumeration of the definition, all three models.

The definition: a hidden step is on-module and noise-free, h_t = e, the output of the module
the policy executed there, and every later step's history holds that e. The brute force
enumerates every selection of every step, builds each path's history from that definition
alone and scores the observed steps on it; nothing in it knows about blocks or trees.
"""
import math

import numpy as np
import pytest

import latentsel as ls
from latentsel.analysis.posterior import posterior, posterior_from_data
from latentsel.inference.em import e_step, fit_em
from latentsel.models.registry import MODELS
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from tests.inference.test_exact import random_params, random_traces, small_world  # noqa: F401
from tests.models.test_numpyro_models import enum_loss, log_prior

REL = 1e-6

# (depth, hidden steps), 0-based: one and two hidden steps in a row, at the start and at the
# end, hidden steps read by later steps through every routing that can (prev, skip,
# cat_prev_skip, longest, shortest), two runs in one trace, and a trace with every step hidden
PATTERNS = [(3, (0,)), (3, (1,)), (3, (0, 1)), (4, (1,)), (4, (0,)), (3, (2,)), (2, (0, 1)), (4, (1, 3)),
            (1, (0,)), (4, (0, 2)), (4, (1, 2)), (2, (0,))]


@pytest.fixture(scope="module")
def reading_world():
    """Routings that read hidden entries from one, two and any number of steps back."""
    base = ls.default_world()
    skills = [base.skills[base.skill_index(n)] for n in ("shift1", "drop_last")]
    routes = [base.routes[base.route_index(n)] for n in ("prev", "skip", "cat_prev_skip", "longest", "shortest")]
    return ls.World(skills=skills, routes=routes, alphabet="abc", max_len=6)


def hidden_traces(rng, world, program=True, patterns=PATTERNS):
    out = []
    for i, (depth, hidden) in enumerate(patterns):
        tr = random_traces(rng, world, 1, max_depth=depth)[0]
        while tr.depth != depth:
            tr = random_traces(rng, world, 1, max_depth=depth)[0]
        steps = [None if t in hidden else y for t, y in enumerate(tr.steps)]
        out.append(Trace(f"h{i}", tr.input, tr.program if program else None, steps))
    return out


def _logaddexp(a, b):
    hi, lo = (a, b) if a >= b else (b, a)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def brute_force(trace, params, model, world):
    """Evidence, marginals, p_off, the MAP path, the expected counts and the path posterior by
    enumerating every selection of every step."""
    r_n, k_n, a_n, w = world.n_routes, world.n_skills, world.n_chars, world.max_len
    eps, off = params.noise, params.off_module
    depth, steps = trace.depth, trace.steps
    prog = [(world.route_index(r), world.skill_index(k)) for r, k in trace.program] if trace.program else None

    def row_index(t, r, k, path):
        if model == "modular":
            return (prog[t][0], r), (prog[t][1], k)
        if model == "entangled":
            xr, xk = (r_n, k_n) if t == 0 else prog[t - 1]
            return (xr, prog[t][0], r), (xk, prog[t][1], k)
        xr, xk = (r_n, k_n) if t == 0 else path[t - 1]
        return (xr, r), (xk, k)

    rows_r, rows_k = np.asarray(params[0]), np.asarray(params[1])
    cache = {}

    def apply(module, history):
        key = (module, tuple(history))
        if key not in cache:
            cache[key] = world.apply(*module, history)
        return cache[key]

    def log(x):
        return math.log(x) if x > 0 else -math.inf

    log_eps, log_1m_eps, log_off, log_on_flag = log(eps / (a_n - 1)), log(1 - eps), log(off), log(1 - off)
    scored = []  # (path, log p(path, D), rows used, per observed step: (t, log p_on, log p_off, (mismatched, matched)))

    def extend(path, lp, used, stats, history):
        """Every selection of step t = len(path), given the path so far and the history it built."""
        t = len(path)
        if t == depth:
            scored.append((path, lp, used, stats))
            return
        y = steps[t]
        for r in range(r_n):
            for k in range(k_n):
                ir, ik = row_index(t, r, k, path + ((r, k),))
                lp_t = lp + log(rows_r[ir]) + log(rows_k[ik])
                if lp_t == -math.inf:
                    continue
                e = apply((r, k), history)
                stat = stats
                if y is not None:
                    lon, mm = -math.inf, (0, 0)
                    if len(e) == len(y):
                        m = sum(a == b for a, b in zip(e, y))
                        lon, mm = log_on_flag + m * log_1m_eps + (len(y) - m) * log_eps, (len(y) - m, m)
                    loff = log_off - len(y) * math.log(a_n) - math.log(w + 1)
                    stat = stats + ((t, lon, loff, mm),)
                    lp_t += _logaddexp(lon, loff)
                # the definition: a hidden entry is the executed output, for every later step
                extend(path + ((r, k),), lp_t, used + ((ir, ik),), stat, history + (e if y is None else y,))

    extend((), 0.0, (), (), (trace.input,))
    top = max(lp for _, lp, _, _ in scored)
    total = math.fsum(math.exp(lp - top) for _, lp, _, _ in scored)
    log_total = top + math.log(total)
    # accumulated in plain floats (numpy scalar arithmetic per path is the slow part)
    route_m, skill_m, off_m = [[0.0] * r_n for _ in range(depth)], [[0.0] * k_n for _ in range(depth)], [0.0] * depth
    rc_d, kc_d, noise_c, off_c = {}, {}, [0.0, 0.0], [0.0, 0.0]
    path_probs, best_path = {}, max(scored, key=lambda item: item[1])[0]
    for path, lp, used, stats in scored:
        p = math.exp(lp - log_total)
        path_probs[path] = p
        for t, (r, k) in enumerate(path):
            route_m[t][r] += p
            skill_m[t][k] += p
            rc_d[used[t][0]] = rc_d.get(used[t][0], 0.0) + p
            kc_d[used[t][1]] = kc_d.get(used[t][1], 0.0) + p
        for t, lon, loff, mm in stats:
            q_off = math.exp(loff - _logaddexp(lon, loff))
            off_m[t] += p * q_off
            off_c[0] += p * q_off
            off_c[1] += p * (1 - q_off)
            noise_c[0] += p * (1 - q_off) * mm[0]
            noise_c[1] += p * (1 - q_off) * mm[1]
    rc, kc = np.zeros_like(rows_r), np.zeros_like(rows_k)
    for index, v in rc_d.items():
        rc[index] = v
    for index, v in kc_d.items():
        kc[index] = v
    route_m, skill_m, off_m, noise_c, off_c = (np.array(a) for a in (route_m, skill_m, off_m, noise_c, off_c))
    counts = (rc, kc, noise_c, off_c, log_total)
    return log_total, route_m, skill_m, off_m, best_path, counts, path_probs


@pytest.mark.parametrize("which, seed, model", [(w, s, m) for w, s in (("reading", 0), ("reading", 1))
                                                 for m in MODELS]
                         + [("small", 0, "modular")])
def test_hidden_steps_equal_brute_force(reading_world, small_world, model, seed, which):  # noqa: F811
    world = reading_world if which == "reading" else small_world
    rng = np.random.default_rng(100 + seed)
    params = random_params(rng, model, world.n_routes, world.n_skills)
    traces = hidden_traces(rng, world, program=True)
    post = posterior(traces, params, model, world)
    stats = e_step(model, params, build_data(traces, world, model=model))
    want_counts = None
    for i, tr in enumerate(traces):
        logz, rm, sm, om, path, counts, path_probs = brute_force(tr, params, model, world)
        d = tr.depth
        np.testing.assert_allclose(post.log_evidence[i], logz, rtol=REL, atol=1e-12, err_msg=tr.id)
        np.testing.assert_allclose(post.route_probs[i, :d], rm, rtol=REL, atol=1e-12, err_msg=tr.id)
        np.testing.assert_allclose(post.skill_probs[i, :d], sm, rtol=REL, atol=1e-12, err_msg=tr.id)
        np.testing.assert_allclose(post.p_off[i, :d], om, rtol=REL, atol=1e-12, err_msg=tr.id)
        got = tuple(zip(post.map_route[i, :d].tolist(), post.map_skill[i, :d].tolist()))
        # a MAP path: ties (two hidden selections with the same output and prior) are real
        assert path_probs.get(got, 0.0) >= path_probs[path] * (1 - 1e-9), tr.id
        want_counts = counts if want_counts is None else [a + b for a, b in zip(want_counts, counts)]
    for got, ref in zip(stats, want_counts):
        np.testing.assert_allclose(got, ref, rtol=REL, atol=1e-10)


def test_grammar_without_program(reading_world):
    """The grammar model needs no program for hidden steps: their entries are the executed outputs."""
    rng = np.random.default_rng(7)
    params = random_params(rng, "grammar", reading_world.n_routes, reading_world.n_skills)
    traces = hidden_traces(rng, reading_world, program=False, patterns=[(3, (0,)), (3, (1,)), (3, (0, 1)), (3, (2,))])
    post = posterior(traces, params, "grammar", reading_world)
    for i, tr in enumerate(traces):
        np.testing.assert_allclose(post.log_evidence[i], brute_force(tr, params, "grammar", reading_world)[0],
                                   rtol=REL)


def test_block_reads_only_steps_that_can_read(reading_world, small_world):  # noqa: F811
    """A later step joins a block only if some routing of the world can read the hidden entry:
    with prev/input/cat_prev_input, step 3 cannot read step 1; with skip it can."""
    x = "abc"
    for world, joins in ((small_world, False), (reading_world, True)):
        prog = [(world.route_names[0], world.skill_names[0])] * 3
        tr = Trace("t", x, prog, [None, world.run(prog, x)[1], world.run(prog, x)[2]])
        data = build_data([tr], world)
        assert data.block_steps[0].tolist() == [True, True, joins]
        assert data.emit[0].tolist() == [False, False, not joins]


# the entangled program shares the modular one's blocks (and test_pyro pins it with hidden steps)
@pytest.mark.parametrize("model", ["modular", "grammar"])
def test_numpyro_program_with_hidden_steps(reading_world, model):
    rng = np.random.default_rng(11)
    world = reading_world
    params = random_params(rng, model, world.n_routes, world.n_skills)
    # hidden steps read by later steps, two in a row, two runs, trailing, no observed step
    traces = hidden_traces(rng, world, patterns=[(3, (0,)), (3, (1,)), (3, (0, 1)), (3, (2,)), (2, (0, 1)),
                                                 (4, (0, 2))])
    data = build_data(traces, world, model=model)
    closed = posterior_from_data(data, params, model).log_evidence.sum() + log_prior(params, model, world.n_routes, world.n_skills)
    np.testing.assert_allclose(-enum_loss(model, params, data), closed, rtol=REL)


def test_em_with_hidden_steps_never_decreases(small_world):  # noqa: F811
    rng = np.random.default_rng(12)
    traces = hidden_traces(rng, small_world) + random_traces(rng, small_world, 20)
    result = fit_em("modular", build_data(traces, small_world), max_iter=20, tol=0)
    diffs = np.diff(result.objective)
    assert (diffs >= -1e-9 * np.abs(result.objective[1:])).all(), diffs.min()


def test_hidden_step_errors(small_world):  # noqa: F811
    x = "abc"
    three = Trace("run3", x, [("prev", "reverse")] * 4, [None, None, None, "cba"])
    with pytest.raises(ValueError, match=r"trace 'run3': steps 1-3 are hidden; at most 2"):
        build_data([three], small_world)
    # every step hidden: a factor 1, posteriors at the prior
    blank = Trace("blank", x, [("prev", "reverse")] * 3, [None, None, None])
    params = random_params(np.random.default_rng(0), "modular", 3, 4)
    post = posterior([blank], params, "modular", small_world)
    assert post.log_evidence[0] == 0.0
    np.testing.assert_allclose(post.route_probs[0, 0], params.route_exec[0])
    assert (post.p_off[0] == 0).all()


@pytest.mark.parametrize("model", ["modular", "grammar"])
def test_posterior_samples_match_exact_marginals(reading_world, model):
    from latentsel.inference.sampling import sample_selections

    small_world = reading_world
    rng = np.random.default_rng(21)
    params = random_params(rng, model, small_world.n_routes, small_world.n_skills)
    traces = hidden_traces(rng, small_world, patterns=[(3, (0,)), (3, (0, 1)), (2, ())]) \
        + random_traces(rng, small_world, 3, program=True)
    data = build_data(traces, small_world, model=model)
    post = posterior_from_data(data, params, model)
    n_draws = 4000
    draws = sample_selections(model, params, data, n_draws, seed=0)
    mask = data.step_mask
    freq_r = np.stack([(draws.route == r).mean(0) for r in range(small_world.n_routes)], -1)
    freq_k = np.stack([(draws.skill == k).mean(0) for k in range(small_world.n_skills)], -1)
    # binomial frequencies of 4000 draws: 5 standard errors, at worst 0.04
    for freq, exact_p in ((freq_r, post.route_probs), (freq_k, post.skill_probs),
                          (draws.off.mean(0), post.p_off)):
        tol = 5 * np.sqrt(exact_p * (1 - exact_p) / n_draws) + 1e-9
        assert (np.abs(freq - exact_p)[mask] <= tol[mask]).all()
    # whole paths of a trace with a two-step block against the brute-force path posterior
    i = 1
    path_probs = brute_force(traces[i], params, model, small_world)[-1]
    drawn = list(zip(*(draws.route[:, i, t] * 10 + draws.skill[:, i, t] for t in range(3))))
    checked = 0
    for path, p in path_probs.items():
        if p > 0.02:
            key = tuple(r * 10 + k for r, k in path)
            freq = sum(d == key for d in drawn) / n_draws
            assert abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n_draws), (path, freq, p)
            checked += 1
    assert checked >= 2
    assert (draws.route[:, ~mask] == -1).all() and not draws.off[:, ~mask].any()


@pytest.mark.parametrize("model", ["modular", "entangled"])
def test_simulated_hidden_steps_have_positive_likelihood(world, model):
    """Traces simulated with hidden steps follow the model's definition, so none has zero
    likelihood under the parameters that generated them, even with exact-match noise-free
    blocks; with the wrong convention for later histories some would."""
    from latentsel.models.registry import default_params
    from latentsel.traces.regimes import generate
    from latentsel.traces.simulate import simulate

    params = default_params(model, world.n_routes, world.n_skills, fidelity=0.5, noise=1e-6, off_module=1e-9)
    prompts = generate("eval-ood", 150, seed=3)
    traces = simulate(prompts, params, model, world, seed=4, hide=[2])
    assert all(tr.steps[1] is None and tr.steps[2] is not None for tr in traces)
    post = posterior(traces, params, model, world)
    assert np.isfinite(post.log_evidence).all()
    # worst legitimate trace: four low-fidelity selections, about -27; a history read the wrong
    # way costs an off-module step, about -75 (measured: -23 and -86)
    assert post.log_evidence.min() > -40
    with pytest.raises(ValueError, match="numbered from 1"):
        simulate(prompts[:1], params, model, world, hide=[0])
