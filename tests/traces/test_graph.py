"""The module graph of one trace: an edge from every history entry a step's routing reads."""
import pytest

from latentsel.traces.graph import module_digraph

PROGRAM = [("prev", "reverse"), ("cat_prev_input", "shift1"), ("longest", "evens")]


def test_module_digraph_of_a_world_run(world):
    steps = world.run(PROGRAM, "abcde")
    assert steps == ["edcba", "fedcbbcdef", "fdbce"]
    intended = PROGRAM[:2] + [("prev", "evens")]
    graph = module_digraph(world, "abcde", steps, [r for r, _ in PROGRAM], [k for _, k in PROGRAM],
                           intended=intended)
    assert sorted(graph.edges) == [(0, 1), (0, 2), (1, 2), (2, 3)]
    assert {graph.edges[e]["skill"] for e in [(0, 2), (1, 2)]} == {"shift1"}
    assert [graph.nodes[t]["text"] for t in graph] == ["abcde"] + steps
    assert [graph.nodes[t]["deviates"] for t in (1, 2, 3)] == [False, False, True]


def test_module_digraph_rejects_bad_input(world):
    with pytest.raises(ValueError, match="^routes "):
        module_digraph(world, "abc", ["cba"], ["prev", "input"], ["reverse"])
    with pytest.raises(ValueError, match="^intended "):
        module_digraph(world, "abc", ["cba"], ["prev"], ["reverse"], intended=[])
