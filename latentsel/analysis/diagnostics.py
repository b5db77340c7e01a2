"""Posterior diagnostics through ArviZ: the one module of the project that imports it.

An :class:`arviz.InferenceData` of an HLSM fit holds these groups, every array with a leading
``(chain, draw)`` pair where it has draws:

* ``posterior``: the model's parameter fields (``route_exec``, ``skill_exec``, ``noise``,
  ``off_module`` for modular; ``*_exec_ctx`` for entangled; ``*_trans`` for grammar), with
  dimensions such as ``intended_route`` / ``executed_route`` / ``context_route`` named by the
  world's routings and skills; a context or previous-module index of ``R`` / ``K`` is "start".
* ``sample_stats``: the sampler's statistics under ArviZ's names (``diverging``,
  ``acceptance_rate``, ``n_steps``, ``tree_depth``, ``lp``, ``step_size``), NUTS only.
* ``log_likelihood``: variable ``trace`` over ``trace_id``, log p(D_n | θ_s) for every draw.
  We compute it with the exact evidence (:func:`latentsel.analysis.posterior.log_evidence_from_data`), selections summed out,
  because a per-trace marginal likelihood is what PSIS-LOO leaves out: NumPyro's
  ``log_likelihood`` of an enumerated model gives per-site values at one assignment of the
  discrete selections, which is not log p(D_n | θ). (The variable cannot share the name of its
  dimension: xarray would drop the group, hence ``trace_id``.)
* ``posterior_predictive`` / ``observed_data``: statistics of replicated and observed corpora
  (:func:`trace_statistics`), the replicates one per posterior draw in a single chain.

Statistics of a corpus need no latent variables: whether each free observed step is the
intended module's output, is reproduced by some other module, or by none. For the grammar
model the traces state no program, so the statistics say only whether some module explains
a step (``step_explained``; ``error_type`` over explained / unexplained).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib import MatplotlibDeprecationWarning
from tqdm.auto import tqdm

from latentsel._io import atomic_open, atomic_path
from latentsel.analysis.posterior import log_evidence_from_data, posterior_from_data
from latentsel.inference.collapsed import params_from_sites
from latentsel.inference.conjugate import conjugate_posterior
from latentsel.models.data import HLSMData
from latentsel.models.registry import MODELS, default_params
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from latentsel.traces.simulate import simulate
from latentsel.world import World

__all__ = ["trace_statistics", "posterior_predictive", "to_inference_data", "from_nuts", "from_conjugate",
           "summary", "loo", "compare", "compare_records", "save", "load", "default_selection", "plot_trace",
           "plot_rank", "plot_ppc", "plot_loo", "plot_khat", "khat_threshold", "ERROR_TYPES", "EXPLAINED_TYPES",
           "BAD_KHAT"]

ERROR_TYPES = ("correct", "other_module", "unexplained")
EXPLAINED_TYPES = ("explained", "unexplained")
BAD_KHAT = 0.7
_STAT_DIMS = {"step_correct": ["depth"], "step_explained": ["depth"], "error_type": ["step_type"]}
_PARETO_WARNING = "Estimated shape parameter of Pareto distribution"


@contextlib.contextmanager
def _quiet_arviz():
    # ArviZ 0.23 calls matplotlib 3.11 (normalize_kwargs with a dict) and pandas 3.1
    # (sort_values(inplace=True)) in forms they deprecate; the results are right and the
    # warnings are ArviZ's to fix, not the caller's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning)
        warnings.filterwarnings("ignore", message="The inplace keyword", category=DeprecationWarning)
        yield


def _check_model(model: str) -> type:
    if model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; choose from {', '.join(MODELS)}")
    return MODELS[model].params


def trace_statistics(data: HLSMData, mask: np.ndarray | None = None, *, intended: bool = True) -> dict[str, np.ndarray]:
    """Statistics of a corpus over its free observed steps (``data.emit``: observed, outside
    hidden-step blocks), restricted further by ``mask: bool[N, T]`` when given.

    Returns ``step_explained: [T]``, the fraction of the steps at depth t that some module
    (r, k) reproduces exactly, and, when ``intended`` (the traces state their programs):
    ``step_correct: [T]``, the fraction equal to the intended module's output, and
    ``error_type: [3]``, the fractions :data:`ERROR_TYPES`. Without ``intended``,
    ``error_type: [2]`` holds the fractions :data:`EXPLAINED_TYPES`. A depth (or corpus) with
    no such step gets NaN.
    """
    steps = np.asarray(data.emit, bool)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != steps.shape or mask.dtype != bool:
            raise ValueError(f"mask must be bool{list(steps.shape)}, got {mask.dtype}{list(mask.shape)}")
        steps = steps & mask
    exact_match = np.asarray(data.match) == np.asarray(data.length)[..., None, None]
    explained = exact_match.any(axis=(-2, -1)) & steps
    count = steps.sum(0)

    def fraction(hits, total):
        return np.divide(hits, total, out=np.full(np.shape(hits), np.nan), where=total > 0)

    out = {"step_explained": fraction(explained.sum(0), count)}
    n = count.sum()
    if not intended:
        out["error_type"] = fraction(np.array([explained.sum(), n - explained.sum()]), n)
        return out
    n_idx, t_idx = np.indices(steps.shape)
    correct = exact_match[n_idx, t_idx, data.route_intended, data.skill_intended] & steps
    out["step_correct"] = fraction(correct.sum(0), count)
    out["error_type"] = fraction(np.array([correct.sum(), (explained & ~correct).sum(), n - explained.sum()]), n)
    return out


def _check_draws(model: str, draws, n_routes: int, n_skills: int) -> tuple[int, int]:
    """The ``(chains, draws)`` of a params NamedTuple of draws; ValueError on a wrong type or shape."""
    cls = _check_model(model)
    if not isinstance(draws, cls):
        raise ValueError(f"draws: model={model!r} takes {cls.__name__} draws, got {type(draws).__name__}")
    lead = np.shape(draws.noise)
    if len(lead) != 2:
        raise ValueError(f"draws must have leading [chains, draws] dimensions; draws.noise has shape {list(lead)}")
    for name, value, ref in zip(cls._fields, draws, default_params(model, n_routes, n_skills)):
        want = lead + np.shape(ref)
        if np.shape(value) != want:
            raise ValueError(f"draws.{name} must have shape {list(want)}, got {list(np.shape(value))}")
    return lead


def _flat_draws(draws) -> list:
    """Every field reshaped to ``[chains * draws, ...]``; draw s is ``cls(*(f[s] for f in ...))``."""
    return [np.asarray(f, np.float64).reshape(-1, *np.shape(f)[2:]) for f in draws]


def posterior_predictive(traces: Sequence[Trace], world: World, model: str, draws, *, n_replicates: int = 20,
                         seed: int = 0, chunk: int | None = None, progress_bar: bool = False,
                         data: HLSMData | None = None) -> dict[str, np.ndarray]:
    """:func:`trace_statistics` of corpora replicated at ``n_replicates`` draws, ``[1, n_replicates, ...]``.

    Draw θ_s is taken evenly from ``draws`` (a params NamedTuple, fields ``[chains, draws, ...]``);
    replicate s is ``simulate(traces, θ_s, model, world, seed=seed + s)``, the same prompts,
    fully observed, and its statistics count only the steps the original corpus counts
    (observed, outside hidden-step blocks), so replicated and observed statistics compare like
    with like. For the grammar model the statistics are the program-free ones
    (``intended=False``), so it needs no program. ``data``: the corpus's ``build_data``, when the
    caller has it already.
    """
    if n_replicates < 1:
        raise ValueError(f"n_replicates must be at least 1, got {n_replicates}")
    chains, n_draws = _check_draws(model, draws, world.n_routes, world.n_skills)
    kw = {} if chunk is None else {"chunk": chunk}
    mask = np.asarray((build_data(traces, world, model=model, **kw) if data is None else data).emit)
    flat, cls = _flat_draws(draws), type(draws)
    picks = np.linspace(0, chains * n_draws - 1, n_replicates).round().astype(int)
    stats: dict[str, list] = {}
    for s, i in enumerate(tqdm(picks, desc="posterior predictive", disable=not progress_bar)):
        replicate = simulate(traces, cls(*(f[i] for f in flat)), model, world, seed=seed + s)
        data = build_data(replicate, world, model=model, **kw)
        for name, value in trace_statistics(data, mask, intended=MODELS[model].uses_program).items():
            stats.setdefault(name, []).append(value)
    return {name: np.stack(v)[None] for name, v in stats.items()}


def _log_likelihood(model: str, data: HLSMData, draws, progress_bar: bool) -> np.ndarray:
    """log p(D_n | θ_s), exact: ``[chains, draws, N]``."""
    chains, n_draws = np.shape(draws.noise)
    flat, cls = _flat_draws(draws), type(draws)
    out = np.empty((chains * n_draws, data.n_traces))
    for s in tqdm(range(out.shape[0]), desc="log-likelihood", disable=not progress_bar):
        out[s] = log_evidence_from_data(data, cls(*(f[s] for f in flat)), model)
    return out.reshape(chains, n_draws, -1)


def _stat_coords(stats: dict, n_depths: int) -> dict:
    labels = ERROR_TYPES if np.shape(stats["error_type"])[-1] == len(ERROR_TYPES) else EXPLAINED_TYPES
    return {"depth": np.arange(1, n_depths + 1), "step_type": list(labels)}


def to_inference_data(model: str, data: HLSMData, draws, world: World, *, trace_ids: Sequence[str],
                      sample_stats: dict | None = None, posterior_predictive: dict | None = None,
                      observed_data: dict | None = None, log_likelihood: bool = True,
                      progress_bar: bool = False) -> az.InferenceData:
    """InferenceData of posterior ``draws`` (a params NamedTuple, fields ``[chains, draws, ...]``).

    ``sample_stats``: {name: [chains, draws]}; ``posterior_predictive``: the output of
    :func:`posterior_predictive`; ``observed_data``: statistics of the corpus (default
    ``trace_statistics(data)``); ``log_likelihood``: add the exact per-trace log-likelihood of
    every draw (``[chains, draws, N]``, the input of :func:`loo`).
    """
    cls = _check_model(model)
    if (world.n_routes, world.n_skills) != (data.n_routes, data.n_skills):
        raise ValueError(f"world has {world.n_routes} routings and {world.n_skills} skills, the data "
                         f"{data.n_routes} and {data.n_skills}")
    lead = _check_draws(model, draws, data.n_routes, data.n_skills)
    trace_ids = [str(t) for t in trace_ids]
    if len(trace_ids) != data.n_traces or len(set(trace_ids)) != len(trace_ids):
        raise ValueError(f"trace_ids must be {data.n_traces} distinct ids, got {len(trace_ids)} "
                         f"({len(set(trace_ids))} distinct)")
    for name, value in (sample_stats or {}).items():
        if np.shape(value) != lead:
            raise ValueError(f"sample_stats[{name!r}] must have shape {list(lead)}, got {list(np.shape(value))}")
    if observed_data is None:
        observed_data = trace_statistics(data, intended=MODELS[model].uses_program)
    for name, value in (posterior_predictive or {}).items():
        want = (1, None, *np.shape(observed_data.get(name, ())))
        if name not in observed_data or np.ndim(value) != len(want) or np.shape(value)[2:] != want[2:]:
            raise ValueError(f"posterior_predictive[{name!r}] has shape {list(np.shape(value))}, which does not "
                             f"match the observed statistics ({[1, 'replicates', *want[2:]]})")
    routes, skills = list(world.route_names), list(world.skill_names)
    coords = {"executed_route": routes, "intended_route": routes, "context_route": routes + ["start"],
              "previous_route": routes + ["start"], "executed_skill": skills, "intended_skill": skills,
              "context_skill": skills + ["start"], "previous_skill": skills + ["start"], "trace_id": trace_ids,
              **_stat_coords(observed_data, data.match.shape[1])}
    dims = {"trace": ["trace_id"], **_STAT_DIMS, **{name: [f"{d}_{kind}" for d in MODELS[model].row_dims]
                                                       for name, kind in zip(cls._fields, ("route", "skill"))}}
    groups = {"posterior": {name: np.asarray(v) for name, v in zip(cls._fields, draws)},
              "observed_data": observed_data}
    if sample_stats:
        groups["sample_stats"] = {name: np.asarray(v) for name, v in sample_stats.items()}
    if posterior_predictive is not None:
        groups["posterior_predictive"] = posterior_predictive
    if log_likelihood:
        groups["log_likelihood"] = {"trace": _log_likelihood(model, data, draws, progress_bar)}
    return az.from_dict(**groups, coords=coords, dims=dims, posterior_attrs={"model": model})


def from_nuts(model: str, data: HLSMData, mcmc_result, world: World, *, trace_ids: Sequence[str],
              **kw) -> az.InferenceData:
    """InferenceData of a :class:`~latentsel.inference.mcmc.MCMCResult`, with its sampler
    statistics under ArviZ's names (``lp`` = -potential energy, as ArviZ's NumPyro converter)."""
    r = mcmc_result
    stats = {"diverging": r.diverging, "acceptance_rate": r.accept_prob, "n_steps": r.num_steps,
             "tree_depth": np.log2(np.maximum(r.num_steps, 1)).astype(int) + 1, "lp": -r.potential_energy,
             "step_size": np.broadcast_to(r.step_size[:, None], r.diverging.shape)}
    draws = params_from_sites(model, r.samples)
    return to_inference_data(model, data, draws, world, trace_ids=trace_ids, sample_stats=stats, **kw)


def from_conjugate(model: str, data: HLSMData, params, world: World, *, trace_ids: Sequence[str], chains: int = 2,
                   draws: int = 200, seed: int = 0, **kw) -> az.InferenceData:
    """InferenceData of ``chains x draws`` independent draws of the conjugate posterior at
    ``params`` (:func:`~latentsel.inference.conjugate.conjugate_posterior`)."""
    _check_model(model)
    if chains < 1 or draws < 1:
        raise ValueError(f"chains and draws must be at least 1, got chains={chains}, draws={draws}")
    theta = conjugate_posterior(model, params, data).sample((chains, draws), seed)
    return to_inference_data(model, data, theta, world, trace_ids=trace_ids, **kw)


def summary(idata: az.InferenceData, var_names: Sequence[str] | None = None, *, coords: dict | None = None
            ) -> pd.DataFrame:
    """``az.summary``: mean, sd, HDI, MCSE, ess_bulk, ess_tail and r_hat of every posterior
    entry of ``var_names`` (default all), one row per entry."""
    # a constant draw sequence (a stuck chain) has no within-chain variance: ArviZ reports its
    # r_hat as inf or NaN, which is the diagnosis, and numpy's division warning adds nothing
    with np.errstate(divide="ignore", invalid="ignore"):
        return az.summary(idata, var_names=None if var_names is None else list(var_names), coords=coords)


def loo(idata: az.InferenceData) -> az.ELPDData:
    """PSIS-LOO over the traces (pointwise). ArviZ's warning about large Pareto k is not
    raised; the entry ``n_bad_k`` counts the traces with k > :data:`BAD_KHAT` instead."""
    if "log_likelihood" not in idata.groups():
        raise ValueError("idata has no log_likelihood group: build it with log_likelihood=True")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PARETO_WARNING, category=UserWarning)
        elpd = az.loo(idata, pointwise=True, var_name="trace")
    elpd["n_bad_k"] = int((np.asarray(elpd["pareto_k"]) > BAD_KHAT).sum())
    return elpd


def compare(idatas: dict[str, az.InferenceData]) -> pd.DataFrame:
    """``az.compare`` by PSIS-LOO (stacking weights), one row per model, best first, with a
    column ``n_bad_k``: the traces whose Pareto k exceeds :data:`BAD_KHAT`. The fits must be
    of the same corpus."""
    if len(idatas) < 2:
        raise ValueError(f"idatas: compare needs at least two fits, got {len(idatas)}")
    loos = {name: loo(idata) for name, idata in idatas.items()}
    with _quiet_arviz():
        df = az.compare(loos)
    df["n_bad_k"] = [loos[name]["n_bad_k"] for name in df.index]
    return df


def _json_number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def compare_records(df: pd.DataFrame) -> list[dict]:
    """The rows of :func:`compare` as JSON-ready dicts (non-finite numbers as ``None``)."""
    columns = ("elpd_loo", "se", "p_loo", "elpd_diff", "dse", "weight", "n_bad_k")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"df is not a compare() table: it lacks {', '.join(missing)}")
    return [{"model": str(name), **{c: _json_number(row[c]) for c in columns[:-1]}, "n_bad_k": int(row["n_bad_k"])}
            for name, row in df.iterrows()]


def save(idata: az.InferenceData, path: str | os.PathLike) -> Path:
    """Write ``idata`` as NetCDF (h5netcdf), atomically: a temporary file in the same folder,
    renamed into place."""
    with atomic_path(path) as tmp:
        idata.to_netcdf(tmp, engine="h5netcdf")
    return Path(path)


def load(path: str | os.PathLike) -> az.InferenceData:
    """Read an InferenceData written by :func:`save`, fully into memory (no file left open)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such InferenceData file")
    try:
        with az.rc_context({"data.load": "eager"}):
            return az.from_netcdf(path, engine="h5netcdf")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not an InferenceData NetCDF file ({e})") from None


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def _finish(fig, path):
    """Save ``fig`` as a PNG atomically and close it when ``path`` is given; return it."""
    if path is not None:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
    return fig


