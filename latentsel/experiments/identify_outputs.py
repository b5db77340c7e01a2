"""The files of ``latentsel identify``: ``identify.json``, ``sbc.json``, figures and a report section.

``DIR/identify.json`` is ``{"records": [...], "config": {...}}`` (one record per regime, model,
N and seed; :mod:`latentsel.experiments.identify` defines the measures). Figures go to ``DIR/figures/``;
``DIR/section.json`` puts them and the summary tables in ``latentsel report``. ``latentsel identify``
also keeps every finished task of its sweep in ``DIR/.tasks/`` (:mod:`latentsel.experiments.sweeps`),
so that a rerun into ``DIR`` resumes.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from latentsel import plots
from latentsel._io import atomic_open
from latentsel.analysis.equivalence import distinguishability_graph, module_classes
from latentsel.analysis.posterior import posterior_from_data
from latentsel.analysis.verdicts import sbc_failed
from latentsel.experiments.identify import reached_rows, regime_traces
from latentsel.inference.conjugate import conjugate_posterior
from latentsel.inference.em import fit_em
from latentsel.plots.report import write_section
from latentsel.traces.emission import build_data
from latentsel.world import World

__all__ = ["write_identify", "summary_rows", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ("map_accuracy", "class_accuracy", "step_class_accuracy", "truth_mass", "param_error",
                   "kl_reached", "kl_unreached")


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summary_rows(records: Sequence[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> list[list]:
    """[regime, model, N, n_seeds, *means over seeds] for every (regime, model, N)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["regime"], r["model"], r["n_traces"])].append(r)
    return [[*key, len(rs), *(_mean(r[c] for r in rs) for c in columns)] for key, rs in groups.items()]


def _exemplar_figures(out: Path, regimes: Sequence[str], n: int, seed: int, world: World) -> list[dict]:
    """Figures that need the data themselves: the classes of every regime, the fitted execution
    matrices of the most varied regime, and one trace's selections and module graph."""
    figs = []
    datasets = {}
    for name in regimes:
        traces, truth = regime_traces(name, n, seed, world)
        data = build_data(traces, world)
        datasets[name] = (traces, truth, data)
        classes = module_classes(data)
        fig = plots.draw_distinguishability_graph(distinguishability_graph(data, world, classes),
                                             title=f"{name}: modules no observed step separates (N = {n})")
        figs.append(_save(out, fig, f"classes-{name}.png",
                          f"Distinguishability graph of the {name} regime ({n} traces, seed {seed}): "
                          f"{classes.n_classes} classes of {world.n_modules} modules, the largest of "
                          f"{int(classes.sizes.max())}. Only classes of two or more modules are drawn."))
    name = "rl" if "rl" in datasets else regimes[0]
    traces, truth, data = datasets[name]
    em = fit_em("modular", data, max_iter=300)
    q = conjugate_posterior("modular", em.params, data)
    mean, sd = q.mean(), q.sd()
    rr, rk = reached_rows("modular", data)
    for field, labels, reached, true in (("route_exec", world.route_names, rr, truth.route_exec),
                                         ("skill_exec", world.skill_names, rk, truth.skill_exec)):
        fig = plots.execution_heatmap(getattr(mean, field), getattr(sd, field), labels, labels,
                                      title=f"{field}: posterior mean and sd ({name}, N = {n})", truth=true,
                                      reached=reached)
        figs.append(_save(out, fig, f"{field}.png",
                          f"Posterior of {field} under the modular model ({name} regime, {n} traces): mean (left) "
                          "and sd (right) of q(θ) = Dirichlet(prior + expected counts); dots mark the true "
                          "largest entry of each row."))
    # one trace of the compressed regime when it ran (its hidden step shows), else of the fitted one
    shown = "compressed" if "compressed" in datasets else name
    traces, _, data = datasets[shown]
    params = em.params if shown == name else fit_em("modular", data, max_iter=300).params
    post = posterior_from_data(data, params, "modular", joint=False)
    tr, d = traces[0], traces[0].depth
    fig = plots.selection_heatmap(post.route_probs[0, :d], post.skill_probs[0, :d], post.p_off[0, :d],
                                  world.route_names, world.skill_names,
                                  step_labels=[f"step {t + 1}" + (" (hidden)" if y is None else "")
                                               for t, y in enumerate(tr.steps)],
                                  intended=list(tr.program), truth=list(zip(tr.truth.routes, tr.truth.skills)),
                                  title=f"trace {tr.id}: posterior of the executed selections")
    figs.append(_save(out, fig, "selections.png",
                      f"Per-step posterior of one {shown} trace ({tr.id}) at the fitted parameters: routing, "
                      "skill and off-module probability."))
    fig = plots.module_graph(world, tr.input, list(tr.steps), list(tr.truth.routes), list(tr.truth.skills),
                             intended=list(tr.program), title=f"trace {tr.id}: executed modules")
    figs.append(_save(out, fig, "module-graph.png",
                      f"Module graph of trace {tr.id}: each step reads the history entries of its routing "
                      "and applies its skill; highlighted steps executed a module other than the intended one."))
    return figs


