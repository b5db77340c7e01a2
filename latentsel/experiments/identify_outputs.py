"""The files of ``latentsel identify``: ``identify.json``, ``summary.md``, ``sbc.json``, figures and
a report section.

``DIR/identify.json`` is ``{"records": [...], "config": {...}, "design": {...}, "verdicts": [...],
"posterior_checks": [...]}``: one record per regime, truth, model, N and seed
(:mod:`latentsel.experiments.identify` defines the measures), the design run, a verdict per
claim (:mod:`latentsel.analysis.claims`) and, per (regime, truth), whether the reported
posterior was checked against NUTS. ``DIR/summary.md`` gives the verdicts, the checks, SBC and
the recovery table in Markdown. Figures go to ``DIR/figures/``; ``DIR/section.json`` puts them
and the tables in ``latentsel report``. ``latentsel identify`` also keeps every finished task of
its sweep in ``DIR/.tasks/`` (:mod:`latentsel.experiments.sweeps`), so that a rerun into ``DIR``
resumes.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from latentsel import plots
from latentsel._io import atomic_open, discard
from latentsel.analysis.equivalence import distinguishability_graph, module_classes
from latentsel.analysis.posterior import posterior_from_data
from latentsel.analysis.sbc import ecdf_band
from latentsel.experiments.identify import reached_rows, regime_traces
from latentsel.inference.conjugate import conjugate_posterior
from latentsel.inference.em import fit_em
from latentsel.plots.report import write_section
from latentsel.plots.sbc import sbc_ecdf_differences
from latentsel.traces.emission import build_data
from latentsel.world import World

__all__ = ["write_identify", "summary_rows", "summary_markdown", "posterior_checks", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ("map_accuracy", "class_accuracy", "truth_mass", "class_param_error", "class_coverage",
                   "kl_reached", "heldout_diff")
# a conjugate posterior within these of NUTS (class totals of reached rows) counts as checked
CHECK_MAX_DIFF, CHECK_SD_RATIO = 0.05, (2 / 3, 1.5)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summary_rows(records: Sequence[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> list[list]:
    """[regime, truth, model, N, n_seeds, *means over seeds] for every (regime, truth, model, N)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["regime"], r.get("truth", "modular"), r["model"], r["n_traces"])].append(r)
    return [[*key, len(rs), *(_mean(r[c] for r in rs) for c in columns)] for key, rs in groups.items()]


def _exemplar_figures(out: Path, regimes: dict, n: int, seed: int, world: World) -> list[dict]:
    """Figures that need the data themselves: the classes of every regime, the fitted execution
    matrices of the most varied regime, and one trace's selections and module graph."""
    figs = []
    datasets = {}
    for name, regime in regimes.items():
        traces, truth = regime_traces(regime, n, seed, world)
        data = build_data(traces, world)
        datasets[name] = (traces, truth, data)
        classes = module_classes(data)
        fig = plots.draw_distinguishability_graph(distinguishability_graph(data, world, classes),
                                             title=f"{name}: modules no observed step separates (N = {n})")
        figs.append(_save(out, fig, f"classes-{name}.png",
                          f"Distinguishability graph of the {name} regime ({n} traces, seed {seed}): "
                          f"{classes.n_classes} classes of {world.n_modules} modules, the largest of "
                          f"{int(classes.sizes.max())}. Only classes of two or more modules are drawn."))
    name = "rl" if "rl" in datasets else next(iter(regimes))
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


def _why_unchecked(design, regime: str, truth: str) -> str:
    if design is None or regime not in design.regimes:
        return "NUTS did not run on it"
    if design.regimes[regime].hide:
        return "NUTS does not run through its hidden-step blocks (about 1.5 s a draw at N = 100)"
    if not design.nuts_max:
        return "the NUTS checks are off (nuts.max_traces = 0)"
    if (regime, truth) not in design.nuts_pairs():
        return "the design's [nuts] regimes and truths do not name it"
    return f"its smallest N is above nuts.max_traces = {design.nuts_max}"


