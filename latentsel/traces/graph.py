"""The module graph of one trace: which history entries each step reads (DESIGN §2, §6).

What a routing reads is the routing's own declaration (:meth:`~latentsel.world.Route.sources`);
this module only lays a trace out on it.
"""
from __future__ import annotations

from typing import Sequence

import networkx as nx

from latentsel.world import World

__all__ = ["module_digraph"]


def module_digraph(world: World, x: str, steps: Sequence[str | None], routes: Sequence[str], skills: Sequence[str],
                   *, intended: Sequence[tuple[str, str]] | None = None) -> nx.DiGraph:
    """The module graph of one trace in ``world``.

    Node ``t`` (0..T) is ``h_t``: attributes ``text`` (the string, ``None`` if hidden) and
    ``hidden``; steps (t >= 1) also carry ``route``, ``skill``, ``intended`` (a pair or
    ``None``) and ``deviates`` (executed module differs from the intended one). An edge
    ``s -> t`` for each entry ``s`` that step t's routing reads, with attributes ``route``,
    ``skill`` and ``known`` (False for a routing that declares nothing it reads: edges from
    every entry).
    """
    if not isinstance(x, str):
        raise ValueError(f"x must be the input string, got {x!r}")
    steps = list(steps)
    if len(routes) != len(steps) or len(skills) != len(steps):
        raise ValueError(f"routes and skills must have one entry per step ({len(steps)}), "
                         f"got {len(routes)} and {len(skills)}")
    if intended is not None and len(intended) != len(steps):
        raise ValueError(f"intended must have one (route, skill) per step ({len(steps)}), got {len(intended)}")
    graph = nx.DiGraph()
    graph.add_node(0, text=x, hidden=False)
    history: list[str | None] = [x]
    for t, (text, route, skill) in enumerate(zip(steps, routes, skills), start=1):
        goal = tuple(intended[t - 1]) if intended is not None else None
        graph.add_node(t, text=text, hidden=text is None, route=route, skill=skill, intended=goal,
                       deviates=goal is not None and goal != (route, skill))
        routing = world.routes[world.route_index(route)]
        for s in routing.sources(history):
            graph.add_edge(s, t, route=route, skill=skill, known=routing.declared)
        history.append(text)
    return graph
