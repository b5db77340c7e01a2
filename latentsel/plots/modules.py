"""Figures of one fit or one trace: execution and selection heatmaps, module graphs and
distinguishability classes (DESIGN §6)."""
from __future__ import annotations

import math
import textwrap
from typing import Sequence

import matplotlib
import networkx as nx
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from latentsel.plots._common import _LABEL, _TICK, _WIDTH, _figure, _labels, _legend, _matrix
from latentsel.traces.graph import module_digraph
from latentsel.world import World

__all__ = ["execution_heatmap", "selection_heatmap", "fit_execution_heatmap", "fit_selection_heatmap",
           "draw_module_digraph", "module_graph", "draw_distinguishability_graph"]

_PROB_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="white")
_SD_CMAP = matplotlib.colormaps["magma"].with_extremes(bad="white")
_TRUTH_STYLE = dict(marker="o", markersize=4, markerfacecolor="white", markeredgecolor="black",
                    linestyle="none")
_UNREACHED_STYLE = dict(facecolor=(0.6, 0.6, 0.6, 0.6), edgecolor="0.35", hatch="///", linewidth=0)
_INTENDED_STYLE = dict(marker="s", markersize=9, markerfacecolor="none", markeredgecolor="tab:red",
                       markeredgewidth=1.6, linestyle="none")


# -- heatmaps --------------------------------------------------------------------------
def execution_heatmap(mean, sd, row_labels, col_labels, *, title: str, row_title: str = "intended",
                      col_title: str = "executed", truth=None, reached=None) -> Figure:
    """Posterior mean and sd of an execution matrix, side by side, each with a colour bar.

    Args:
        mean: [rows, cols] row-stochastic execution probabilities (posterior mean).
        sd: [rows, cols] their posterior standard deviation.
        row_labels, col_labels: rows and cols names (intended and executed modules).
        truth: optional [rows, cols] true matrix; its argmax per row is marked with a dot.
        reached: optional bool[rows]; rows the data never reach (False) are hatched grey,
            since they stay at the prior.
    Returns a figure with four axes: mean, its colour bar, sd, its colour bar.
    """
    mean, sd = _matrix(mean, "mean", 2), _matrix(sd, "sd", 2)
    if sd.shape != mean.shape:
        raise ValueError(f"sd must have the shape of mean {mean.shape}, got {sd.shape}")
    rows, cols = mean.shape
    row_labels = _labels(row_labels, rows, "row_labels")
    col_labels = _labels(col_labels, cols, "col_labels")
    if truth is not None:
        truth = _matrix(truth, "truth", 2)
        if truth.shape != mean.shape:
            raise ValueError(f"truth must have the shape of mean {mean.shape}, got {truth.shape}")
    if reached is not None:
        reached = np.asarray(reached)
        if reached.shape != (rows,) or reached.dtype != bool:
            raise ValueError(f"reached must be bool[{rows}], got {reached.dtype}{list(reached.shape)}")

    fig = _figure(max(4.0, 0.2 * rows + 2.4), title)
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((mean, _PROB_CMAP, 1.0, "posterior mean", ""), (sd, _SD_CMAP, None, "posterior sd", "sd of "))
    for ax, (values, cmap, vmax, what, prefix) in zip(axes, panels):
        image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.9).set_label(f"{prefix}P({col_title} | {row_title})",
                                                         fontsize=_LABEL)
        ax.set_title(what)
        ax.set_xticks(range(cols), col_labels, rotation=90, fontsize=_TICK)
        ax.set_yticks(range(rows), row_labels, fontsize=_TICK)
        ax.set_xlabel(col_title)
        if truth is not None:
            ax.plot(truth.argmax(axis=1), np.arange(rows), **_TRUTH_STYLE)
        if reached is not None:
            for i in np.flatnonzero(~reached):
                ax.add_patch(Rectangle((-0.5, i - 0.5), cols, 1, **_UNREACHED_STYLE))
    axes[0].set_ylabel(row_title)
    if reached is not None:
        for label, ok in zip(axes[0].get_yticklabels(), reached):
            label.set_color("black" if ok else "0.5")
    handles = [Line2D([], [], label="true argmax", **_TRUTH_STYLE)] if truth is not None else []
    if reached is not None and not reached.all():
        handles.append(Patch(label="never reached (stays at the prior)", **_UNREACHED_STYLE))
    _legend(fig, handles)
    return fig


def _module_columns(pairs, name: str, n_steps: int, route_names, skill_names):
    """(route indices, skill indices) of a list of ``(route, skill)`` name pairs."""
    pairs = [tuple(p) for p in pairs]
    if len(pairs) != n_steps or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{name} must hold one (route, skill) pair per step ({n_steps}), got {pairs}")
    unknown = [p for p in pairs if p[0] not in route_names or p[1] not in skill_names]
    if unknown:
        raise ValueError(f"{name} names unknown modules: {unknown}")
    return [route_names.index(r) for r, _ in pairs], [skill_names.index(k) for _, k in pairs]