def default_selection(idata: az.InferenceData, n_entries: int = 3) -> tuple[list[str], dict]:
    """``(var_names, coords)`` for trace and rank plots: noise, off_module and, of each
    routing and skill array, the ``n_entries`` entries the data inform most among the diagonal
    (executed = intended) entries, or for grammar each row's most probable transition.
    ``coords`` select entries pointwise (xarray vectorized indexing).

    "Inform most": the largest implied concentration m (1 - m) / var - 1 of the entry's
    posterior mean m and variance var, the a + b of a Beta with those moments. Every row has
    the same prior, so it ranks rows by the data they received; the sd alone would favour
    entries near 0 or 1, data or not."""
    post = idata.posterior
    model = next((m for m, spec in MODELS.items() if spec.sites[0] in post), None)
    if model is None:
        raise ValueError("idata: its posterior holds no HLSM parameters")
    names, coords = list(MODELS[model].sites), {}
    for name in names[:2]:
        da = post[name]
        row_dim, col_dim = da.dims[-2:]
        mean, var = da.mean(("chain", "draw")).values, da.var(("chain", "draw")).values
        col = (np.argmax(mean, axis=-1) if MODELS[model].chain
               else np.broadcast_to(np.arange(mean.shape[-1]), mean.shape[:-1]))
        m, v = (np.take_along_axis(a, col[..., None], -1)[..., 0] for a in (mean, var))
        conc = np.divide(m * (1 - m), v, out=np.full(m.shape, np.inf), where=v > 0)
        best = np.unravel_index(np.argsort(-conc, axis=None, kind="stable")[:n_entries], conc.shape)
        index = {dim: da[dim].values[i] for dim, i in zip(da.dims[2:-1], best)}
        index[col_dim] = da[col_dim].values[col[best]]
        labels = [("" if len(best) == 1 else f"{index[da.dims[2]][j]}: ")
                  + f"{index[row_dim][j]}→{index[col_dim][j]}" for j in range(len(best[0]))]
        entry = f"{name}_entry"
        for dim, values in index.items():
            coords[dim] = xr.DataArray(values, dims=entry, coords={entry: labels})
    return names[2:] + names[:2], coords


