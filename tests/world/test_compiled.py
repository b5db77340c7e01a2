"""The compiled match counts equal the modules' reference functions, and build_data is the same
whichever executor computes them."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentsel import Route, Skill, World, default_world
from latentsel.traces.emission import build_data
from latentsel.world import compiled
from latentsel.world.default import ROUTES, SKILLS
from latentsel.world.executor import encode_histories
from tests.world.test_world import _random_histories


def reference_match(world, history, y):
    """int8[R, K]: agreements of every module's reference output on ``history`` with ``y``."""
    out = np.empty((world.n_routes, world.n_skills), dtype=np.int8)
    for r in range(world.n_routes):
        for k in range(world.n_skills):
            e = world.apply(r, k, history)
            out[r, k] = -1 if len(e) != len(y) else sum(a == b for a, b in zip(e, y))
    return out


def compiled_match(world, histories, ys):
    match = compiled.compiled_matcher(world)
    assert match is not None
    codes, lens, depth = encode_histories([list(h) + [y] for h, y in zip(histories, ys)], world)
    n = len(histories)
    out = np.full((n, 1, world.n_routes, world.n_skills), 99, dtype=np.int8)
    rows = np.arange(n)
    match(out, (rows, np.zeros_like(rows)), codes, lens, rows, depth - 1, codes, lens, (rows, depth - 1))
    return out[:, 0]


def _targets(rng, world, histories):
    """For each history a y that agrees with some module often: a module's output with some
    characters changed, or a random string."""
    ys = []
    for h in histories:
        if rng.random() < 0.8:
            y = list(world.apply(int(rng.integers(world.n_routes)), int(rng.integers(world.n_skills)), h))
            for j in range(len(y)):
                if rng.random() < 0.2:
                    y[j] = world.alphabet[rng.integers(world.n_chars)]
            ys.append("".join(y))
        else:
            ys.append("".join(rng.choice(list(world.alphabet), size=rng.integers(0, world.max_len + 1))))
    return ys


def test_op_codes_follow_the_default_world():
    assert [getattr(compiled, "S_" + s.name.upper()) for s in SKILLS] == list(range(len(SKILLS)))
    assert [getattr(compiled, "R_" + r.name.upper()) for r in ROUTES] == list(range(len(ROUTES)))


def test_compiled_equals_reference(world, rng):
    histories = _random_histories(rng, world, 600, max_depth=5)
    ys = _targets(rng, world, histories)
    got = compiled_match(world, histories, ys)
    want = np.stack([reference_match(world, h, y) for h, y in zip(histories, ys)])
    assert (want >= 0).sum() > 2000  # many modules agree in length, so the counts are exercised
    np.testing.assert_array_equal(got, want)


@settings(deadline=None, max_examples=80)
@given(st.lists(st.text(alphabet="abcxyz", max_size=16), min_size=1, max_size=5), st.data())
def test_compiled_equals_reference_hypothesis(history, data):
    world = default_world()
    r, k = data.draw(st.integers(0, world.n_routes - 1)), data.draw(st.integers(0, world.n_skills - 1))
    y = data.draw(st.one_of(st.just(world.apply(r, k, history)), st.text(alphabet="abcxyz", max_size=16)))
    np.testing.assert_array_equal(compiled_match(world, [history], [y])[0], reference_match(world, history, y))


def test_subset_world_with_another_alphabet_is_compiled():
    """Default modules in another order, a 7-letter alphabet and max_len 6 (truncation)."""
    base = default_world()
    world = World(skills=base.skills[::-3], routes=base.routes[::-2], alphabet="abcdefg", max_len=6)
    rng = np.random.default_rng(3)
    histories = [["".join(rng.choice(list("abcdefg"), size=rng.integers(0, 7))) for _ in range(rng.integers(1, 5))]
                 for _ in range(400)]
    ys = _targets(rng, world, histories)
    np.testing.assert_array_equal(compiled_match(world, histories, ys),
                                  np.stack([reference_match(world, h, y) for h, y in zip(histories, ys)]))


def test_worlds_with_modules_of_their_own_are_not_compiled(monkeypatch):
    base = default_world()
    own = World(skills=[*base.skills[:2], Skill("triple", lambda s, al: s * 3)], routes=base.routes[:2])
    assert compiled.compiled_matcher(own) is None
    # a module named like a default one but with another function is not taken for it
    twin = World(skills=[Skill("reverse", lambda s, al: s)], routes=[Route("prev", lambda h: h[-1])])
    assert compiled.compiled_matcher(twin) is None

    class Unhashable:  # a skill function that defines equality without a hash
        def __eq__(self, other):
            return self is other

        __hash__ = None

        def __call__(self, s, al):
            return s

    odd = World(skills=[*base.skills[:2], Skill("same", Unhashable())], routes=base.routes[:2])
    assert compiled.compiled_matcher(odd) is None
    monkeypatch.setenv("LATENTSEL_COMPILED", "sometimes")
    with pytest.raises(ValueError, match="LATENTSEL_COMPILED='sometimes': expected auto, always or never"):
        build_data(simulate_few(base), base)


def simulate_few(world, n=5):
    from latentsel.models.registry import default_params
    from latentsel.traces.regimes import generate
    from latentsel.traces.simulate import simulate
    params = default_params("modular", world.n_routes, world.n_skills)
    return simulate(generate("eval-ood", n, seed=1, world=world), params, "modular", world, seed=2)


def test_small_corpora_keep_the_vectorized_executor(world, monkeypatch):
    """``auto`` compiles from COMPILED_FROM steps up: a few traces never load numba's kernel."""
    import latentsel.world.compiled as module
    from latentsel.traces import emission
    calls = []
    monkeypatch.setattr(module, "compiled_matcher", lambda w: calls.append(w) or None)
    build_data(simulate_few(world), world)
    assert not calls
    monkeypatch.setattr(emission, "COMPILED_FROM", 4)
    build_data(simulate_few(world), world)
    assert calls


def test_out_must_fit_the_world(world):
    match = compiled.compiled_matcher(world)
    with pytest.raises(ValueError, match="int8 out of shape"):
        match(np.zeros((1, 1, 2, 2), np.int8), ([0], [0]), *encode_histories([["ab"]], world)[:2], [0], [1],
              *encode_histories([["ab"]], world)[:2], ([0], [0]))


@pytest.mark.parametrize("model", ["modular", "grammar"])
def test_build_data_is_the_same_with_either_executor(world, rng, monkeypatch, model):
    """The whole statistics, hidden-step blocks included, from the compiled and the vectorized executor."""
    from latentsel.models.registry import default_params
    from latentsel.traces.regimes import generate
    from latentsel.traces.simulate import simulate
    params = default_params("modular", world.n_routes, world.n_skills, fidelity=0.7, noise=0.05, off_module=0.05)
    traces = simulate(generate("eval-ood", 300, seed=1, world=world), params, "modular", world, seed=2)
    for tr in traces[::3]:  # hide a step here and there, so that blocks are built
        tr.steps[int(rng.integers(len(tr.steps) - 1))] = None
    monkeypatch.setenv("LATENTSEL_COMPILED", "always")
    fast = build_data(traces, world, model=model)
    monkeypatch.setenv("LATENTSEL_COMPILED", "never")
    slow = build_data(traces, world, model=model)
    assert fast.blocks and len(fast.blocks) == len(slow.blocks)
    for a, b in zip(fast.arrays(), slow.arrays()):
        np.testing.assert_array_equal(a, b)
    for g, h in zip(fast.blocks, slow.blocks):
        for a, b in zip(g, h):
            for x, y in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,)))):
                np.testing.assert_array_equal(x, y)
