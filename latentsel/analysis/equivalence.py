"""Equivalence classes of modules on a data set (DESIGN §6).

Every observed step's emission under module (r, k) is a function of one number, ``match[n, t, r, k]``
(how many positions of y_t agree with the module's output, or -1 when the lengths differ), so two
modules are indistinguishable on a corpus exactly when their ``match`` columns agree on every
observed step. The *distinguishability graph* has the R·K modules as nodes and an edge between
two modules that no observed step separates; its connected components are the classes up to
which the data can identify a selection. Steps inside hidden-step blocks separate *paths* of
modules, not modules, so they are left out of the graph; :func:`block_equivalent` compares two
paths through a block by the emissions of its observed steps.
"""
from __future__ import annotations

from typing import NamedTuple

import networkx as nx
import numpy as np

from latentsel.models.data import HLSMData, tree_tables
from latentsel.world import World

__all__ = ["ModuleClasses", "module_classes", "distinguishability_graph", "step_equivalent", "block_equivalent",
           "block_steps"]


class ModuleClasses(NamedTuple):
    """The classes of the R·K modules (module m = r·K + k).

    Attributes:
        label: int[M], the class of every module (classes numbered by their first module).
        sizes: int[n_classes], the number of modules in each class.
        n_steps: the number of observed steps the classes were computed from.
    """

    label: np.ndarray
    sizes: np.ndarray
    n_steps: int

    @property
    def n_classes(self) -> int:
        return int(self.sizes.size)

    def members(self, c: int) -> np.ndarray:
        """The modules of class ``c``: int[size]."""
        return np.flatnonzero(self.label == c)


def _signatures(data: HLSMData) -> np.ndarray:
    """int8[M, S]: every module's ``match`` on the S free observed steps."""
    steps = data.free & data.emit
    m = data.match[steps]  # [S, R, K]
    return np.ascontiguousarray(m.reshape(m.shape[0], -1).T)


def module_classes(data: HLSMData) -> ModuleClasses:
    """The equivalence classes of modules on ``data``'s free observed steps."""
    sig = _signatures(data)
    _, first, inverse = np.unique(sig, axis=0, return_index=True, return_inverse=True)
    # number the classes in module order, so class c's smallest member comes before class c + 1's
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    label = rank[inverse.reshape(-1)]
    return ModuleClasses(label, np.bincount(label, minlength=order.size), int(sig.shape[1]))


def distinguishability_graph(data: HLSMData, world: World, classes: ModuleClasses | None = None) -> nx.Graph:
    """The distinguishability graph: nodes ``"route/skill"`` (attributes ``route``, ``skill``,
    ``module``, ``cls``), an edge between every two modules no observed step separates."""
    classes = module_classes(data) if classes is None else classes
    if classes.label.size != world.n_modules:
        raise ValueError(f"data has {classes.label.size} modules, the world {world.n_modules}")
    g = nx.Graph(n_steps=classes.n_steps)
    names = [world.module_name(m) for m in range(world.n_modules)]
    k_n = world.n_skills
    for m, name in enumerate(names):
        g.add_node(name, route=world.route_names[m // k_n], skill=world.skill_names[m % k_n], module=m,
                   cls=int(classes.label[m]))
    for c in np.flatnonzero(classes.sizes > 1):
        members = classes.members(int(c))
        g.add_edges_from((names[a], names[b]) for i, a in enumerate(members) for b in members[i + 1:])
    return g


def step_equivalent(data: HLSMData, route: np.ndarray, skill: np.ndarray, other_route: np.ndarray,
                    other_skill: np.ndarray) -> np.ndarray:
    """bool[N, T]: at each free observed step, do modules (route, skill) and (other_route,
    other_skill) (int[N, T] each) give the step the same emission? False elsewhere."""
    n, t = np.indices(route.shape)
    a = data.match[n, t, route, skill]
    b = data.match[n, t, other_route, other_skill]
    return (a == b) & data.free & data.emit & data.step_mask


def block_steps(data: HLSMData) -> np.ndarray:
    """bool[N, T]: the steps inside hidden-step blocks (the enumerated hidden steps and the
    observed steps that read them)."""
    return data.block_steps


def block_equivalent(data: HLSMData, route: np.ndarray, skill: np.ndarray, other_route: np.ndarray,
                     other_skill: np.ndarray) -> np.ndarray:
    """bool[N, T]: at every step of a hidden-step block, do the two paths of modules through the
    block (``route``/``skill`` and ``other_*``, int[N, T] each) give every observed step of the
    block the same emission? False outside blocks."""
    out = np.zeros(data.step_mask.shape, bool)
    t_max = data.step_mask.shape[1]
    for g in data.blocks:
        tables = tree_tables(g, t_max)
        offset = tables.child.shape[0] - g.parents[-1].size  # the leaves' first global id
        steps = g.steps(t_max)
        read = tables.read_steps

        def read_matches(r, k):
            rt, kt = r[g.trace], k[g.trace]  # [B, T]
            leaf = offset + g.node_index(np.take_along_axis(rt, g.hidden, 1), np.take_along_axis(kt, g.hidden, 1))
            st = np.maximum(read, 0)
            row = tables.row_at[leaf[:, None], st]  # [B, P]
            b = np.arange(g.n_blocks)[:, None]
            m = tables.read_match[np.maximum(row, 0), rt[b, st], kt[b, st]]
            return np.where(read >= 0, m, 0)

        same = (read_matches(route, skill) == read_matches(other_route, other_skill)).all(axis=1)
        bi, ti = np.nonzero(steps)
        out[g.trace[bi], ti] = same[bi]
    return out
