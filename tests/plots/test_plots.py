"""Figures of latentsel.plots on small synthetic inputs: each writes a real PNG with the
expected panels, and bad input names its argument."""
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import pytest

from latentsel import plots
from latentsel.analysis.attribution import CATEGORIES, LABELS
from latentsel.traces.graph import module_digraph
from latentsel.world import Route, World

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROGRAM = [("prev", "reverse"), ("cat_prev_input", "shift1"), ("longest", "evens")]


def with_user_routing(world):
    """``world`` plus a routing that declares nothing it reads."""
    return World(world.skills, world.routes + (Route("my_routing", lambda h: h[-1]),), world.alphabet, world.max_len)


def _render(fig, tmp_path, n_axes):
    """Check the panel count, save, check the PNG, then free the figure."""
    assert len(fig.axes) == n_axes
    path = plots.save_figure(fig, tmp_path / "figure.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000
    fig.clear()
    # built without pyplot: nothing may stay in its global figure list
    assert plt.get_fignums() == []
    return path


def _stochastic(rng, n, m):
    return rng.dirichlet(np.full(m, 0.5), size=n)


def test_save_figure_is_atomic_and_checks_its_argument(tmp_path, rng):
    fig = plots.execution_heatmap(_stochastic(rng, 3, 3), np.zeros((3, 3)), "abc", "abc", title="t")
    path = _render(fig, tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(ValueError, match="^fig "):
        plots.save_figure("not a figure", tmp_path / "x.png")


@pytest.mark.parametrize("kind", ["routes", "skills"])
def test_execution_heatmap(world, rng, tmp_path, kind):
    names = world.route_names if kind == "routes" else world.skill_names
    n = len(names)
    reached = np.arange(n) % 3 != 0
    fig = plots.execution_heatmap(_stochastic(rng, n, n), rng.uniform(0, 0.2, (n, n)), names, names,
                                  title=f"{kind} execution", truth=np.eye(n), reached=reached)
    mean_ax = fig.axes[0]
    assert [t.get_text() for t in mean_ax.get_yticklabels()] == names
    assert len(mean_ax.patches) == (~reached).sum()
    _render(fig, tmp_path, 4)


@pytest.mark.parametrize("change, argument", [
    ({"sd": np.zeros((3, 4))}, "sd"),
    ({"row_labels": ["a", "b"]}, "row_labels"),
    ({"truth": np.eye(4)}, "truth"),
    ({"reached": np.ones(3)}, "reached"),
    ({"mean": np.zeros(3)}, "mean"),
])
def test_execution_heatmap_rejects_bad_input(change, argument):
    args = dict(mean=np.eye(3), sd=np.zeros((3, 3)), row_labels="abc", col_labels="abc", title="t")
    with pytest.raises(ValueError, match=f"^{argument} "):
        plots.execution_heatmap(**{**args, **change})


def _selection_inputs(world, rng, n_steps=4):
    route_probs = _stochastic(rng, n_steps, world.n_routes)
    skill_probs = _stochastic(rng, n_steps, world.n_skills)
    p_off = rng.uniform(0, 1, n_steps)
    route_probs[1], skill_probs[1], p_off[1] = np.nan, np.nan, np.nan
    return route_probs, skill_probs, p_off


def test_selection_heatmap(world, rng, tmp_path):
    route_probs, skill_probs, p_off = _selection_inputs(world, rng)
    intended = PROGRAM + [("skip", "dedup")]
    fig = plots.selection_heatmap(route_probs, skill_probs, p_off, world.route_names, world.skill_names,
                                  step_labels=["edcba", "hidden", "fdbce", "x"], intended=intended,
                                  truth=intended[::-1], title="one trace")
    routing = fig.axes[0].images[0].get_array()
    assert routing.mask[1].all() and not routing.mask[[0, 2, 3]].any()
    assert any(t.get_text() == "not observed" for t in fig.axes[1].texts)
    _render(fig, tmp_path, 4)


@pytest.mark.parametrize("change, argument", [
    ({"p_off": np.zeros(3)}, "p_off"),
    ({"skill_probs": np.zeros((3, 24))}, "skill_probs"),
    ({"route_names": ["prev"]}, "route_names"),
    ({"intended": [("prev", "reverse")] * 3 + [("nowhere", "reverse")]}, "intended"),
    ({"truth": [("prev", "reverse")]}, "truth"),
    ({"step_labels": ["a"]}, "step_labels"),
])
def test_selection_heatmap_rejects_bad_input(world, rng, change, argument):
    route_probs, skill_probs, p_off = _selection_inputs(world, rng)
    args = dict(route_probs=route_probs, skill_probs=skill_probs, p_off=p_off,
                route_names=world.route_names, skill_names=world.skill_names)
    with pytest.raises(ValueError, match=f"^{argument}"):
        plots.selection_heatmap(**{**args, **change})


def test_module_graph_with_hidden_step_and_user_routing(world, tmp_path):
    world = with_user_routing(world)
    steps = world.run(PROGRAM, "abcde")
    steps[1] = None
    routes = ["prev", "cat_prev_input", "my_routing"]
    graph = module_digraph(world, "abcde", steps, routes, ["reverse", "shift1", "evens"], intended=PROGRAM)
    assert graph.nodes[2]["hidden"]
    assert sorted(s for s, t in graph.in_edges(3)) == [0, 1, 2]
    assert not any(d["known"] for _, _, d in graph.in_edges(3, data=True))
    fig = plots.module_graph(world, "abcde", steps, routes, ["reverse", "shift1", "evens"], intended=PROGRAM,
                             title="a compressed trace")
    _render(fig, tmp_path, 1)


def test_draw_module_digraph_rejects_bad_input():
    with pytest.raises(ValueError, match="^graph "):
        plots.draw_module_digraph(nx.Graph())


def _module_graph(world, classes):
    graph = nx.Graph()
    for m in range(world.n_modules):
        route, skill = world.module_name(m).split("/")
        graph.add_node(world.module_name(m), route=route, skill=skill)
    for members in classes:
        graph.add_edges_from((a, b) for i, a in enumerate(members) for b in members[i + 1:])
    return graph


def test_distinguishability_graph(world, tmp_path):
    aliased = [[f"{r}/{k}" for r in ("prev", "input", "skip", "longest", "shortest")] for k in world.skill_names]
    graph = _module_graph(world, aliased + [["prev/dedup", "prev/unique"]])
    fig = plots.draw_distinguishability_graph(graph, title="t = 1 aliasing", max_nodes=40)
    caption = fig.axes[0].get_title()
    assert "23 with several modules" in caption and "largest class 10 modules" in caption
    assert "16 classes (80 modules) not drawn" in caption
    _render(fig, tmp_path, 1)


@pytest.mark.parametrize("empty", [False, True])
def test_distinguishability_graph_without_classes(world, tmp_path, empty):
    graph = nx.Graph() if empty else _module_graph(world, [])
    fig = plots.draw_distinguishability_graph(graph)
    assert "every module is distinguishable" in fig.axes[0].texts[0].get_text()
    _render(fig, tmp_path, 1)
    with pytest.raises(ValueError, match="^graph "):
        plots.draw_distinguishability_graph(nx.DiGraph())


def _records(rng, seeds=(0,)):
    records = []
    for regime in ("sft", "rl", "compressed"):
        for model in ("modular", "entangled"):
            for n in (10, 100, 1000):
                for seed in seeds:
                    records.append({
                        "regime": regime, "model": model, "n_traces": n, "seed": seed,
                        "map_accuracy": rng.uniform(0.5, 1), "truth_mass": rng.uniform(),
                        "class_accuracy": None if regime == "sft" else rng.uniform(0.5, 1),
                        "param_error": None, "kl_reached": np.log(n) * rng.uniform(0.8, 1.2),
                        "kl_unreached": 0.0 if regime != "rl" else None})
    return records


def test_identifiability_curves_with_none_and_one_seed(rng, tmp_path):
    fig = plots.identifiability_curves(_records(rng), title="identifiability")
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert len(by_title["MAP accuracy (per label)"].lines) == 6
    assert len(by_title["MAP accuracy (per class)"].lines) == 4
    assert [t.get_text() for t in by_title["parameter error"].texts] == ["no values"]
    _render(fig, tmp_path, 4)


def test_contraction_curves_show_unreached_rows_at_zero(rng, tmp_path):
    fig = plots.contraction_curves(_records(rng, seeds=(0, 1, 2)))
    reached, unreached = fig.axes
    assert reached.get_ylim()[0] <= 0
    low, high = unreached.get_ylim()
    assert low < 0 < high
    assert all(np.all(line.get_ydata() == 0) for line in unreached.lines)
    assert any("stay at the prior" in t.get_text() for t in unreached.texts)
    _render(fig, tmp_path, 2)


@pytest.mark.parametrize("records, metrics, argument", [
    ([], ("map_accuracy",), "records"),
    ([{"regime": "rl", "model": "modular"}], ("map_accuracy",), "records"),
    ([{"regime": "rl", "model": "modular", "n_traces": 0, "map_accuracy": 1.0}], ("map_accuracy",), "records"),
    ([{"regime": "rl", "model": "modular", "n_traces": 5, "map_accuracy": 1.0}], ("map_acuracy",), "metrics"),
    ([{"regime": "rl", "model": "modular", "n_traces": 5, "map_accuracy": 1.0}], (), "metrics"),
])
def test_identifiability_curves_reject_bad_input(records, metrics, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        plots.identifiability_curves(records, metrics)


def test_sbc_histograms(rng, tmp_path):
    ranks = rng.integers(0, 51, size=(3, 100))
    fig = plots.sbc_histograms(ranks, 50, names=["noise", "off_module", "route_exec[0, 0]"])
    assert [ax.get_title() for ax in fig.axes] == ["noise", "off_module", "route_exec[0, 0]"]
    _render(fig, tmp_path, 3)


@pytest.mark.parametrize("change, argument", [
    ({"ranks": np.full((2, 10), 51)}, "ranks"),
    ({"ranks": np.zeros((2, 10))}, "ranks"),
    ({"names": ["a"]}, "names"),
    ({"bins": 0}, "bins"),
    ({"n_draws": 0}, "n_draws"),
])
def test_sbc_histograms_reject_bad_input(change, argument):
    args = dict(ranks=np.zeros((2, 10), dtype=int), n_draws=50, names=["a", "b"])
    with pytest.raises(ValueError, match=f"^{argument} "):
        plots.sbc_histograms(**{**args, **change})


def _shares(rng):
    return dict(zip(CATEGORIES, rng.dirichlet(np.ones(len(CATEGORIES)))))


def _attribution_rows(rng):
    return [{"policy": policy, "split": split, **_shares(rng)}
            for split in ("ood", "seen", "unseen") for policy in ("sft", "sft+rl-atomic", "sft+rl-compound")]


def test_attribution_bars(rng, tmp_path):
    fig = plots.attribution_bars(_attribution_rows(rng)[:-1], LABELS, title="steps")
    ax = fig.axes[0]
    assert len(ax.patches) == 8 * len(CATEGORIES)
    assert [t.get_text() for t in ax.child_axes[0].get_xticklabels()] == ["seen", "unseen", "ood"]
    _render(fig, tmp_path, 1)


def test_attribution_bars_reject_bad_input(rng):
    rows = _attribution_rows(rng)
    for bad in ([], rows + rows[:1], [{**rows[0], "skill": 1.5}], [{"policy": "sft"}]):
        with pytest.raises(ValueError, match="^rows"):
            plots.attribution_bars(bad, LABELS)


def test_attribution_by_step_and_execution_by_step(rng, tmp_path):
    rows = [{"policy": p, "split": s, "step": t, **_shares(rng)} for s in ("seen", "ood")
            for p in ("sft", "rl") for t in range(1, 4 if s == "seen" else 5)]
    fig = plots.attribution_by_step(rows, LABELS)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["seen", "ood"]
    assert len(fig.axes[0].patches) == 6 * len(CATEGORIES)
    _render(fig, tmp_path, 2)
    names = ["a", "b", "c"]
    counts = {"seen": rng.uniform(size=(3, 3, 3)), "ood": rng.uniform(size=(4, 3, 3))}
    counts["seen"][1, 2] = 0  # an intended module never met at step 2: a blank row
    fig = plots.execution_by_step(counts, names)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled[:4] == ["seen, step 1", "seen, step 2", "seen, step 3", "ood, step 1"]
    _render(fig, tmp_path, 2 * 4 + 1)  # the unused cell stays, blank; one colour bar
    with pytest.raises(ValueError, match="counts"):
        plots.execution_by_step({"seen": np.ones((2, 2, 2))}, names)


def test_fidelity_scatter(rng, tmp_path):
    rows = [{"policy": p, "skill": f"s{k}", "teacher_forced": rng.uniform(), "exact": rng.uniform()}
            for p in ("sft", "rl") for k in range(5)]
    fig = plots.fidelity_scatter(rows)
    assert [ax.get_title() for ax in fig.axes] == ["sft", "rl"] and len(fig.axes[0].texts) == 5
    _render(fig, tmp_path, 2)
    with pytest.raises(ValueError, match="^rows"):
        plots.fidelity_scatter([{"policy": "sft"}])


def test_training_curves_draw_probes_and_rl_runs(tmp_path):
    from latentsel.plots import save_figure, training_curves

    probe = {"step": {"acc": 0.4}, "stop": {"acc": 0.8}, "by_position": {"1": {"acc": 0.6}, "2": {"acc": 0.3}}}
    sft = [{"step": s, "loss": 2.0 / s} for s in range(1, 11)] + [{"step": 10, "loss": 0.2, "teacher_forced": probe}]
    rl = {"rl-atomic": [{"step": s, "reward": 0.5, "updated": s % 2 == 0} for s in range(1, 6)]}
    fig = training_curves(sft, rl, title="cpu run")
    assert len(fig.axes) == 3
    assert "2/5 steps updated" in fig.axes[2].get_legend().get_texts()[0].get_text()
    assert save_figure(fig, tmp_path / "c.png").stat().st_size > 1000
    assert len(training_curves(sft).axes) == 2
    with pytest.raises(ValueError, match="sft must hold metrics records"):
        training_curves([{"loss": 1.0}])
