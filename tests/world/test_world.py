import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentsel import Route, Skill, World, default_world
from latentsel.world.executor import PAD, apply_all, decode, encode, encode_histories, route_all, skill_all

# DESIGN §2, column "abcde ->"
SKILL_EXAMPLES = {
    "reverse": "edcba", "rotl": "bcdea", "rotr": "eabcd", "swap_pairs": "badce", "swap_halves": "cdeab",
    "sort": "abcde", "sort_desc": "edcba", "swap_ends": "ebcda", "shift1": "bcdef", "unshift1": "zabcd",
    "shift3": "defgh", "atbash": "zyxwv", "shift_even": "bbddf", "shift_first": "bbcde",
    "dup_each": "aabbccddee", "mirror": "abcdeedcba", "double": "abcdeabcde", "evens": "ace", "odds": "bd",
    "drop_first": "bcde", "drop_last": "abcd", "dedup": "abcde", "unique": "abcde", "first_half": "abc",
}
ROUTE_EXAMPLES = {
    "prev": "pqrstu", "input": "abcd", "skip": "xyz", "cat_prev_input": "pqrstuabcd",
    "cat_input_prev": "abcdpqrstu", "zip_prev_input": "paqbrcsdtu", "cat_prev_skip": "pqrstuxyz",
    "head_prev_tail_input": "pqrcd", "longest": "pqrstu", "shortest": "xyz",
}
HISTORY = ["abcd", "xyz", "pqrstu"]


def test_names_in_design_order(world):
    assert world.skill_names == list(SKILL_EXAMPLES)
    assert world.route_names == list(ROUTE_EXAMPLES)
    assert (world.n_skills, world.n_routes, world.n_modules, world.max_len) == (24, 10, 240, 16)
    assert world.alphabet == "abcdefghijklmnopqrstuvwxyz"


@pytest.mark.parametrize("name", list(SKILL_EXAMPLES))
def test_skill_examples(world, name):
    assert world.skill(name, "abcde") == SKILL_EXAMPLES[name]
    codes, lens = encode(["abcde"], world)
    out, out_lens = skill_all(world, codes, lens)
    assert decode(out[:, world.skill_index(name)], out_lens[:, world.skill_index(name)], world) == [SKILL_EXAMPLES[name]]


@pytest.mark.parametrize("name", ["dedup", "unique"])
def test_hello(world, name):
    assert world.skill(name, "hello") == "helo"


def test_dedup_and_unique_differ(world):
    assert world.skill("dedup", "abab") == "abab"
    assert world.skill("unique", "abab") == "ab"


@pytest.mark.parametrize("name", list(ROUTE_EXAMPLES))
def test_route_examples(world, name):
    assert world.route(name, HISTORY) == ROUTE_EXAMPLES[name]
    codes, lens, depth = encode_histories([HISTORY], world)
    out, out_lens = route_all(world, codes, lens, depth)
    r = world.route_index(name)
    assert decode(out[:, r], out_lens[:, r], world) == [ROUTE_EXAMPLES[name]]


def test_program_example(world):
    program = [("prev", "reverse"), ("cat_prev_input", "shift1"), ("longest", "evens")]
    assert world.run(program, "abcde") == ["edcba", "fedcbbcdef", "fdbce"]


def test_first_step_aliasing(world):
    """At t = 1, prev, input, skip, longest and shortest all route h_0."""
    for name in ("prev", "input", "skip", "longest", "shortest"):
        assert world.route(name, ["hello"]) == "hello"


def test_ties_go_to_latest(world):
    assert world.route("longest", ["abc", "xyz"]) == "xyz"
    assert world.route("shortest", ["abc", "xyz", "pq", "rs"]) == "rs"


def test_truncation(world):
    s = "abcdefghijklmnop"
    assert world.skill("double", s) == s
    assert world.skill("dup_each", s) == "aabbccddeeffgghh"
    assert world.route("cat_prev_input", [s, "zz"]) == "zzabcdefghijklmn"
    assert world.apply("cat_input_prev", "mirror", [s]) == s


def test_edge_strings(world):
    for name in world.skill_names:
        assert world.skill(name, "") == ""
    assert world.skill("swap_ends", "a") == "a"
    assert world.skill("rotl", "a") == "a"
    assert world.skill("odds", "a") == ""
    assert world.skill("shift1", "z") == "a"
    assert world.skill("unshift1", "a") == "z"


def test_lookup_errors(world):
    with pytest.raises(KeyError, match="unknown skill 'nope'"):
        world.skill("nope", "abc")
    with pytest.raises(KeyError, match="unknown routing 'nope'"):
        world.route("nope", ["abc"])
    with pytest.raises(KeyError, match="out of range"):
        world.skill(24, "abc")
    with pytest.raises(ValueError, match="at least the input"):
        world.route("prev", [])
    with pytest.raises(ValueError, match="outside the alphabet"):
        encode(["abC"], world)
    with pytest.raises(ValueError, match="longer than max_len"):
        encode(["a" * 17], world)