def posterior_checks(records: Sequence[dict], design=None) -> list[dict]:
    """Per (regime, truth): ``{"regime", "truth", "status", "text"}``, status ``"checked"`` (NUTS
    converged on the class totals it compares, R-hat <= 1.01 and bulk ESS >= 400, no divergences,
    and the conjugate q within CHECK_MAX_DIFF of its means and CHECK_SD_RATIO of its sds),
    ``"approximate"`` (NUTS converged and q differs by more: the measured error is quoted) or
    ``"unchecked"`` (NUTS did not run there, or did not converge)."""
    out = []
    for key in dict.fromkeys((r["regime"], r.get("truth", "modular")) for r in records):
        nuts = [r for r in records if (r["regime"], r.get("truth", "modular")) == key
                and r.get("nuts_max_abs_diff") is not None]
        if not nuts:
            out.append({"regime": key[0], "truth": key[1], "status": "unchecked",
                        "text": f"approximate, not checked: {_why_unchecked(design, *key)}"})
            continue
        r = nuts[0]
        where = f"N = {r['n_traces']}, seed {r['seed']}, {r['nuts_quantities']} class totals"
        error = (f"max |mean difference| {r['nuts_max_abs_diff']:.3f}, sd ratio (conjugate / NUTS) "
                 f"{r['nuts_sd_ratio_min']:.2f} to {r['nuts_sd_ratio_max']:.2f} (median {r['nuts_sd_ratio']:.2f})")
        if not r["nuts_converged"]:
            out.append({"regime": key[0], "truth": key[1], "status": "unchecked",
                        "text": f"approximate, not checked: NUTS did not converge ({where}: R-hat "
                                f"{r['nuts_r_hat']:.3f}, bulk ESS {r['nuts_ess_bulk']:.0f}, "
                                f"{r['nuts_divergences']} divergences); against it: {error}"})
        elif r["nuts_max_abs_diff"] <= CHECK_MAX_DIFF and CHECK_SD_RATIO[0] <= r["nuts_sd_ratio_min"] \
                and r["nuts_sd_ratio_max"] <= CHECK_SD_RATIO[1]:
            out.append({"regime": key[0], "truth": key[1], "status": "checked",
                        "text": f"checked against NUTS ({where}; R-hat {r['nuts_r_hat']:.3f}, bulk ESS "
                                f"{r['nuts_ess_bulk']:.0f}): {error}"})
        else:
            out.append({"regime": key[0], "truth": key[1], "status": "approximate",
                        "text": f"approximate: against converged NUTS ({where}) {error}"})
    return out


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "\\|")