def _save(out: Path, fig, name: str, caption: str) -> dict:
    plots.save_figure(fig, out / "figures" / name)
    return {"file": f"figures/{name}", "caption": caption}


def write_identify(out: str | Path, records: Sequence[dict], config: dict, world: World, *, sbc: dict | None = None,
                   exemplar_n: int | None = None) -> Path:
    """Write ``identify.json`` (and ``sbc.json``), the figures and the report section under ``out``."""
    out = Path(out)
    with atomic_open(out / "identify.json") as f:
        json.dump({"records": list(records), "config": config}, f, indent=1)
    figs = [
        _save(out, plots.identifiability_curves(records, title="recovery against N"), "recovery.png",
              "Recovery against the number of traces: MAP accuracy per label and per class, posterior mass on "
              "the executed module, and parameter error on the rows the data reach (mean over seeds, band = "
              "min to max). Colour = regime, line style = model."),
        _save(out, plots.contraction_curves(records, title="posterior contraction against N"), "contraction.png",
              "Contraction: mean KL from prior to posterior over the execution rows the data reach (left) and "
              "never reach (right). Unreached rows stay exactly at the prior at every N."),
    ]
    tables = [{"caption": "Recovery per regime, model and N (means over seeds)",
               "columns": ["regime", "model", "N", "seeds", *SUMMARY_COLUMNS], "rows": summary_rows(records)}]
    nuts = [r for r in records if r.get("nuts_max_abs_diff") is not None]
    if nuts:
        tables.append({"caption": "NUTS against the conjugate posterior (modular model, reached rows)",
                       "columns": ["regime", "N", "seed", "max |mean diff|", "median sd ratio (conjugate / NUTS)",
                                   "NUTS R-hat", "divergences"],
                       "rows": [[r["regime"], r["n_traces"], r["seed"], r["nuts_max_abs_diff"], r["nuts_sd_ratio"],
                                 r["nuts_r_hat"], r["nuts_divergences"]] for r in nuts]})
    if sbc is not None:
        with atomic_open(out / "sbc.json") as f:
            json.dump(sbc, f)
        figs.append(_save(out, plots.sbc_histograms(np.asarray(sbc["ranks"]), sbc["n_draws"], names=sbc["parameters"],
                                                    title="simulation-based calibration"), "sbc.png",
                          f"SBC rank histograms ({sbc['n_reps']} replications of {sbc['n_traces']} sft traces, "
                          f"{sbc['n_draws']} posterior draws each); the band is where 99% of bins of a calibrated "
                          "posterior fall."))
        tables.append({"caption": "SBC: chi-square test of uniform ranks (failed: p below 0.01 over the number of "
                                  "parameters)", "columns": ["parameter", "p-value", "failed"],
                       "rows": [[p, v, bad] for p, v, bad in zip(sbc["parameters"], sbc["chi2_p"],
                                                                  sbc_failed(sbc["chi2_p"]))]})
    regimes = list(dict.fromkeys(r["regime"] for r in records))
    n = exemplar_n or max(r["n_traces"] for r in records)
    figs += _exemplar_figures(out, regimes, n, int(records[0]["seed"]), world)
    text = ["Traces simulated from known modular parameters under each regime, fitted by EM with the modular and "
            "the entangled model; the posterior of the parameters is Dirichlet(prior + expected counts) at the EM "
            "estimate, checked against NUTS where N is small."]
    write_section(out, "Identifiability experiments", order=10, text=text, figures=figs, tables=tables)
    return out / "identify.json"