def _random_histories(rng, world, n, max_depth=4):
    """Histories with lengths drawn to hit 0, 1 and max_len often, and repeated characters."""
    lengths = np.array([0, 1, 2, 3, 8, 15, 16])
    out = []
    for _ in range(n):
        h = []
        for _ in range(rng.integers(1, max_depth + 1)):
            ln = rng.choice(lengths) if rng.random() < 0.5 else rng.integers(0, world.max_len + 1)
            pool = world.alphabet if rng.random() < 0.7 else world.alphabet[: rng.integers(1, 4)]
            h.append("".join(rng.choice(list(pool), size=ln)))
        out.append(h)
    return out


def _check_batch_equals_reference(world, histories):
    codes, lens, depth = encode_histories(histories, world)
    out, out_lens = apply_all(world, codes, lens, depth)
    assert out.shape == (len(histories), world.n_routes, world.n_skills, world.max_len)
    # canonical padding: PAD everywhere past each string
    assert (out[np.arange(world.max_len) >= out_lens[..., None]] == PAD).all()
    got = decode(out, out_lens, world)
    want = [world.apply(r, k, h) for h in histories for r in range(world.n_routes) for k in range(world.n_skills)]
    mismatches = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatches, mismatches[:5]
    return len(want)


def test_batch_equals_reference_1e5(world, rng):
    histories = _random_histories(rng, world, 450)
    assert _check_batch_equals_reference(world, histories) >= 100_000


@settings(deadline=None, max_examples=60)
@given(st.lists(st.text(alphabet="abcxyz", max_size=16), min_size=1, max_size=5))
def test_batch_equals_reference_hypothesis(history):
    _check_batch_equals_reference(default_world(), [history])


def test_custom_world_falls_back_to_reference():
    """A user world: skills without a vectorized version, another alphabet and max_len."""
    world = World(
        skills=[Skill("upper_first", lambda s, al: s[:1] + s[1:]), Skill("triple", lambda s, al: s * 3)],
        routes=[Route("prev", lambda h: h[-1]), Route("first_two", lambda h: "".join(h[:2]))],
        alphabet="01",
        max_len=5,
    )
    assert world.run([("prev", "triple"), ("first_two", "upper_first")], "01") == ["01010", "0101001010"[:5]]
    rng = np.random.default_rng(0)
    histories = [["".join(rng.choice(["0", "1"], size=rng.integers(0, 6))) for _ in range(rng.integers(1, 4))]
                 for _ in range(200)]
    _check_batch_equals_reference(world, histories)


def test_custom_world_keeps_default_batch_modules():
    base = default_world()
    world = World(skills=base.skills[:3], routes=base.routes[:2], alphabet="abcdefg", max_len=6)
    rng = np.random.default_rng(1)
    histories = [["".join(rng.choice(list("abcdefg"), size=rng.integers(0, 7))) for _ in range(rng.integers(1, 4))]
                 for _ in range(300)]
    _check_batch_equals_reference(world, histories)
    assert world.skill("reverse", "gab") == "bag"


def test_world_validation():
    base = default_world()
    with pytest.raises(ValueError, match="duplicate skill names"):
        World(skills=[base.skills[0], base.skills[0]], routes=base.routes)
    with pytest.raises(ValueError, match="distinct characters"):
        World(skills=base.skills, routes=base.routes, alphabet="aab")
    with pytest.raises(ValueError, match="max_len"):
        World(skills=base.skills, routes=base.routes, max_len=0)


def test_apply_distinct_equals_apply_all(world):
    from latentsel.world.executor import apply_all, apply_distinct, encode_histories

    rng = np.random.default_rng(7)
    histories = []
    for i in range(300):
        depth = 1 + i % 4
        h = ["".join(rng.choice(list("abcab"), size=rng.integers(0, 9))) for _ in range(depth)]
        histories.append(h)
    codes, lens, depth = encode_histories(histories, world)
    full, full_lens = apply_all(world, codes, lens, depth)
    out, out_lens, owner, index = apply_distinct(world, codes, lens, depth)
    assert out.shape[0] < full.shape[0] * world.n_routes  # some routings coincide
    np.testing.assert_array_equal(out[index], full)
    np.testing.assert_array_equal(out_lens[index], full_lens)
    np.testing.assert_array_equal(owner[index], np.repeat(np.arange(len(histories)), world.n_routes).reshape(-1, world.n_routes))


def test_default_routings_read_only_what_they_declare(world):
    """Hidden steps are enumerated jointly with the steps that can read them (Route.reads):
    changing an entry a routing does not declare must never change its output."""
    rng = np.random.default_rng(0)
    letters = list(world.alphabet)
    for _ in range(300):
        t = int(rng.integers(1, 7))
        history = ["".join(rng.choice(letters, size=rng.integers(0, 9))) for _ in range(t)]
        for route in world.routes:
            declared = route.entries(t)
            assert declared <= set(range(t))
            base = world.route(route.name, history)
            for e in set(range(t)) - declared:
                changed = list(history)
                changed[e] = "".join(rng.choice(letters, size=rng.integers(0, 17)))
                assert world.route(route.name, changed) == base, (route.name, t, e)
    assert world.readable(1) == {0} and world.readable(4) == {0, 1, 2, 3}


def test_undeclared_reads_mean_every_entry():
    r = Route("last_two", lambda h: "".join(h[-2:]))
    assert r.entries(3) == {0, 1, 2}
    bad = Route("bad", lambda h: h[0], reads=lambda t: (t,))
    with pytest.raises(ValueError, match="declares reads outside a history of 2 entries"):
        bad.entries(2)