def fit_execution_heatmap(fit, kind: str = "skill", *, truth=None, title: str | None = None) -> Figure:
    """:func:`execution_heatmap` of a fit's routing (``kind="route"``) or skill rows: the
    posterior mean and sd (NUTS draws, or the conjugate posterior at θ̂), labelled with the
    fit's world. ``truth``: an optional [rows, cols] matrix. For the models whose
    rows are intended modules (modular); the others have one matrix per context."""
    if kind not in ("route", "skill"):
        raise ValueError(f"kind must be 'route' or 'skill', got {kind!r}")
    table = fit.execution_table()
    rows = table[table.kind == kind]
    if "intended" not in rows or "context" in rows:
        raise ValueError(f"fit: a {fit.model} fit has no single intended -> executed matrix; plot one of its contexts "
                         "from fit.execution_table() with execution_heatmap")
    names = list(fit.world.skill_names if kind == "skill" else fit.world.route_names)
    mean, sd = (rows.pivot(index="intended", columns="executed", values=v).loc[names, names].to_numpy()
                for v in ("prob", "sd"))
    if fit.draws is None and fit.conjugate is not None:
        # the panel is the posterior mean: q's, not the EM mode the table's prob holds
        mean = np.asarray(fit.conjugate.mean()[0 if kind == "route" else 1])
    return execution_heatmap(mean, sd, names, names, truth=truth,
                             title=title or f"{fit.model} fit by {fit.method}: executed {kind}s per intended {kind}")


def fit_selection_heatmap(fit, trace_id: str, *, title: str | None = None) -> Figure:
    """:func:`selection_heatmap` of one trace of a fit, by its id."""
    post = fit.posterior
    try:
        i = post.trace_ids.index(trace_id)
    except ValueError:
        raise ValueError(f"trace_id {trace_id!r} is not among the fit's {len(post.trace_ids)} traces") from None
    d = int(post.depth[i])
    return selection_heatmap(post.route_probs[i, :d], post.skill_probs[i, :d], post.p_off[i, :d],
                             list(post.route_names), list(post.skill_names),
                             title=title or f"trace {trace_id}: posterior of the executed selections")