def _selection(idata, var_names):
    return default_selection(idata) if var_names is None else (list(var_names), None)


def plot_trace(idata: az.InferenceData, var_names: Sequence[str] | None = None, path=None):
    """``az.plot_trace`` of ``var_names`` (default :func:`default_selection`); returns the Figure."""
    names, coords = _selection(idata, var_names)
    with _quiet_arviz():
        axes = az.plot_trace(idata, var_names=names, coords=coords, compact=False,
                             backend_kwargs={"layout": "constrained"})
    return _finish(np.ravel(axes)[0].figure, path)


def plot_rank(idata: az.InferenceData, var_names: Sequence[str] | None = None, path=None):
    """``az.plot_rank`` of ``var_names`` (default :func:`default_selection`); returns the Figure."""
    names, coords = _selection(idata, var_names)
    with _quiet_arviz():
        axes = az.plot_rank(idata, var_names=names, coords=coords, backend_kwargs={"layout": "constrained"})
    return _finish(np.ravel(axes)[0].figure, path)


def _quantiles(values: np.ndarray, qs) -> np.ndarray:
    """NaN-aware quantiles over axis 0 of ``values: [S, n]``: ``[len(qs), n]``, NaN where a
    column has no finite value (without numpy's all-NaN warning)."""
    out = np.full((len(qs), values.shape[1]), np.nan)
    ok = np.isfinite(values).any(0)
    out[:, ok] = np.nanquantile(values[:, ok], qs, axis=0)
    return out