def _table(columns: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def summary_markdown(records: Sequence[dict], verdicts: Sequence[dict], checks: Sequence[dict], sbc: dict,
                     design=None) -> str:
    """``summary.md``: the verdicts, the posterior checks, SBC and the recovery table, as Markdown."""
    lines = ["# Identifiability experiments", ""]
    if design is not None:
        cells = design.cells()
        lines += [f"Design: `{design.source}`: {len(cells)} tasks (regime × truth × N × seed), models "
                  f"{', '.join(design.models)}.", ""]
    lines += ["## Verdicts", "", *_table(["claim", "verdict", "decided at N", "value", "interval (± 2 se)", "evidence"],
                                         [[v.get("label", v["claim"]), v["verdict"], v["n"], v["value"],
                                           None if v["interval"] is None else
                                           f"[{v['interval'][0]:.3g}, {v['interval'][1]:.3g}]", v["text"]]
                                          for v in verdicts]), ""]
    lines += ["## Is each reported posterior exact enough?", "",
              *_table(["regime", "truth", "status", "evidence"],
                      [[c["regime"], c["truth"], c["status"], c["text"]] for c in checks]), ""]
    if sbc:
        lines += ["## Simulation-based calibration", "",
                  *_table(["regime", "replications", "traces", "quantities", "failed (family-wise 0.01)"],
                          [[", ".join(r.get("regimes", [name])), r["n_reps"], r["n_traces"], len(r["parameters"]),
                            ", ".join(p for p, bad in zip(r["parameters"], r["failed"]) if bad) or "none"]
                           for name, r in sbc.items()]), ""]
    lines += ["## Recovery (means over seeds)", "",
              *_table(["regime", "truth", "model", "N", "seeds", *SUMMARY_COLUMNS], summary_rows(records)), ""]
    return "\n".join(lines)


def _labelled(records: Sequence[dict]) -> list[dict]:
    """Records with the truth in the regime's label (the curves' colour is the regime)."""
    return [{**r, "regime": f"{r['regime']} · {r.get('truth', 'modular')}"} for r in records]


def write_identify(out: str | Path, records: Sequence[dict], config: dict, world: World, *, design=None,
                   sbc: dict | None = None, verdicts: Sequence[dict] = (), exemplar_n: int | None = None) -> Path:
    """Write ``identify.json`` (and ``sbc.json``), the figures and the report section under ``out``."""
    out = Path(out)
    checks = posterior_checks(records, design)
    labelled = _labelled(records)
    figs = [
        _save(out, plots.identifiability_curves(labelled, metrics=("map_accuracy", "class_accuracy", "truth_mass",
                                                                   "class_param_error"),
                                                title="recovery against N"), "recovery.png",
              "Recovery against the number of traces: MAP accuracy per label and per class, posterior mass on "
              "the executed module, and the class-level parameter error on the rows the data reach (mean over "
              "seeds, band = min to max). Colour = regime · truth, line style = model."),
        _save(out, plots.contraction_curves(labelled, title="posterior contraction against N"), "contraction.png",
              "Contraction: mean KL from prior to posterior over the execution rows the data reach (left) and "
              "never reach (right)."),
    ]
    held = [r for r in labelled if r.get("heldout_diff") is not None and r["model"] == "entangled"]
    if held:
        figs.append(_save(out, plots.identifiability_curves(held, metrics=("heldout_diff",),
                                                            title="held-out log-likelihood: entangled minus modular"),
                          "separation.png",
                          "Claim C2: held-out log-likelihood per trace of the entangled fit minus the modular fit, on "
                          "fresh traces of the same regime and truth (mean over seeds, band = min to max). Above 0 "
                          "the data have taught the entangled model what the modular one cannot represent."))
    tables = []
    if verdicts:
        tables.append({"caption": "Verdicts on the identifiability claims (DESIGN §6)",
                       "columns": ["claim", "verdict", "N", "value", "interval", "evidence"],
                       "rows": [[v.get("label", v["claim"]), v["verdict"], v["n"], v["value"],
                                 None if v["interval"] is None else f"[{v['interval'][0]:.3g}, {v['interval'][1]:.3g}]",
                                 v["text"]] for v in verdicts]})
    tables.append({"caption": "Recovery per regime, truth, model and N (means over seeds)",
                   "columns": ["regime", "truth", "model", "N", "seeds", *SUMMARY_COLUMNS],
                   "rows": summary_rows(records)})
    tables.append({"caption": "Is each regime's reported posterior exact enough? (conjugate q against NUTS on the "
                              "class totals of reached rows)", "columns": ["regime", "truth", "status", "evidence"],
                   "rows": [[c["regime"], c["truth"], c["status"], c["text"]] for c in checks]})
    if not sbc:
        discard(out / "sbc.json")  # an earlier run's calibration is not this run's
    if sbc:
        with atomic_open(out / "sbc.json") as f:
            json.dump(sbc, f)
        rows = []
        for name, res in sbc.items():
            ranks = np.asarray(res["ranks"])
            band = ecdf_band(res["n_reps"], res["n_draws"])
            figs.append(_save(out, sbc_ecdf_differences(ranks, res["n_draws"], names=res["parameters"], band=band,
                                                        failed=res["failed"], title=f"SBC: {name}"),
                              f"sbc-{name}.png",
                              f"SBC of the {', '.join(res.get('regimes', [name]))} regime(s) ({res['n_reps']} replications of {res['n_traces']} traces "
                              f"from prior draws, {res['n_draws']} posterior draws each): the ECDF of each "
                              "quantity's ranks minus the uniform CDF, in the 95% simultaneous band of uniform "
                              "ranks; red panels failed the test at family-wise level 0.01."))
            failed = [p for p, bad in zip(res["parameters"], res["failed"]) if bad]
            rows.append([", ".join(res.get("regimes", [name])), res["n_reps"], len(res["parameters"]), len(failed),
                         ", ".join(failed) or "none",
                         min(res["ecdf_p"])])
        tables.append({"caption": "SBC per regime: quantities whose ranks fail the ECDF test (Bonferroni over the "
                                  "regime's quantities, family-wise 0.01)",
                       "columns": ["regime", "replications", "quantities", "failed", "which", "smallest p"],
                       "rows": rows})
    with atomic_open(out / "identify.json") as f:
        json.dump({"records": list(records), "config": config, "design": None if design is None else design.to_json(),
                   "verdicts": list(verdicts), "posterior_checks": checks}, f, indent=1)
    with atomic_open(out / "summary.md") as f:
        f.write(summary_markdown(records, verdicts, checks, sbc or {}, design))
    regimes = {r["regime"]: None for r in records}
    if design is not None:
        shown = [n for n in ("sft", "rl", "compressed") if n in regimes] or list(regimes)[:3]
        n = exemplar_n or min(max(r["n_traces"] for r in records), 300)
        figs += _exemplar_figures(out, {k: design.regimes[k] for k in shown}, n, int(records[0]["seed"]), world)
    text = ["Traces simulated from known truths (modular, or entangled: execution depending on the previous intended "
            "skill) under regimes that vary one factor at a time, fitted by EM with the modular and the entangled "
            "model; the posterior of the parameters is Dirichlet(prior + expected counts) at the EM estimate, "
            "reported per aliasing class and checked against NUTS where the design affords it."]
    write_section(out, "Identifiability experiments", order=10, text=text, figures=figs, tables=tables,
                  files=["identify.json", "summary.md", *(["sbc.json"] if sbc else [])])
    return out / "identify.json"