def selection_heatmap(route_probs, skill_probs, p_off, route_names, skill_names, *, step_labels=None,
                      intended=None, truth=None, title: str = "") -> Figure:
    """One trace's per-step posterior: routing, skill and off-module probabilities.

    Args:
        route_probs: [T, R] posterior of the executed routing per step.
        skill_probs: [T, K] posterior of the executed skill per step.
        p_off: [T] posterior probability that the step is off-module.
        route_names, skill_names: the R routing and K skill names.
        step_labels: optional T row labels (default ``step 1`` .. ``step T``).
        intended, truth: optional T pairs ``(route_name, skill_name)``: the intended module
            of each step (open square) and the truly executed one (dot).
    A step whose row is NaN (not observed) is drawn blank. Returns a figure with four axes:
    routing, skill, off-module panels and their shared colour bar.
    """
    route_probs, skill_probs = _matrix(route_probs, "route_probs", 2), _matrix(skill_probs, "skill_probs", 2)
    p_off = _matrix(p_off, "p_off", 1)
    n_steps = route_probs.shape[0]
    if skill_probs.shape[0] != n_steps:
        raise ValueError(f"skill_probs must have {n_steps} steps like route_probs, got shape {skill_probs.shape}")
    if p_off.shape != (n_steps,):
        raise ValueError(f"p_off must have {n_steps} steps like route_probs, got shape {p_off.shape}")
    route_names = _labels(route_names, route_probs.shape[1], "route_names")
    skill_names = _labels(skill_names, skill_probs.shape[1], "skill_names")
    if step_labels is None:
        step_labels = [f"step {t + 1}" for t in range(n_steps)]
    step_labels = _labels(step_labels, n_steps, "step_labels")
    marks = [(_module_columns(pairs, name, n_steps, route_names, skill_names), style, label)
             for pairs, name, style, label in ((intended, "intended", _INTENDED_STYLE, "intended"),
                                               (truth, "truth", _TRUTH_STYLE, "true executed"))
             if pairs is not None]

    fig = _figure(max(3.2, 0.3 * n_steps + 2.6), title or "per-step posterior of the executed module")
    axes = fig.subplots(1, 3, sharey=True,
                        gridspec_kw={"width_ratios": [len(route_names), len(skill_names), 1.6]})
    for ax, probs, names, what in ((axes[0], route_probs, route_names, "routing"),
                                   (axes[1], skill_probs, skill_names, "skill")):
        image = ax.imshow(probs, cmap=_PROB_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=_TICK)
        ax.set_title(f"executed {what}")
    axes[2].imshow(p_off[:, None], cmap=_PROB_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    axes[2].set_xticks([0], ["off-module"], rotation=90, fontsize=_TICK)
    axes[2].set_title("off")
    axes[0].set_yticks(range(n_steps), step_labels, fontsize=_TICK)
    for t in range(n_steps):
        if np.isnan(p_off[t]):
            continue
        axes[2].text(0, t, f"{p_off[t]:.2f}", ha="center", va="center", fontsize=_TICK,
                     color="white" if p_off[t] < 0.5 else "black")
    for t in np.flatnonzero(np.isnan(skill_probs).all(axis=1)):
        axes[1].text(len(skill_names) / 2 - 0.5, t, "not observed", ha="center", va="center",
                     fontsize=_TICK, color="0.4", style="italic")
    for (route_cols, skill_cols), style, label in marks:
        axes[0].plot(route_cols, range(n_steps), label=label, **style)
        axes[1].plot(skill_cols, range(n_steps), **style)
    fig.colorbar(image, ax=axes, shrink=0.9).set_label("posterior probability", fontsize=_LABEL)
    _legend(fig, axes[0].get_legend_handles_labels()[0])
    return fig


# -- module graphs ---------------------------------------------------------------------
def draw_module_digraph(graph: nx.DiGraph, *, title: str = "") -> Figure:
    """Draw a graph from :func:`~latentsel.traces.graph.module_digraph` left to right; returns a one-axes figure.

    Edges between neighbours are straight, longer ones arc above; hidden steps and edges of
    routings that declare nothing they read are dashed; steps that deviate from the intended module are orange and
    listed above the graph.
    """
    if not isinstance(graph, nx.DiGraph) or 0 not in graph:
        raise ValueError("graph must be a DiGraph from module_digraph (nodes 0..T)")
    n_steps = graph.number_of_nodes() - 1
    pos = {t: (float(t), 0.0) for t in graph}
    # Equal aspect keeps the arcs, bent in display space (height about 0.18 per step they
    # span), inside limits set in data space; the figure height follows from the data box.
    longest_arc = max((t - s for s, t in graph.edges if t - s > 1), default=0)
    x_range, y_low, y_high = max(n_steps + 1.4, 6.0), -0.8, 0.18 * longest_arc + 0.4
    fig = _figure((_WIDTH - 0.4) * (y_high - y_low) / x_range + 1.1, title or "module graph")
    ax = fig.add_subplot()
    ax.set_aspect("equal")
    node_size = 650
    deviating = [t for t in graph if graph.nodes[t].get("deviates")]
    for hidden in (False, True):
        nodes = [t for t in graph if graph.nodes[t]["hidden"] is hidden]
        if nodes:
            drawn = nx.draw_networkx_nodes(
                graph, pos, nodelist=nodes, ax=ax, node_size=node_size, linewidths=1.5,
                node_color=["tab:orange" if t in deviating else "#cfe2f3" for t in nodes], edgecolors="0.2")
            drawn.set_linestyle("--" if hidden else "-")
    nx.draw_networkx_labels(graph, pos, {t: f"h{t}" for t in graph}, ax=ax, font_size=_LABEL)
    for (s, t), data in graph.edges.items():
        style = f"arc3,rad={0.0 if t - s == 1 else -0.35}"
        common = dict(ax=ax, node_size=node_size, connectionstyle=style)
        nx.draw_networkx_edges(graph, pos, edgelist=[(s, t)], style="-" if data["known"] else "--",
                               arrows=True, arrowsize=12, edge_color="0.25", **common)
        nx.draw_networkx_edge_labels(graph, pos, {(s, t): data["skill"]}, font_size=_TICK, rotate=False,
                                     bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none"), **common)
    for t in graph:
        text = graph.nodes[t]["text"]
        shown = "hidden" if text is None else "\n".join(textwrap.wrap(text, 8)) or '""'
        ax.text(t, -0.3, shown, ha="center", va="top", fontsize=_LABEL, family="monospace",
                style="italic" if text is None else "normal", color="0.4" if text is None else "black")
    ax.set_xlim((n_steps - x_range) / 2, (n_steps + x_range) / 2)
    ax.set_ylim(y_low, y_high)
    ax.set_axis_off()
    notes = [f"h{t}: executed {graph.nodes[t]['route']}/{graph.nodes[t]['skill']}, "
             f"intended {'/'.join(graph.nodes[t]['intended'])}" for t in deviating]
    if notes:
        ax.set_title("\n".join(notes), fontsize=_LABEL, color="tab:red", loc="left")
    handles = [Line2D([], [], marker="o", markersize=9, markerfacecolor="#cfe2f3", markeredgecolor="0.2",
                      linestyle="none", label="h0 = input, h1.. = steps; edge label = skill")]
    if deviating:
        handles.append(Patch(facecolor="tab:orange", edgecolor="0.2", label="executed module ≠ intended"))
    if not all(d["known"] for _, _, d in graph.edges(data=True)):
        handles.append(Line2D([], [], color="0.25", linestyle="--", label="user routing: reads all entries"))
    _legend(fig, handles, fontsize=_TICK)
    return fig


def module_graph(world: World, x: str, steps: Sequence[str | None], routes: Sequence[str], skills: Sequence[str], *,
                 intended: Sequence[tuple[str, str]] | None = None, title: str = "") -> Figure:
    """:func:`draw_module_digraph` of :func:`~latentsel.traces.graph.module_digraph` (same arguments)."""
    return draw_module_digraph(module_digraph(world, x, steps, routes, skills, intended=intended), title=title)


def _column_layout(groups: list[list], max_columns: int) -> tuple[dict, int, int]:
    """Positions ``{node: (column, -row)}`` that flow groups down at most ``max_columns``
    columns, a group never split, one empty row between groups; also the columns and rows used."""
    per_column = max([len(g) for g in groups] + [math.ceil(sum(len(g) + 1 for g in groups) / max_columns)])
    while True:
        pos, column, row, n_rows = {}, 0, 0, 0
        for members in groups:
            if row + len(members) > per_column:
                column, row = column + 1, 0
            pos.update({m: (float(column), -float(row + j)) for j, m in enumerate(members)})
            row += len(members) + 1
            n_rows = max(n_rows, row - 1)
        if column < max_columns:
            return pos, column + 1, n_rows
        per_column += 1


def draw_distinguishability_graph(graph: nx.Graph, *, title: str = "", max_nodes: int = 120) -> Figure:
    """Draw the equivalence classes of a distinguishability graph (DESIGN §6).

    ``graph`` is undirected, nodes are module labels such as ``"prev/reverse"``, an edge
    joins two modules no observed step separates. Only non-singleton components (the
    classes of indistinguishable modules) are drawn, largest first, as many as fit in
    ``max_nodes`` nodes: each as a column of labelled nodes in its own colour, edges as arcs.
    Returns a one-axes figure.
    """
    if not isinstance(graph, nx.Graph) or graph.is_directed():
        raise ValueError("graph must be an undirected networkx Graph")
    if max_nodes < 2:
        raise ValueError(f"max_nodes must be >= 2, got {max_nodes}")
    components = sorted((sorted(c, key=str) for c in nx.connected_components(graph)),
                        key=lambda c: (-len(c), str(c[0])))
    classes = [c for c in components if len(c) > 1]
    n_single = len(components) - len(classes)
    drawn, budget = [], max_nodes
    for members in classes:
        if len(members) <= budget:
            drawn.append(members)
            budget -= len(members)
    pos, n_columns, n_rows = _column_layout(drawn, max_columns=5)

    fig = _figure(max(3.0, 0.17 * n_rows + 1.3), title or "modules no observed step separates")
    ax = fig.add_subplot()
    ax.set_axis_off()
    if not classes:
        ax.text(0.5, 0.5, f"every module is distinguishable\n({n_single} modules, each its own class)",
                ha="center", va="center", fontsize=12, transform=ax.transAxes)
        return fig
    left_out = [c for c in classes if c not in drawn]
    caption = (f"{len(components)} classes: {len(classes)} with several modules, {n_single} singletons; "
               f"largest class {len(classes[0])} modules")
    if left_out:
        caption += (f"\n{len(left_out)} classes ({sum(map(len, left_out))} modules) not drawn "
                    f"(max_nodes={max_nodes})")
    ax.set_title(caption, fontsize=_LABEL)
    colours = matplotlib.colormaps["tab10"].colors
    for i, members in enumerate(drawn):
        colour = colours[i % len(colours)]
        # upper node first, so that a positive rad bends every arc to the left of the column
        edges = [tuple(sorted(e, key=lambda m: -pos[m][1])) for e in graph.subgraph(members).edges]
        nx.draw_networkx_edges(graph, pos, edgelist=edges, ax=ax, arrows=True, arrowstyle="-",
                               connectionstyle="arc3,rad=0.4", edge_color=[colour], alpha=0.6, node_size=25)
        nx.draw_networkx_nodes(graph, pos, nodelist=members, ax=ax, node_size=25, node_color=[colour])
        for m in members:
            ax.text(pos[m][0] + 0.04, pos[m][1], str(m), fontsize=_TICK, va="center")
    ax.set_xlim(-0.35, max(n_columns, 3) - 0.35)
    ax.set_ylim(-n_rows + 0.5, 0.6)
    if not drawn:
        ax.text(0.5, 0.5, f"no class fits in max_nodes={max_nodes}", ha="center", va="center",
                transform=ax.transAxes)
    return fig