def plot_ppc(idata: az.InferenceData, path=None):
    """Posterior predictive check: step correctness by depth (replicated 50% and 90% bands,
    observed markers; for grammar the fraction of explained steps) and error-type frequencies
    (observed bars, replicated 90% intervals with their medians). Returns the Figure."""
    if "posterior_predictive" not in idata.groups() or "observed_data" not in idata.groups():
        raise ValueError("idata needs posterior_predictive and observed_data groups for a PPC plot")
    pp, obs = idata.posterior_predictive, idata.observed_data
    name = "step_correct" if "step_correct" in pp else "step_explained"
    rep = pp[name].values.reshape(-1, pp[name].shape[-1])
    depth = pp[name]["depth"].values
    q = _quantiles(rep, [0.05, 0.25, 0.5, 0.75, 0.95])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax1.fill_between(depth, q[0], q[4], color="C0", alpha=0.2, label="replicated 90%")
    ax1.fill_between(depth, q[1], q[3], color="C0", alpha=0.4, label="replicated 50%")
    ax1.plot(depth, q[2], color="C0", ls="--")
    ax1.plot(depth, obs[name].values, "ko", label="observed")
    ax1.set(xlabel="depth t", xticks=depth, ylim=(-0.02, 1.02),
            ylabel="fraction correct" if name == "step_correct" else "fraction explained by a module")
    ax1.legend(loc="best")
    types = [str(t) for t in pp["error_type"]["step_type"].values]
    x = np.arange(len(types))
    eq = _quantiles(pp["error_type"].values.reshape(-1, len(types)), [0.05, 0.5, 0.95])
    ax2.bar(x, obs["error_type"].values, color="0.7", label="observed")
    ax2.errorbar(x, eq[1], yerr=[eq[1] - eq[0], eq[2] - eq[1]], fmt="o", color="C0", capsize=4,
                 label="replicated (median, 90%)")
    ax2.set(xticks=x, xticklabels=types, ylabel="fraction of steps", ylim=(0, 1.02))
    ax2.legend(loc="upper right")
    fig.suptitle("posterior predictive check")
    return _finish(fig, path)


