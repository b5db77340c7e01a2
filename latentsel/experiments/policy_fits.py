"""Fitting the traces of trained policies: model comparison and error attribution (DESIGN §1, §6).

For every corpus ``{policy}.{split}.jsonl[.gz]`` (as ``latentsel protocol`` writes them; split
``eval-seen``, ``eval-unseen`` or ``eval-ood``): fit the modular and the entangled model by EM,
compare them by PSIS-LOO on the per-trace marginal log-likelihood under draws of the conjugate
posterior (:mod:`latentsel.analysis.diagnostics`), and attribute the errors of every observed step under
the modular fit:

* ``route_error`` = p(r_t ≠ c_t^r | D), ``skill_error`` = p(k_t ≠ c_t^k | D),
* ``off_module`` = p(u_t = 1 | D),

each an expected count per observed step (they can overlap: an off-module step's executed
module is drawn from its row all the same). Unobserved steps (a completion that stopped early or
could not be parsed) carry no evidence and are left out.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from latentsel import plots
from latentsel._io import atomic_open
from latentsel.analysis import diagnostics
from latentsel.analysis.fitting import fit_traces
from latentsel.inference.collapsed import params_from_sites
from latentsel.inference.mcmc import fit_nuts
from latentsel.models.registry import MODELS
from latentsel.plots.report import write_section
from latentsel.traces import Trace, read_traces
from latentsel.traces.emission import build_data
from latentsel.world import World

__all__ = ["find_corpora", "attribution", "fit_policy_corpora", "nuts_diagnostics", "FITTED_MODELS"]

# the models compared on every corpus: those that read the program (a chain does not)
FITTED_MODELS = tuple(name for name, spec in MODELS.items() if spec.uses_program)

_CORPUS = re.compile(r"^(?P<policy>.+)\.eval-(?P<split>seen|unseen|ood)\.jsonl(\.gz)?$")
SPLITS = ("seen", "unseen", "ood")


def find_corpora(folder: str | Path, policies: Sequence[str] | None = None) -> dict[tuple[str, str], Path]:
    """``{(policy, split): path}`` of the evaluation corpora in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of policy corpora")
    found = {}
    for path in sorted(folder.iterdir()):
        m = _CORPUS.match(path.name)
        if m and (policies is None or m["policy"] in policies):
            found[(m["policy"], m["split"])] = path
    if not found:
        raise ValueError(f"{folder}: no corpora named POLICY.eval-(seen|unseen|ood).jsonl[.gz]"
                         + (f" for policies {', '.join(policies)}" if policies else ""))
    missing = sorted(set(policies or ()) - {p for p, _ in found})
    if missing:
        raise ValueError(f"{folder}: no corpora of policy {missing[0]!r}")
    return found


def attribution(traces: Sequence[Trace], data, post) -> dict[str, np.ndarray]:
    """Expected errors of every trace, summed over its observed steps: ``{"route_error",
    "skill_error", "off_module", "steps"}``, each ``[N]``."""
    observed = np.zeros(data.step_mask.shape, bool)
    for i, tr in enumerate(traces):
        observed[i, : tr.depth] = [y is not None for y in tr.steps]
    n, t = np.indices(observed.shape)
    route = 1.0 - np.asarray(post.route_probs)[n, t, data.route_intended]
    skill = 1.0 - np.asarray(post.skill_probs)[n, t, data.skill_intended]
    off = np.asarray(post.p_off)
    return {"route_error": (route * observed).sum(1), "skill_error": (skill * observed).sum(1),
            "off_module": (off * observed).sum(1), "steps": observed.sum(1)}


def _fit_corpus(traces, world, out: Path, draws: int, seed: int) -> tuple[dict, dict, object]:
    fits, idatas = {}, {}
    ids = [tr.id for tr in traces]
    data = build_data(traces, world)  # the same statistics serve both models
    for model in FITTED_MODELS:
        fit = fit_traces(traces, world, model, "em", progress=False, data=data)
        fit.save(out / model)
        idatas[model] = diagnostics.from_conjugate(model, data, fit.params, world, trace_ids=ids, chains=2,
                                                   draws=draws, seed=seed)
        fits[model] = (fit, data)
    return fits, idatas, diagnostics.compare(idatas)


