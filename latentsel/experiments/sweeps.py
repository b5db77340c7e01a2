"""Sweeps of the identifiability experiments, simulation-based calibration, and their files.

:func:`sweep` runs :func:`latentsel.experiments.identify.run_task` over every (regime, N, seed) in parallel
with joblib (processes by default). On a cluster, switch the joblib backend: ``backend="ray"``
(``pip install "ray[default]"``; connects with ``ray.init()``, so set ``RAY_ADDRESS`` to join a
running cluster) or ``backend="dask"`` (``pip install "dask[distributed]"``; connects a
``distributed.Client()`` to ``DASK_SCHEDULER_ADDRESS`` when set, otherwise starts a local one).
Each task is independent and seeded, so the records do not depend on the backend.

:func:`sbc` is simulation-based calibration of the conjugate posterior at the EM estimate, per
regime: θ ~ prior, N traces of the regime from θ, fit, and the rank of θ among L posterior
draws for every execution row's fidelity, noise and off_module, and (on fully observed regimes)
of the number of steps that executed their intended module among L draws of the selections (one
exact draw given each θ draw; ties split at random). A calibrated posterior gives uniform ranks;
each quantity is tested by its ECDF against a simultaneous band (:mod:`latentsel.analysis.sbc`).

Resuming: given ``tasks_dir``, both save every finished task (the records of one (regime, N,
seed), the ranks of one SBC replication) there, atomically, as soon as its result reaches the
calling process, as ``NAME-DIGEST.json``. The digest covers what a task computes besides its own
coordinates (the models and NUTS settings, or SBC's N, draws and seed; the world; the package
version), so a changed configuration never reads another's results. A later call with the same
folder reads the finished tasks back and runs only the others, and returns what an
uninterrupted call returns, in the same order: every result passes through JSON, run or read.
Ray's joblib backend hands back all results at the end, so with it a killed sweep keeps only
the tasks earlier calls saved.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from joblib import Parallel, delayed, parallel_config
from tqdm.auto import tqdm

from latentsel import __version__
from latentsel._io import atomic_open
from latentsel._jax import start_jax
from latentsel.analysis.sbc import sbc_test, tie_randomized_rank
from latentsel.experiments.designs import IDENTIFY_MODELS, SWEEP_BACKENDS, Design, Regime, Truth
from latentsel.experiments.identify import _truth_arrays, regime_traces, run_task
from latentsel.inference.conjugate import conjugate_posterior
from latentsel.inference.em import fit_em
from latentsel.inference.sampling import sample_selections
from latentsel.models.params import ModularParams, Priors
from latentsel.models.registry import model_spec
from latentsel.traces.emission import build_data
from latentsel.world import World
from latentsel.world.loading import load_world

__all__ = ["sweep", "sbc", "sbc_parameters", "Task", "sweep_tasks", "sbc_tasks", "done_tasks", "nuts_cells"]


def sbc_parameters(world: World, discrete: bool = True) -> tuple[str, ...]:
    """The quantities SBC checks: every execution row's fidelity (its intended entry), noise,
    off_module and, where ``discrete``, the number of steps that executed their intended module
    (a function of the selections, ranked with ties split at random)."""
    rows = [f"route_exec[{r},{r}]" for r in world.route_names] + [f"skill_exec[{k},{k}]" for k in world.skill_names]
    return (*rows, "noise", "off_module", *(("n_intended",) if discrete else ()))


class Task(NamedTuple):
    """One unit of a sweep: ``fn(*args)``, saved in a task folder as ``{name}.json``."""

    name: str
    fn: Callable
    args: tuple


def _digest(world: str | None, **options) -> str:
    """16 hex digits of what a kind of task computes besides its coordinates: ``options``, the
    world (its name, alphabet and module names) and the package version."""
    w = load_world(world)
    config = {"world": [world, w.alphabet, list(w.route_names), list(w.skill_names), w.max_len],
              "version": __version__, **options}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"a task result holds a {type(x).__name__}, which JSON cannot")


def _load(tasks_dir: Path, task: Task):
    """The result saved for ``task``, or ``None`` where there is none (or not of these arguments)."""
    try:
        doc = json.loads((tasks_dir / f"{task.name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("args") != json.loads(json.dumps(task.args)):
        return None
    return doc.get("result")


def _save(tasks_dir: Path | None, task: Task, result):
    """``result`` as JSON gives it back, saved for ``task`` first when there is a folder."""
    text = json.dumps({"args": task.args, "result": result}, default=_plain)
    if tasks_dir is not None:
        with atomic_open(tasks_dir / f"{task.name}.json") as f:
            f.write(text)
    return json.loads(text)["result"]


def done_tasks(tasks: Sequence[Task], tasks_dir: str | os.PathLike) -> int:
    """How many of ``tasks`` an earlier call saved in ``tasks_dir``."""
    return sum(_load(Path(tasks_dir), t) is not None for t in tasks)


@contextlib.contextmanager
def _backend(name: str, n_jobs: int):
    if name == "ray":
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError:
            raise ValueError('backend "ray" needs Ray: pip install "ray[default]"') from None
        register_ray()
        ray.init(ignore_reinit_error=True)
    if name == "dask":
        try:
            from distributed import Client
        except ImportError:
            raise ValueError('backend "dask" needs Dask: pip install "dask[distributed]"') from None
        client = Client(os.environ.get("DASK_SCHEDULER_ADDRESS"))
        with client, parallel_config(backend="dask"):
            yield
        return
    with parallel_config(backend=name, n_jobs=1 if name == "sequential" else n_jobs):
        yield


def _indexed(fn, i, args):
    return i, fn(*args)


def _run(tasks: Sequence[Task], *, n_jobs: int, backend: str, progress: bool, desc: str,
         tasks_dir: str | os.PathLike | None = None) -> list:
    """``[t.fn(*t.args) for t in tasks]`` as JSON gives them back, computed in parallel, in the
    order of ``tasks`` whatever order they end in. With ``tasks_dir``, a task saved there is read
    back, not run, and every task that runs is saved there as soon as its result comes back."""
    if backend not in SWEEP_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(SWEEP_BACKENDS)}")
    tasks_dir = None if tasks_dir is None else Path(tasks_dir)
    out = {}
    if tasks_dir is not None:
        out = {i: res for i, t in enumerate(tasks) if (res := _load(tasks_dir, t)) is not None}
    todo = [i for i in range(len(tasks)) if i not in out]
    bar = tqdm(total=len(tasks), initial=len(out), desc=desc, unit="task", disable=not progress)
    # Ray's joblib backend cannot stream results; the others report each task as it ends
    stream = "list" if backend == "ray" else "generator_unordered"
    if todo:  # with every task done, no backend starts (nor joins a cluster)
        with _backend(backend, n_jobs):
            for i, result in Parallel(n_jobs=n_jobs, return_as=stream)(
                    delayed(_indexed)(tasks[i].fn, i, tasks[i].args) for i in todo):
                out[i] = _save(tasks_dir, tasks[i], result)
                bar.update(1)
    bar.close()
    return [out[i] for i in range(len(tasks))]


def _task(regime: dict, truth: dict, n: int, seed: int, models, nuts_draws: int, test_traces: int, world):
    start_jax()  # a worker process is an entry point: float64, as in the parent
    return run_task(Regime(**{**regime, "hide": tuple(regime["hide"])}), n, seed, truth=Truth(**truth),
                    models=models, nuts_draws=nuts_draws, test_traces=test_traces, world=load_world(world))


def nuts_cells(design: Design) -> set[tuple[str, str, int, int]]:
    """The (regime, truth, N, seed) cells whose modular fit NUTS checks: per (regime, truth) of a
    fully observed regime, the smallest N if it is at most ``nuts_max``, at the first seed."""
    if not design.nuts_max or "modular" not in design.models:
        return set()
    first = {}
    for r, t, n, s in design.cells():
        if not design.regimes[r].hide and n <= design.nuts_max and (r, t) in design.nuts_pairs():
            first[(r, t)] = min(first.get((r, t), (n, s)), (n, s))
    return {(r, t, n, s) for (r, t), (n, s) in first.items()}


def sweep_tasks(design: Design, *, world: str | None = None) -> list[Task]:
    """The tasks of :func:`sweep`, one per (regime, truth, N, seed), the largest N first."""
    load_world(world)  # a bad name fails here, not in every worker
    key = _digest(world, kind="identify", models=list(design.models))
    nuts = nuts_cells(design)
    cells = sorted(design.cells(), key=lambda c: -c[2])  # the big tasks first: no pool waits on one at the end
    tasks = []
    for r, t, n, s in cells:
        regime, truth = design.regimes[r], design.truths[t]
        args = ({**regime._asdict(), "hide": list(regime.hide)}, truth._asdict(), n, s, tuple(design.models),
                design.nuts_draws if (r, t, n, s) in nuts else 0, design.test_traces_of(r, t), world)
        # the file name holds a digest of every argument: another configuration writes another file
        digest = hashlib.sha256(json.dumps([key, args]).encode()).hexdigest()[:16]
        tasks.append(Task(f"identify-{_safe(r)}-{_safe(t)}-N{n}-seed{s}-{digest}", _task, args))
    return tasks


def _safe(name: str) -> str:
    """A design name as a file-name part (the task's arguments, not its name, identify it)."""
    return "".join(c if c.isalnum() or c in "+-_." else "_" for c in name)[:40]


def sweep(design: Design, *, n_jobs: int = 2, backend: str = "loky", progress: bool = True, world: str | None = None,
          tasks_dir: str | os.PathLike | None = None) -> list[dict]:
    """Records of every (regime, truth, model, N, seed) of ``design``, sorted by regime and truth
    (in the design's order), model, N and seed. ``world``: the world's name for
    :func:`~latentsel.world.loading.load_world` (default: the default world), which each worker
    process loads. ``tasks_dir``: the folder of finished tasks that makes the sweep resumable
    (see the module docstring)."""
    tasks = sweep_tasks(design, world=world)
    results = _run(tasks, n_jobs=n_jobs, backend=backend, progress=progress, desc="identify", tasks_dir=tasks_dir)
    order_r = {r: i for i, r in enumerate(design.regimes)}
    order_t = {t: i for i, t in enumerate(design.truths)}
    records = [rec for res in results for rec in res]
    return sorted(records, key=lambda r: (order_r[r["regime"]], order_t[r["truth"]], IDENTIFY_MODELS.index(r["model"]),
                                          r["n_traces"], r["seed"]))


def _prior_draw(world: World, rng: np.random.Generator, priors: Priors) -> ModularParams:
    conc_r, conc_k = model_spec("modular").concentration(priors, world.n_routes, world.n_skills)
    return ModularParams(np.stack([rng.dirichlet(a) for a in conc_r]), np.stack([rng.dirichlet(a) for a in conc_k]),
                         float(rng.beta(*priors.noise)), float(rng.beta(*priors.off_module)))


def _n_intended(route, skill, data) -> np.ndarray:
    """The number of steps (over the corpus) that executed their intended module: ``[...]``."""
    hit = (route == data.route_intended) & (skill == data.skill_intended) & data.step_mask
    return hit.sum((-2, -1))


def _sbc_rep(regime: dict, rep: int, n_traces: int, n_draws: int, seed: int, world: str | None) -> list[int]:
    start_jax()  # a worker process is an entry point: float64, as in the parent
    world = load_world(world)
    regime = Regime(**{**regime, "hide": tuple(regime["hide"])})
    rng = np.random.default_rng([seed, rep, 0x5BC])
    theta = _prior_draw(world, rng, Priors())
    traces, _ = regime_traces(regime, n_traces, seed * 100_003 + rep, world, truth=theta)
    data = build_data(traces, world)
    em = fit_em("modular", data, max_iter=300)
    draws = conjugate_posterior("modular", em.params, data).sample((n_draws,), seed=int(rng.integers(2**31)))
    values = [np.concatenate([np.diagonal(draws.route_exec, axis1=-2, axis2=-1),
                              np.diagonal(draws.skill_exec, axis1=-2, axis2=-1),
                              draws.noise[:, None], draws.off_module[:, None]], axis=1)]
    truth = [np.concatenate([np.diag(theta.route_exec), np.diag(theta.skill_exec), [theta.noise, theta.off_module]])]
    if not regime.hide:  # one exact draw of the selections per θ draw (through blocks: 0.15 s each)
        counts = []
        for i in range(n_draws):
            params = ModularParams(draws.route_exec[i], draws.skill_exec[i], float(draws.noise[i]),
                                   float(draws.off_module[i]))
            sel = sample_selections("modular", params, data, 1, seed=int(rng.integers(2**31)))
            counts.append(int(_n_intended(sel.route[0], sel.skill[0], data)))
        values.append(np.asarray(counts, float)[:, None])
        truth.append([float(_n_intended(*_truth_arrays(traces, world, data.step_mask.shape[1]), data))])
    return tie_randomized_rank(np.concatenate(values, axis=1), np.concatenate(truth), rng).tolist()


def sbc_tasks(design: Design, *, seed: int = 0, world: str | None = None) -> list[Task]:
    """The tasks of :func:`sbc`, one per (regime, replication)."""
    tasks = []
    for name, _ in design.sbc_groups():
        regime = design.regimes[name]
        args = {**regime._asdict(), "hide": list(regime.hide)}
        key = _digest(world, kind="sbc", regime=args, n_traces=design.sbc_traces, n_draws=design.sbc_draws, seed=seed)
        tasks += [Task(f"sbc-{_safe(name)}-rep{rep}-{key}", _sbc_rep,
                       (args, rep, design.sbc_traces, design.sbc_draws, seed, world))
                  for rep in range(design.sbc_reps)]
    return tasks


def sbc(design: Design, *, seed: int = 0, n_jobs: int = 2, backend: str = "loky", progress: bool = True,
        world: str | None = None, tasks_dir: str | os.PathLike | None = None) -> dict:
    """Simulation-based calibration of every data layout of ``design.sbc_groups()``:
    ``{regime: {"regimes", "parameters", "ranks": int[n_params][n_reps], "n_draws", "n_traces",
    "n_reps", "ecdf_p", "failed", "chi2_p"}}``, keyed by the first regime of each layout
    (``regimes``: all of them). Ranks lie in 0..n_draws; ``ecdf_p`` is the p-value of the
    ECDF test of uniform ranks and ``failed`` its verdict at family-wise level 0.01 over the
    regime's quantities (:func:`latentsel.analysis.sbc.sbc_test`); ``chi2_p`` a chi-square test
    of 10 rank bins, for comparison. ``tasks_dir``: as for :func:`sweep`."""
    from scipy.stats import chisquare

    if design.sbc_reps and (design.sbc_draws < 1 or design.sbc_traces < 1):
        raise ValueError(f"sbc needs draws and traces >= 1, got {design.sbc_draws}, {design.sbc_traces}")
    tasks = sbc_tasks(design, seed=seed, world=world)
    results = _run(tasks, n_jobs=n_jobs, backend=backend, progress=progress, desc="SBC", tasks_dir=tasks_dir)
    world_obj, n_draws, out = load_world(world), design.sbc_draws, {}
    for i, (name, members) in enumerate(design.sbc_groups()):
        ranks = np.asarray(results[i * design.sbc_reps: (i + 1) * design.sbc_reps], int).T  # [params, reps]
        if not ranks.size:
            continue
        edges = np.unique(np.linspace(0, n_draws + 1, min(10, n_draws + 1) + 1).round().astype(int))
        expected = np.diff(edges) / (n_draws + 1) * ranks.shape[1]
        tests = sbc_test(ranks, n_draws)
        out[name] = {"regimes": list(members), "parameters": list(sbc_parameters(world_obj, discrete=not design.regimes[name].hide)),
                     "ranks": ranks.tolist(), "n_draws": n_draws, "n_traces": design.sbc_traces,
                     "n_reps": int(ranks.shape[1]), "ecdf_p": [t["p"] for t in tests],
                     "failed": [bool(t["failed"]) for t in tests],
                     "chi2_p": [float(chisquare(np.histogram(r, edges)[0], expected).pvalue) for r in ranks]}
    return out