def plot_loo(compare_df: pd.DataFrame, path=None):
    """``az.plot_compare`` of a :func:`compare` table; returns the Figure."""
    with _quiet_arviz():
        ax = az.plot_compare(compare_df)
    return _finish(ax.figure, path)


def khat_threshold(n_draws: int) -> float:
    """The sample-size-dependent Pareto k threshold of PSIS with S = ``n_draws`` posterior draws,
    min(1 - 1/log10(S), 0.7) (Vehtari et al. 2024, JMLR 25(72)): above it the importance-sampling
    estimate is unreliable. It is what ArviZ's ``loo`` reports as ``good_k``; from S = 2155 on it is
    :data:`BAD_KHAT`, and below S = 10 it is not positive (no trace's estimate is reliable)."""
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 2:
        raise ValueError(f"n_draws must be an integer of at least 2, got {n_draws!r}")
    return min(1 - 1 / math.log10(n_draws), BAD_KHAT)


def plot_khat(idata: az.InferenceData, path=None, *, threshold: float | None = None):
    """``az.plot_khat``: the Pareto k of every trace's PSIS-LOO weights, with one dashed line at
    ``threshold`` (default :data:`BAD_KHAT`, the threshold of :func:`loo`'s ``n_bad_k``) whose
    legend gives it and the number of traces above it; returns the Figure. Pass
    ``threshold=khat_threshold(S)`` for the sample-size-dependent threshold, and quote the same
    value in the caption. ArviZ's own lines (at 0, its ``good_k`` and 1) are not drawn: its
    ``good_k`` is :func:`khat_threshold`, not the threshold the counts use."""
    threshold = BAD_KHAT if threshold is None else float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    elpd = loo(idata)
    k = np.asarray(elpd["pareto_k"])
    elpd["good_k"] = threshold  # ArviZ shades the points above good_k darker
    with _quiet_arviz():
        ax = np.ravel(az.plot_khat(elpd, show_hlines=False))[0]
    ax.axhline(threshold, color="C3", linestyle="--", linewidth=1,
               label=f"threshold k = {threshold:.2f} ({int((k > threshold).sum())} of {k.size} traces above)")
    ax.set_xlabel("trace")
    ax.legend(loc="upper right")
    return _finish(ax.figure, path)