def fit_policy_corpora(corpora: dict[tuple[str, str], Path], out: str | Path, world: World, *, draws: int = 50,
                       max_traces: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Fit every corpus; write ``out/POLICY.SPLIT/{modular,entangled}/fit.json``, ``loo.json``,
    ``attribution.jsonl``, the modular ``idata.nc``, figures and a report section. ``draws``:
    conjugate draws per chain (2 chains) for PSIS-LOO. Returns ``{"loo": rows, "attribution": rows}``."""
    out = Path(out)
    loo_rows, attr_rows, figures = [], [], []
    for (policy, split), path in tqdm(sorted(corpora.items()), desc="policy corpora", unit="corpus",
                                      disable=not progress):
        traces = read_traces(path, world=world)
        if max_traces is not None:
            traces = traces[:max_traces]
        where = out / f"{policy}.{split}"
        fits, idatas, cmp = _fit_corpus(traces, world, where, draws, seed)
        records = diagnostics.compare_records(cmp)
        with atomic_open(where / "loo.json") as f:
            json.dump({"corpus": str(path), "compare": records}, f, indent=1)
        diagnostics.save(idatas["modular"], where / "idata.nc")
        by = {r["model"]: r for r in records}
        loo_rows.append([policy, split, len(traces), by["modular"]["elpd_loo"], by["entangled"]["elpd_loo"],
                         records[0]["model"], records[1]["elpd_diff"], records[1]["dse"],
                         by["modular"]["n_bad_k"] + by["entangled"]["n_bad_k"]])
        fit, data = fits["modular"]
        att = attribution(traces, data, fit.posterior)
        with atomic_open(where / "attribution.jsonl") as f:
            for i, tr in enumerate(traces):
                f.write(json.dumps({"id": tr.id, **{k: float(v[i]) for k, v in att.items()}}) + "\n")
        n_steps = max(int(att["steps"].sum()), 1)
        row = {"policy": policy, "split": split, "traces": len(traces), "steps": int(att["steps"].sum()),
               **{k: float(att[k].sum() / n_steps) for k in ("route_error", "skill_error", "off_module")},
               "noise": fit.params.noise, "off_module_rate": fit.params.off_module}
        attr_rows.append(row)
    attr_rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["policy"]))
    with atomic_open(out / "attribution.json") as f:
        json.dump({"rows": attr_rows}, f, indent=1)
    plots.save_figure(plots.attribution_bars(attr_rows, title="error attribution per observed step (modular fit)"),
                      out / "figures" / "attribution.png")
    figures.append({"file": "figures/attribution.png",
                    "caption": "Expected routing errors, skill errors and off-module steps per observed step, under "
                               "the modular model fitted by EM to each policy's evaluation traces."})
    tables = [
        {"caption": "Error attribution per observed step (modular fit)",
         "columns": ["policy", "split", "traces", "observed steps", "routing error", "skill error", "off-module",
                     "noise", "off_module"],
         "rows": [[r["policy"], r["split"], r["traces"], r["steps"], r["route_error"], r["skill_error"],
                   r["off_module"], r["noise"], r["off_module_rate"]] for r in attr_rows]},
        {"caption": "Modular against entangled by PSIS-LOO (per-trace marginal likelihood, conjugate draws); "
                    "elpd_diff and dse are the second model's distance from the first",
         "columns": ["policy", "split", "traces", "elpd_loo modular", "elpd_loo entangled", "preferred",
                     "elpd_diff", "dse", "traces with k > 0.7"],
         "rows": loo_rows},
    ]
    text = ["Evaluation traces of the trained policies, fitted with the modular and the entangled model. "
            "PSIS-LOO compares how well each model predicts a held-out trace; a large number of traces with "
            "Pareto k > 0.7 means the comparison for that corpus is unreliable."]
    write_section(out, "Policy traces: model comparison and error attribution", order=30, text=text,
                  figures=figures, tables=tables)
    return {"loo": loo_rows, "attribution": attr_rows}


def nuts_diagnostics(traces: Sequence[Trace], world: World, out: str | Path, *, label: str, n_traces: int = 300,
                     warmup: int = 150, samples: int = 150, replicates: int = 20, seed: int = 0,
                     progress: bool = True) -> dict:
    """NUTS on the first ``n_traces`` traces under the modular model (2 chains), with the full
    ArviZ diagnostics: ``out/idata.nc`` (posterior, sample_stats, marginal log_likelihood,
    posterior_predictive, observed_data), R-hat/ESS summary, trace, rank, PPC and Pareto-k plots."""
    out = Path(out)
    traces = list(traces)[:n_traces]
    data = build_data(traces, world)
    res = fit_nuts("modular", data, num_warmup=warmup, num_samples=samples, num_chains=2, seed=seed,
                   progress_bar=progress)
    draws = params_from_sites("modular", res.samples)
    ppc = diagnostics.posterior_predictive(traces, world, "modular", draws, n_replicates=replicates, seed=seed,
                                           progress_bar=progress, data=data)
    idata = diagnostics.from_nuts("modular", data, res, world, trace_ids=[tr.id for tr in traces],
                                  posterior_predictive=ppc, progress_bar=progress)
    diagnostics.save(idata, out / "idata.nc")
    var_names, coords = diagnostics.default_selection(idata)
    table = diagnostics.summary(idata, var_names, coords=coords)
    worst = diagnostics.summary(idata)
    figs = []
    for name, fn, caption in (
            ("trace.png", lambda p: diagnostics.plot_trace(idata, path=p),
             "Trace plots of noise, off_module and the best-informed diagonal execution entries (2 chains)."),
            ("rank.png", lambda p: diagnostics.plot_rank(idata, path=p),
             "Rank plots of the same entries: well-mixed chains give flat histograms."),
            ("ppc.png", lambda p: diagnostics.plot_ppc(idata, path=p),
             "Posterior predictive check: step correctness by depth and the frequencies of error types in "
             "corpora replicated at posterior draws, against the observed corpus."),
            ("khat.png", lambda p: diagnostics.plot_khat(idata, path=p),
             "Pareto k of PSIS-LOO per trace (k > 0.7: that trace's leave-one-out estimate is unreliable).")):
        fn(out / "figures" / name)
        figs.append({"file": f"figures/{name}", "caption": caption})
    rows = [[str(idx)] + [float(v) for v in table.loc[idx, ["mean", "sd", "ess_bulk", "ess_tail", "r_hat"]]]
            for idx in table.index]
    result = {"max_r_hat": float(worst["r_hat"].max()), "min_ess_bulk": float(worst["ess_bulk"].min()),
              "divergences": int(res.diverging.sum()), "n_traces": len(traces), "draws": 2 * samples}
    text = [f"NUTS over the global parameters of the modular model, the selections summed out, on the first "
            f"{len(traces)} traces of {label}: 2 chains of {warmup} warm-up and {samples} kept draws. Over all "
            f"{len(worst)} parameter entries the worst R-hat is {result['max_r_hat']:.3f} and the smallest bulk ESS "
            f"{result['min_ess_bulk']:.0f}; {result['divergences']} divergent transitions."]
    write_section(out, f"Posterior diagnostics (NUTS, {label})", order=40, text=text, figures=figs,
                  tables=[{"caption": "Summary of the plotted entries", "columns": ["entry", "mean", "sd",
                                                                                  "ess_bulk", "ess_tail", "r_hat"],
                           "rows": rows}])
    with atomic_open(out / "nuts.json") as f:
        json.dump(result, f, indent=1)
    return result
