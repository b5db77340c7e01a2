import numpy as np
import pytest

from latentsel.traces.regimes import HELD_OUT, PROMPT_REGIMES, RL, SEEN, bigram_split, generate, regime_programs


def test_split_sizes_and_disjointness():
    split = bigram_split(24, seed=0)
    assert split.counts() == {"seen": 288, "rl": 144, "held_out": 144}
    assert (split.seen.astype(int) + split.rl + split.held_out == 1).all()
    # every skill has a seen successor and a seen predecessor
    assert split.seen.any(axis=1).all() and split.seen.any(axis=0).all()
    assert (bigram_split(24, seed=0).labels == split.labels).all()
    assert (bigram_split(24, seed=1).labels != split.labels).any()


@pytest.mark.parametrize("regime", list(PROMPT_REGIMES))
def test_regime_constraints(world, regime):
    split = bigram_split(world.n_skills, seed=0)
    traces = generate(regime, 300, seed=7, world=world, split=split)
    assert len(traces) == 300 and len({t.id for t in traces}) == 300
    assert {t.depth for t in traces} == set(PROMPT_REGIMES[regime].depths)
    for t in traces:
        assert 4 <= len(t.input) <= 8
        assert t.steps == world.run(t.program, t.input)
        ks = [world.skill_index(k) for _, k in t.program]
        labels = [split.labels[a, b] for a, b in zip(ks, ks[1:])]
        if regime in ("sft", "eval-seen"):
            assert all(lab == SEEN for lab in labels)
        elif regime == "rl-compound":
            assert RL in labels and HELD_OUT not in labels
        elif regime == "eval-unseen":
            assert HELD_OUT in labels


@pytest.mark.parametrize("n", [8, 10, 100])
def test_sft_covers_every_skill_and_routing(world, n):
    traces = generate("sft", n, seed=11)
    assert {k for t in traces for _, k in t.program} == set(world.skill_names)
    assert {r for t in traces for r, _ in t.program} == set(world.route_names)


def test_depths_override_and_refusal(world):
    deep = generate("sft", 50, seed=3, world=world, depths=(3,))
    assert {t.depth for t in deep} == {3}
    mixed = generate("sft", 50, seed=3, world=world)
    assert {t.depth for t in mixed} == {2, 3}
    # a single-depth draw is the regime's own stream: eval-seen is unchanged by the argument
    assert [t.to_dict() for t in generate("eval-seen", 20, seed=4, depths=(3,))] == \
        [t.to_dict() for t in generate("eval-seen", 20, seed=4)]
    assert {t.depth for t in generate("eval-seen", 20, seed=4, depths=(2,))} == {2}
    with pytest.raises(ValueError, match="depths for sft must be >= 2"):
        generate("sft", 5, depths=(1, 2))
    with pytest.raises(ValueError, match="rl-atomic programs are depth 1"):
        generate("rl-atomic", 5, depths=(2,))


# (input, program) of generate(regime, 40, seed=3) at the regime's deepest depth, as drawn before
# regimes had several depths: a single-depth draw must keep that stream (identify relies on it)
PINNED = {"sft": "98fda179d9d392e1", "eval-seen": "579e9251e146ff9d", "rl-compound": "3cf22fbaf1045571",
          "eval-ood": "93f75e9419402af5", "rl-atomic": "82bd4b22ae3733c7", "eval-unseen": "bb312bea3d8d51ab"}


@pytest.mark.parametrize("regime", list(PINNED))
def test_single_depth_streams_are_pinned(regime):
    import hashlib
    import json

    traces = generate(regime, 40, seed=3, depths=(PROMPT_REGIMES[regime].depth,))
    digest = hashlib.sha256(json.dumps([(t.input, [list(m) for m in t.program]) for t in traces]).encode())
    assert digest.hexdigest()[:16] == PINNED[regime]


def test_deterministic_and_independent_streams():
    a = [t.to_dict() for t in generate("eval-seen", 50, seed=5)]
    assert a == [t.to_dict() for t in generate("eval-seen", 50, seed=5)]
    assert a != [t.to_dict() for t in generate("eval-seen", 50, seed=6)]
    sft = [(t.input, t.program) for t in generate("sft", 50, seed=5)]
    assert sft != [(t["input"], t["program"]) for t in a]


def test_program_sets():
    split = bigram_split(24)
    assert len(regime_programs("rl-atomic", split)) == 24
    assert len(regime_programs("eval-ood", split)) == 24**4
    seen = regime_programs("sft", split)
    # an sft program of skills (a, b, c) needs a->b and b->c seen
    s = split.seen.astype(int)
    assert len(seen) == int(np.einsum("ab,bc->", s, s))


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown regime 'sf'"):
        generate("sf", 3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate("sft", -1)
    assert generate("sft", 0) == []
