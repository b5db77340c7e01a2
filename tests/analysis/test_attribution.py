"""Attribution: aliasing counted as aliasing, every failure kept, every step summing to one."""
import numpy as np

from latentsel.analysis.attribution import CATEGORIES, attribute
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from latentsel.traces.failures import completion_status, fitted_prefix
from latentsel.world import default_world

WORLD = default_world()
K = WORLD.n_skills
COL = {c: i for i, c in enumerate(CATEGORIES)}


def _module(route, skill):
    return WORLD.route_index(route), WORLD.skill_index(skill)


def _corpus(traces):
    statuses = [completion_status(tr) for tr in traces]
    prefixes = [(i, fitted_prefix(tr, st)) for i, (tr, st) in enumerate(zip(traces, statuses))]
    fitted = [i for i, p in prefixes if p is not None]
    data = build_data([p for _, p in prefixes if p is not None], WORLD)
    return statuses, fitted, data


def _point_mass(data, executed):
    """on: all on-module mass on ``executed[(row, t)] = (route, skill)``; off 0."""
    n, t_max = data.step_mask.shape
    on = np.zeros((n, t_max, WORLD.n_routes, K))
    for (j, t), (route, skill) in executed.items():
        on[j, t][_module(route, skill)] = 1.0
    return on, np.zeros((n, t_max))


def test_aliased_routings_at_step_one_are_the_intended_class():
    x = "abcd"
    prog = [("prev", "reverse"), ("prev", "double")]
    steps = WORLD.run(prog, x)
    tr = Trace("a", x, prog, steps, None, {}, None, {"malformed": None})
    statuses, fitted, data = _corpus([tr])
    # at t = 1 `input` reads what `prev` reads: not a routing error
    on, off = _point_mass(data, {(0, 0): ("input", "reverse"), (0, 1): ("prev", "double")})
    att = attribute([tr], WORLD, statuses, fitted, data, on, off)
    assert att.mass[0, 0, COL["intended"]] == 1.0 and att.mass[0, 1, COL["intended"]] == 1.0
    # at t = 2 `input` reads the input, not step 1: a routing error
    on, off = _point_mass(data, {(0, 0): ("prev", "reverse"), (0, 1): ("input", "double")})
    att = attribute([tr], WORLD, statuses, fitted, data, on, off)
    assert att.mass[0, 1, COL["routing"]] == 1.0
    assert att.confusions.sum() == 1.0 and att.top_confusions(WORLD, 1)[0][:2] == ("prev/double", "input/double")


def test_skill_errors_inherited_errors_and_failures():
    x = "abcdef"
    prog = [("prev", "reverse"), ("prev", "double"), ("prev", "sort")]
    wrong = WORLD.apply("prev", "sort", [x])  # step 1 ran `sort` instead of `reverse`
    steps = [wrong, WORLD.apply("prev", "double", [x, wrong]), None]  # then stopped
    tr = Trace("b", x, prog, steps, None, {}, None, {"malformed": "2 of 3 steps"})
    bad = Trace("c", x, prog, [None, "ab", None], None, {}, None, {"malformed": "step 1 holds a non-character "
                                                                          "token; 2 of 3 steps"})
    statuses, fitted, data = _corpus([tr, bad])
    assert fitted == [0]
    on, off = _point_mass(data, {(0, 0): ("prev", "sort"), (0, 1): ("prev", "double")})
    off[0, 1], on[0, 1] = 0.25, on[0, 1] * 0.75
    att = attribute([tr, bad], WORLD, statuses, fitted, data, on, off)
    assert att.mass[0, 0, COL["skill"]] == 1.0
    # step 2 executed the intended module on a wrong input: inherited, not intended
    assert att.mass[0, 1, COL["inherited"]] == 0.75 and att.mass[0, 1, COL["off_module"]] == 0.25
    assert att.mass[0, 2, COL["stopped"]] == 1.0
    assert att.mass[1, 0, COL["unreadable"]] == 1.0 and att.mass[1, 1, COL["after_failure"]] == 1.0
    assert att.mass[1, 2, COL["stopped"]] == 1.0
    np.testing.assert_allclose(att.mass.sum(-1), 1.0)
    rates = att.rates()
    assert abs(sum(rates[c] for c in CATEGORIES) - 1.0) < 1e-12 and rates["ran_on"] == 0.0


def test_both_errors_and_a_spread_posterior_sum_to_one():
    rng = np.random.default_rng(0)
    x = "hello"
    prog = [("prev", "reverse"), ("input", "double")]
    tr = Trace("d", x, prog, WORLD.run([("prev", "mirror"), ("prev", "double")], x), None, {}, None, {})
    statuses, fitted, data = _corpus([tr])
    on = rng.dirichlet(np.ones(WORLD.n_modules + 1), size=2)
    att = attribute([tr], WORLD, statuses, fitted, data, on[None, :, :-1].reshape(1, 2, WORLD.n_routes, K),
                    on[None, :, -1])
    np.testing.assert_allclose(att.mass.sum(-1), 1.0)
    assert att.mass[0, :, COL["routing_skill"]].min() > 0  # random mass lands on two-error modules too


def test_a_near_miss_is_the_intended_module_with_character_errors():
    x = "abcdef"
    prog = [("prev", "reverse")]
    y = WORLD.apply("prev", "reverse", [x])
    y = ("a" if y[0] != "a" else "b") + y[1:]  # one character off
    tr = Trace("e", x, prog, [y], None, {}, None, {})
    statuses, fitted, data = _corpus([tr])
    on, off = _point_mass(data, {(0, 0): ("prev", "reverse")})
    att = attribute([tr], WORLD, statuses, fitted, data, on, off)
    assert att.mass[0, 0, COL["near_miss"]] == 1.0 and att.mass[0, 0, COL["intended"]] == 0.0


def test_a_class_reachable_both_ways_is_either_not_routing():
    from latentsel.analysis.attribution import _step_classes

    match = np.array([[[3, 1], [1, 2]]], dtype=np.int8)  # one step, R = K = 2; intended (0, 0)
    same, route_only, skill_only = _step_classes(match, np.array([0]), np.array([0]))
    assert same[0].tolist() == [[True, False], [False, False]]
    # (0, 1) shares its emission with (1, 0): a skill error or a routing error, the step cannot say
    assert route_only[0, 0, 1] and skill_only[0, 0, 1]
    # (1, 1) matches 2, like no module with the intended routing or skill: both went wrong
    assert not route_only[0, 1, 1] and not skill_only[0, 1, 1]


def test_a_corpus_with_nothing_read_is_all_failures():
    x = "abcd"
    tr = Trace("f", x, [("prev", "reverse"), ("prev", "sort")], [None, None], None, {}, None,
               {"malformed": "step 1 holds a non-character token; 1 of 2 steps"})
    att = attribute([tr], WORLD, [completion_status(tr)], [], None, None, None)
    assert att.mass[0, 0, COL["unreadable"]] == 1.0 and att.mass[0, 1, COL["stopped"]] == 1.0
    assert att.rates()["intended"] == 0.0
