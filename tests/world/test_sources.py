"""Which history entries each routing reads (:meth:`Route.sources`), as DESIGN §2 defines
them: the design's example, the first step, every default routing against its own ``fn``
(changing an entry it does not read leaves its result unchanged), hidden entries and routings
that declare nothing."""
import numpy as np
import pytest

from latentsel.world import Route, World

DESIGN_HISTORY = ["abcd", "xyz", "pqrstu"]
DESIGN_SOURCES = {
    "prev": [2], "input": [0], "skip": [1], "cat_prev_input": [2, 0], "cat_input_prev": [0, 2],
    "zip_prev_input": [2, 0], "cat_prev_skip": [2, 1], "head_prev_tail_input": [2, 0],
    "longest": [2], "shortest": [1],
}


def read_by(world, route, history):
    return world.routes[world.route_index(route)].sources(history)


@pytest.mark.parametrize("route", sorted(DESIGN_SOURCES))
def test_routing_sources_on_design_example(world, route):
    sources = read_by(world, route, DESIGN_HISTORY)
    assert sources == DESIGN_SOURCES[route]
    assert route in world.route_names


@pytest.mark.parametrize("route", sorted(DESIGN_SOURCES))
def test_routing_sources_at_first_step_read_the_input(world, route):
    assert read_by(world, route, ["abcde"]) == [0]


@pytest.mark.parametrize("route", sorted(DESIGN_SOURCES))
def test_routing_sources_agree_with_the_world(world, rng, route):
    """Changing an entry a routing does not read leaves its result unchanged; longest and
    shortest return exactly the entry named (so the tie rule is checked too)."""
    letters = np.array(list(world.alphabet))
    for _ in range(40):
        history = ["".join(rng.choice(letters, rng.integers(1, 5))) for _ in range(rng.integers(1, 6))]
        sources = read_by(world, route, history)
        if route in ("longest", "shortest"):
            assert world.route(route, history) == history[sources[0]]
            continue
        changed = [h if i in sources else h + "q" for i, h in enumerate(history)]
        assert world.route(route, changed) == world.route(route, history)


def test_routing_sources_of_hidden_and_user_entries(world):
    world = World(world.skills, world.routes + (Route("my_routing", lambda h: h[-1]),))
    history = ["abcd", None, "xy"]
    assert read_by(world, "longest", history) == [0]
    assert read_by(world, "shortest", history) == [2]
    assert read_by(world, "my_routing", history) == [0, 1, 2]
    with pytest.raises(ValueError, match="^history "):
        read_by(world, "prev", [])
