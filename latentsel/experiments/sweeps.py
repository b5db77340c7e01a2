"""Sweeps of the identifiability experiments, simulation-based calibration, and their files.

:func:`sweep` runs :func:`latentsel.experiments.identify.run_task` over every (regime, N, seed) in parallel
with joblib (processes by default). On a cluster, switch the joblib backend: ``backend="ray"``
(``pip install "ray[default]"``; connects with ``ray.init()``, so set ``RAY_ADDRESS`` to join a
running cluster) or ``backend="dask"`` (``pip install "dask[distributed]"``; connects a
``distributed.Client()`` to ``DASK_SCHEDULER_ADDRESS`` when set, otherwise starts a local one).
Each task is independent and seeded, so the records do not depend on the backend.

:func:`sbc` is simulation-based calibration of the conjugate posterior at the EM estimate:
θ ~ prior, N traces of the ``sft`` regime from θ, fit, and the rank of θ among L posterior
draws, for a few parameters. A calibrated posterior gives uniform ranks.

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
from latentsel.experiments.designs import IDENTIFY_MODELS, IDENTIFY_REGIMES, SWEEP_BACKENDS
from latentsel.experiments.identify import regime_traces, run_task
from latentsel.inference.conjugate import conjugate_posterior
from latentsel.inference.em import fit_em
from latentsel.models.params import ModularParams, Priors
from latentsel.models.registry import model_spec
from latentsel.traces.emission import build_data
from latentsel.world import World
from latentsel.world.loading import load_world

__all__ = ["sweep", "sbc", "sbc_parameters", "Task", "sweep_tasks", "sbc_tasks", "done_tasks"]


def sbc_parameters(world: World) -> tuple[str, ...]:
    """The scalars SBC checks: the first routing's and the first skill's fidelity, noise and off_module."""
    r, k = world.route_names[0], world.skill_names[0]
    return (f"route_exec[{r},{r}]", f"skill_exec[{k},{k}]", "noise", "off_module")


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


def _task(regime, n, seed, models, nuts_max, nuts_draws, world):
    start_jax()  # a worker process is an entry point: float64, as in the parent
    return run_task(regime, n, seed, models=models, nuts_max=nuts_max, nuts_draws=nuts_draws, world=load_world(world))


def sweep_tasks(regimes: Sequence[str], sizes: Sequence[int], seeds: Sequence[int], *,
                models: Sequence[str] = IDENTIFY_MODELS, nuts_max: int = 0, nuts_draws: int = 150,
                world: str | None = None) -> list[Task]:
    """The tasks of :func:`sweep`, one per (regime, N, seed), the largest N first."""
    for r in regimes:
        if r not in IDENTIFY_REGIMES:
            raise ValueError(f"unknown regime {r!r}; choose from {', '.join(IDENTIFY_REGIMES)}")
    for m in models:
        if m not in IDENTIFY_MODELS:
            raise ValueError(f"unknown model {m!r}; identify fits {', '.join(IDENTIFY_MODELS)}")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive trace counts, got {list(sizes)}")
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    load_world(world)  # a bad name fails here, not in every worker
    key = _digest(world, kind="identify", models=list(models), nuts_max=nuts_max, nuts_draws=nuts_draws)
    # the big tasks first, so that the pool is not left waiting on one at the end
    grid = sorted(((r, int(n), int(s)) for r in regimes for n in sizes for s in seeds), key=lambda t: -t[1])
    return [Task(f"identify-{r}-N{n}-seed{s}-{key}", _task, (r, n, s, tuple(models), nuts_max, nuts_draws, world))
            for r, n, s in grid]


def sweep(regimes: Sequence[str], sizes: Sequence[int], seeds: Sequence[int], *, models: Sequence[str] = IDENTIFY_MODELS,
          nuts_max: int = 0, nuts_draws: int = 150, n_jobs: int = 2, backend: str = "loky",
          progress: bool = True, world: str | None = None, tasks_dir: str | os.PathLike | None = None) -> list[dict]:
    """Records of every (regime, model, N, seed), sorted by regime, model, N and seed. ``world``:
    the world's name for :func:`~latentsel.world.loading.load_world` (default: the default
    world), which each worker process loads. ``tasks_dir``: the folder of finished tasks that
    makes the sweep resumable (see the module docstring)."""
    tasks = sweep_tasks(regimes, sizes, seeds, models=models, nuts_max=nuts_max, nuts_draws=nuts_draws, world=world)
    results = _run(tasks, n_jobs=n_jobs, backend=backend, progress=progress, desc="identify", tasks_dir=tasks_dir)
    order = {r: i for i, r in enumerate(regimes)}
    records = [rec for res in results for rec in res]
    return sorted(records, key=lambda r: (order[r["regime"]], IDENTIFY_MODELS.index(r["model"]), r["n_traces"], r["seed"]))


def _prior_draw(world: World, rng: np.random.Generator, priors: Priors) -> ModularParams:
    conc_r, conc_k = model_spec("modular").concentration(priors, world.n_routes, world.n_skills)
    return ModularParams(np.stack([rng.dirichlet(a) for a in conc_r]), np.stack([rng.dirichlet(a) for a in conc_k]),
                         float(rng.beta(*priors.noise)), float(rng.beta(*priors.off_module)))


def _sbc_rep(rep: int, n_traces: int, n_draws: int, seed: int, world: str | None) -> np.ndarray:
    start_jax()  # a worker process is an entry point: float64, as in the parent
    world = load_world(world)
    rng = np.random.default_rng([seed, rep, 0x5BC])
    theta = _prior_draw(world, rng, Priors())
    traces, _ = regime_traces("sft", n_traces, seed * 100_003 + rep, world, truth=theta)
    data = build_data(traces, world)
    em = fit_em("modular", data, max_iter=300)
    draws = conjugate_posterior("modular", em.params, data).sample((n_draws,), seed=int(rng.integers(2**31)))
    r, k = 0, 0  # sbc_parameters(world)
    pairs = [(draws.route_exec[:, r, r], theta.route_exec[r, r]), (draws.skill_exec[:, k, k], theta.skill_exec[k, k]),
             (draws.noise, theta.noise), (draws.off_module, theta.off_module)]
    return np.array([int((d < t).sum()) for d, t in pairs])


def sbc_tasks(n_reps: int, *, n_traces: int = 100, n_draws: int = 99, seed: int = 0,
              world: str | None = None) -> list[Task]:
    """The tasks of :func:`sbc`, one per replication."""
    key = _digest(world, kind="sbc", n_traces=n_traces, n_draws=n_draws, seed=seed)
    return [Task(f"sbc-rep{rep}-{key}", _sbc_rep, (rep, n_traces, n_draws, seed, world)) for rep in range(n_reps)]


def sbc(n_reps: int, *, n_traces: int = 100, n_draws: int = 99, seed: int = 0, n_jobs: int = 2, backend: str = "loky",
        progress: bool = True, world: str | None = None, tasks_dir: str | os.PathLike | None = None) -> dict:
    """Simulation-based calibration: ``{"parameters", "ranks": int[n_params][n_reps], "n_draws",
    "n_traces", "n_reps", "chi2_p"}``; ranks lie in 0..n_draws, and ``chi2_p`` is the p-value of a
    chi-square test of uniform ranks (10 bins) per parameter. ``tasks_dir``: as for :func:`sweep`."""
    from scipy.stats import chisquare

    if n_reps < 1 or n_draws < 1 or n_traces < 1:
        raise ValueError(f"sbc needs n_reps, n_draws and n_traces >= 1, got {n_reps}, {n_draws}, {n_traces}")
    tasks = sbc_tasks(n_reps, n_traces=n_traces, n_draws=n_draws, seed=seed, world=world)
    ranks = np.stack(_run(tasks, n_jobs=n_jobs, backend=backend, progress=progress, desc="SBC", tasks_dir=tasks_dir),
                     axis=1)
    # integer bin edges over the n_draws + 1 possible ranks, the expected counts by bin width
    edges = np.unique(np.linspace(0, n_draws + 1, min(10, n_draws + 1) + 1).round().astype(int))
    expected = np.diff(edges) / (n_draws + 1) * n_reps
    p = [float(chisquare(np.histogram(r, edges)[0], expected).pvalue) for r in ranks]
    return {"parameters": list(sbc_parameters(load_world(world))), "ranks": ranks.tolist(), "n_draws": n_draws, "n_traces": n_traces,
            "n_reps": n_reps, "chi2_p": p}
