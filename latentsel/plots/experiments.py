"""Figures summarizing experiments: identifiability and contraction curves against the
number of traces, SBC rank histograms and error attribution per split and policy."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator
from scipy.stats import binom

from latentsel.plots._common import _LABEL, _TICK, _WIDTH, _figure, _labels, _legend, _panels

__all__ = ["identifiability_curves", "contraction_curves", "sbc_histograms", "attribution_bars", "attribution_by_step",
           "execution_by_step", "fidelity_scatter"]


# -- curves and histograms -------------------------------------------------------------
_METRIC_LABELS = {
    "map_accuracy": "MAP accuracy (per label)",
    "class_accuracy": "MAP accuracy (per class)",
    "step_class_accuracy": "MAP accuracy (per class, observed steps)",
    "truth_mass": "posterior mass on the truth",
    "param_error": "parameter error",
    "class_param_error": "parameter error (class totals)",
    "heldout_diff": "held-out log-lik. per trace, entangled − modular",
    "kl_reached": "KL(posterior | prior), reached rows",
    "kl_unreached": "KL(posterior | prior), unreached rows",
}
_REGIME_ORDER = ("sft", "rl", "atomic", "compressed")
_MODEL_STYLES = {"modular": "-", "entangled": "--", "grammar": ":"}


def _ordered(names, preferred: Sequence[str]) -> list[str]:
    """``names`` sorted with those in ``preferred`` first, in its order, then the rest by name."""
    return sorted(names, key=lambda n: (preferred.index(n) if n in preferred else len(preferred), str(n)))


def _check_records(records) -> list[Mapping]:
    records = list(records) if records is not None else []
    if not records:
        raise ValueError("records must be a non-empty list of dicts")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or not {"regime", "model", "n_traces"} <= set(r):
            raise ValueError(f"records[{i}] must be a dict with 'regime', 'model' and 'n_traces'")
        if not isinstance(r["n_traces"], (int, np.integer)) or r["n_traces"] < 1:
            raise ValueError(f"records[{i}]['n_traces'] must be a positive integer, got {r['n_traces']!r}")
    return records


def _curves(records, metrics: Sequence[str], title: str) -> Figure:
    records = _check_records(records)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    available = sorted({k for r in records for k in r} - {"regime", "model", "n_traces", "seed"})
    unknown = [m for m in metrics if m not in available]
    if not metrics or unknown:
        raise ValueError(f"metrics: unknown metric(s) {unknown or metrics}; the records have {available}")
    regimes = _ordered({r["regime"] for r in records}, _REGIME_ORDER)
    models = _ordered({r["model"] for r in records}, tuple(_MODEL_STYLES))
    colour = {g: matplotlib.colormaps["tab10"](i % 10) for i, g in enumerate(regimes)}
    extra_styles = iter(["-.", (0, (1, 3)), (0, (5, 1, 1, 1))] * len(models))
    style = {m: _MODEL_STYLES.get(m) or next(extra_styles) for m in models}
    n_values = sorted({int(r["n_traces"]) for r in records})

    fig = _figure(2.9 * math.ceil(len(metrics) / 2) + 1.2, title or "identifiability against the number of traces")
    for ax, metric in zip(_panels(fig, len(metrics), ncols=2), metrics):
        drawn = []
        for regime in regimes:
            for model in models:
                by_n: dict[int, list[float]] = {}
                for r in records:
                    value = r.get(metric)
                    if r["regime"] == regime and r["model"] == model and value is not None and np.isfinite(value):
                        by_n.setdefault(int(r["n_traces"]), []).append(float(value))
                if not by_n:
                    continue
                ns = sorted(by_n)
                values = [np.asarray(by_n[n]) for n in ns]
                ax.fill_between(ns, [v.min() for v in values], [v.max() for v in values],
                                color=colour[regime], alpha=0.18, linewidth=0)
                ax.plot(ns, [v.mean() for v in values], color=colour[regime], linestyle=style[model],
                        marker="o", markersize=3)
                drawn.extend(v for v in values)
        ax.set_xscale("log")
        if len(n_values) <= 8:
            ax.set_xticks(n_values, [str(n) for n in n_values])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(_METRIC_LABELS.get(metric, metric), fontsize=_LABEL + 1)
        ax.set_ylabel(metric, fontsize=_LABEL)
        ax.set_xlabel("number of traces N", fontsize=_LABEL)
        ax.tick_params(labelsize=_TICK + 1)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="0.4")
        elif metric.startswith("kl_"):
            top = max(float(np.max(np.concatenate(drawn))), 0.0)
            ax.set_ylim(-0.05 * (top or 1.0), 1.05 * top or 1.0)
            if top == 0.0:
                ax.text(0.5, 0.6, "KL = 0 everywhere: these rows stay at the prior",
                        ha="center", transform=ax.transAxes, fontsize=_LABEL, color="0.3")
        elif metric in ("map_accuracy", "class_accuracy", "truth_mass"):
            ax.set_ylim(-0.03, 1.03)
    handles = [Line2D([], [], color=colour[g], label=g) for g in regimes]
    handles += [Line2D([], [], color="0.3", linestyle=style[m], label=m) for m in models]
    handles.append(Patch(color="0.3", alpha=0.18, label="min–max over seeds"))
    # as many columns as labels of this length fit across the figure
    _legend(fig, handles, ncols=max(2, min(8, 110 // max(len(h.get_label()) + 6 for h in handles))))
    return fig


def identifiability_curves(records: Sequence[Mapping],
                           metrics: Sequence[str] = ("map_accuracy", "class_accuracy", "truth_mass", "param_error"),
                           *, title: str = "") -> Figure:
    """Identifiability measures against the number of traces, one panel per metric.

    ``records`` are identify.json rows ``{"regime", "model", "n_traces", "seed", <metric>: float
    or None, ...}``. Per (regime, model): the mean over seeds (colour = regime, line style =
    model) and a band from min to max; ``None`` (and NaN) values are skipped. N on a log scale.
    Returns a figure with one axes per metric.
    """
    return _curves(records, metrics, title)


def contraction_curves(records: Sequence[Mapping], *, title: str = "") -> Figure:
    """Posterior contraction (``kl_reached``, ``kl_unreached``) against the number of traces.

    Same records and encoding as :func:`identifiability_curves`, on a linear KL scale from 0:
    rows the data never reach stay at the prior, so their KL is drawn as the zero it is.
    Returns a figure with two axes.
    """
    return _curves(records, ("kl_reached", "kl_unreached"), title or "posterior contraction")


def sbc_histograms(ranks, n_draws: int, *, names: Sequence[str], bins: int | None = None,
                   title: str = "") -> Figure:
    """Simulation-based calibration: rank histograms with the 99% band of a uniform one.

    Args:
        ranks: int[n_params, n_replications], each in 0..n_draws (the rank of the true value
            among n_draws posterior draws).
        n_draws: the number of posterior draws per replication.
        names: n_params parameter names.
        bins: number of bins (default up to 20, about 5 replications per bin); the integer
            ranks are split as evenly as possible and the band uses each bin's exact width.
    Returns a figure with one axes per parameter.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or 0 in ranks.shape or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a non-empty int[n_params, n_replications], got "
                         f"{ranks.dtype}{list(ranks.shape)}")
    if not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    if ranks.min() < 0 or ranks.max() > n_draws:
        raise ValueError(f"ranks must lie in 0..n_draws={n_draws}, got {ranks.min()}..{ranks.max()}")
    names = _labels(names, ranks.shape[0], "names")
    n_params, n_reps = ranks.shape
    if bins is None:
        # up to 20 bins of about 5 replications; equal widths when a divisor is close enough
        target = max(1, min(20, n_draws + 1, n_reps // 5))
        divisor = max(b for b in range(1, target + 1) if (n_draws + 1) % b == 0)
        bins = divisor if 2 * divisor >= target else target
    if not isinstance(bins, (int, np.integer)) or not 1 <= bins <= n_draws + 1:
        raise ValueError(f"bins must be an integer in 1..n_draws+1={n_draws + 1}, got {bins!r}")
    edges = np.round(np.linspace(0, n_draws + 1, bins + 1)).astype(int)
    p_bin = np.diff(edges) / (n_draws + 1)
    low, high = binom.ppf(0.005, n_reps, p_bin), binom.ppf(0.995, n_reps, p_bin)
    x = edges - 0.5

    fig = _figure(2.3 * math.ceil(n_params / 4) + 1.0,
                  title or f"SBC rank histograms ({n_reps} replications, {n_draws} draws)")
    for ax, row, name in zip(_panels(fig, n_params, ncols=4), ranks, names):
        counts = np.histogram(row, bins=edges)[0]
        ax.fill_between(x, np.append(low, low[-1]), np.append(high, high[-1]), step="post",
                        color="0.75", linewidth=0)
        ax.stairs(n_reps * p_bin, x, color="0.4", linestyle="--", linewidth=0.8)
        ax.stairs(counts, x, fill=True, color="tab:blue", alpha=0.75)
        ax.set_title(name, fontsize=_LABEL)
        ax.set_xlabel("rank", fontsize=_TICK)
        ax.set_ylabel("count", fontsize=_TICK)
        ax.tick_params(labelsize=_TICK)
    handles = [Patch(color="tab:blue", alpha=0.75, label="rank counts"),
               Patch(color="0.75", label="99% band of a uniform histogram"),
               Line2D([], [], color="0.4", linestyle="--", label="expected count")]
    _legend(fig, handles)
    return fig


# -- error attribution -----------------------------------------------------------------
# colours of the attribution categories of latentsel.analysis.attribution; other keys take the cycle's
_COLOURS = {"intended": "#4c9a2a", "near_miss": "#7fbf5f", "inherited": "#c5e3b0", "routing": "tab:blue", "skill": "tab:orange", "either": "#9fb6cd",
            "routing_skill": "tab:purple", "off_module": "0.6", "stopped": "tab:red", "unreadable": "#8c564b",
            "after_failure": "#e7a1b0"}
_SPLIT_ORDER = ("seen", "unseen", "ood")


def _category_table(rows: Sequence[Mapping], keys: Sequence[str], categories: Mapping[str, str]
                    ) -> dict[tuple, np.ndarray]:
    rows = list(rows) if rows is not None else []
    if not rows:
        raise ValueError("rows must be a non-empty list of dicts")
    if not categories:
        raise ValueError("categories must map at least one key to its label")
    table: dict[tuple, np.ndarray] = {}
    need = tuple(keys) + tuple(categories)
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or not set(need) <= set(r):
            raise ValueError(f"rows[{i}] must be a dict with keys {list(need)}")
        values = np.array([r[c] for c in categories], dtype=float)
        if not np.all((values >= 0) & (values <= 1 + 1e-9)):
            raise ValueError(f"rows[{i}] shares must lie in [0, 1], got {values.tolist()}")
        key = tuple(str(r[k]) for k in keys)
        if key in table:
            raise ValueError(f"rows has two entries for {dict(zip(keys, key))}")
        table[key] = values
    return table


def _colour(categories: Mapping[str, str], c: str):
    return _COLOURS.get(c, f"C{list(categories).index(c) % 10}")


def _stacked(ax, xs, stack: np.ndarray, categories: Mapping[str, str]) -> None:
    bottom = np.zeros(len(xs))
    for j, (c, label) in enumerate(categories.items()):
        ax.bar(xs, stack[:, j], 0.8, bottom=bottom, color=_colour(categories, c), label=label, linewidth=0)
        bottom += stack[:, j]


def _category_legend(fig: Figure, categories: Mapping[str, str]) -> None:
    _legend(fig, [Patch(color=_colour(categories, c), label=label) for c, label in categories.items()],
            fontsize=_TICK + 1, ncols=5)


def attribution_bars(rows: Sequence[Mapping], categories: Mapping[str, str], *, title: str = "") -> Figure:
    """Where every program step went, per split and policy: one bar per corpus, stacked by
    category (``categories``: key -> label, in stacking order, such as
    :data:`latentsel.analysis.attribution.LABELS`; the first is labelled on each bar).

    ``rows`` are dicts ``{"policy", "split", <category>: share of program steps}``, the shares
    in [0, 1]. One group per split (seen, unseen, ood first), one bar per policy.
    """
    table = {(s, p): v for (p, s), v in _category_table(rows, ("policy", "split"), categories).items()}
    splits = _ordered({s for s, _ in table}, _SPLIT_ORDER)
    policies = list(dict.fromkeys(p for _, p in table))
    keys, xs, centres = [], [], []
    for g, split in enumerate(splits):
        here = [p for p in policies if (split, p) in table]
        start = g * (len(policies) + 1)
        keys += [(split, p) for p in here]
        xs += [start + j for j in range(len(here))]
        centres.append(start + (len(here) - 1) / 2)
    stack = np.array([table[k] for k in keys])
    fig = _figure(4.6, title or "where every program step went")
    ax = fig.add_subplot()
    _stacked(ax, xs, stack, categories)
    ok = stack[:, 0]
    for x, v in zip(xs, ok):
        ax.text(x, v / 2, f"{v:.2f}", ha="center", va="center", fontsize=_TICK, color="white")
    ax.set_xticks(xs, [p for _, p in keys], rotation=30, ha="right", fontsize=_TICK + 1)
    groups = ax.secondary_xaxis("top")
    groups.set_xticks(centres, splits, fontsize=_LABEL + 1, fontweight="bold")
    groups.tick_params(length=0)
    for g in range(1, len(splits)):
        ax.axvline(g * (len(policies) + 1) - 1, color="0.8", linewidth=0.8)
    ax.set_ylabel("share of program steps", fontsize=_LABEL)
    ax.set_ylim(0, 1.0)
    _category_legend(fig, categories)
    return fig


def attribution_by_step(rows: Sequence[Mapping], categories: Mapping[str, str], *, title: str = "") -> Figure:
    """The same shares by step position: one panel per split, a group of bars per policy, one
    bar per step. ``rows``: dicts ``{"policy", "split", "step" (1-based), <category>: share}``."""
    table = _category_table(rows, ("split", "policy", "step"), categories)
    splits = _ordered({s for s, _, _ in table}, _SPLIT_ORDER)
    policies = list(dict.fromkeys(p for _, p, _ in table))
    fig = _figure(3.6, title or "where the t-th program step went")
    axes = _panels(fig, len(splits), len(splits))
    for ax, split in zip(axes, splits):
        xs, stack, ticks, centres = [], [], [], []
        x = 0
        for policy in policies:
            steps = sorted((int(t) for s, p, t in table if s == split and p == policy))
            if not steps:
                continue
            centres.append(x + (len(steps) - 1) / 2)
            ticks.append(policy)
            for t in steps:
                xs.append(x)
                stack.append(table[(split, policy, str(t))])
                x += 1
            x += 1
        _stacked(ax, xs, np.array(stack), categories)
        ax.set_xticks(xs, [str(i) for i in _step_labels(table, split, policies)], fontsize=_TICK)
        sec = ax.secondary_xaxis("bottom")
        sec.spines["bottom"].set_position(("outward", 14))
        sec.set_xticks(centres, ticks, fontsize=_TICK)
        sec.tick_params(length=0)
        ax.set_title(split, fontsize=_LABEL + 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=_TICK)
    axes[0].set_ylabel("share of the t-th steps", fontsize=_LABEL)
    _category_legend(fig, categories)
    return fig


def _step_labels(table, split: str, policies: Sequence[str]) -> list[int]:
    out = []
    for policy in policies:
        out += sorted(int(t) for s, p, t in table if s == split and p == policy)
    return out


def execution_by_step(counts: Mapping[str, np.ndarray], names: Sequence[str], *, what: str = "skill",
                      title: str = "") -> Figure:
    """Intended against executed (label level), one heatmap per split and step position.

    ``counts``: split -> [T, n, n] expected on-module executions (row = intended, column =
    executed); each row is shown normalized (an intended module never seen at that step is blank).
    """
    if not counts:
        raise ValueError("counts must map at least one split to a [T, n, n] array")
    splits = _ordered(set(counts), _SPLIT_ORDER)
    n = len(names)
    arrays = {}
    for s in splits:
        a = np.asarray(counts[s], dtype=float)
        if a.ndim != 3 or a.shape[1:] != (n, n) or np.any(a < 0):
            raise ValueError(f"counts[{s!r}] must be a non-negative [T, {n}, {n}] array, got shape {a.shape}")
        arrays[s] = a
    t_max = max(a.shape[0] for a in arrays.values())
    fig = Figure(figsize=(_WIDTH, 0.4 + 2.7 * len(splits)), layout="constrained")
    fig.suptitle(title or f"executed {what} given the intended one, by step (rows normalized)")
    grid = fig.subplots(len(splits), t_max, squeeze=False)
    image = None
    for i, s in enumerate(splits):
        a = arrays[s]
        for t in range(t_max):
            ax = grid[i, t]
            if t >= a.shape[0]:
                ax.set_axis_off()
                continue
            tot = a[t].sum(axis=1, keepdims=True)
            rows = np.where(tot > 0, a[t] / np.where(tot > 0, tot, 1), np.nan)
            image = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            ax.set_title(f"{s}, step {t + 1}", fontsize=_LABEL)
            step = 1 if n <= 12 else 3
            ax.set_xticks(range(0, n, step), names[::step], rotation=90, fontsize=_TICK - 1)
            ax.set_yticks(range(0, n, step), names[::step], fontsize=_TICK - 1)
            if t == 0:
                ax.set_ylabel(f"intended {what}", fontsize=_TICK)
            ax.set_xlabel(f"executed {what}", fontsize=_TICK)
    if image is not None:
        fig.colorbar(image, ax=grid, shrink=0.6, label="p(executed | intended)")
    return fig


def fidelity_scatter(rows: Sequence[Mapping], *, title: str = "") -> Figure:
    """A fit's per-skill fidelity against the policy's own teacher-forced accuracy: one panel
    per policy, one labelled point per skill. ``rows``: dicts ``{"policy", "skill",
    "teacher_forced", "exact"}`` (shares in [0, 1])."""
    rows = list(rows) if rows is not None else []
    need = ("policy", "skill", "teacher_forced", "exact")
    if not rows or not all(isinstance(r, Mapping) and set(need) <= set(r) for r in rows):
        raise ValueError(f"rows must be a non-empty list of dicts with keys {list(need)}")
    policies = list(dict.fromkeys(str(r["policy"]) for r in rows))
    fig = _figure(3.8, title or "the fit's exact executions against teacher-forced accuracy, per skill")
    axes = _panels(fig, len(policies), len(policies))
    for ax, policy in zip(axes, policies):
        mine = [r for r in rows if str(r["policy"]) == policy]
        x = np.array([r["teacher_forced"] for r in mine], dtype=float)
        y = np.array([r["exact"] for r in mine], dtype=float)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.scatter(x, y, s=12, color="tab:blue")
        for r, a, b in zip(mine, x, y):
            ax.annotate(str(r["skill"]), (a, b), fontsize=_TICK - 1, xytext=(2, 2), textcoords="offset points")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=policy)
        ax.set_xlabel("teacher-forced accuracy (policy)", fontsize=_LABEL)
        ax.tick_params(labelsize=_TICK)
    axes[0].set_ylabel("exact execution share (fit)", fontsize=_LABEL)
    return fig
