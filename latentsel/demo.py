"""``latentsel demo``: the embedded end-to-end run.

Generates every data regime, runs the programs through the reference and the batch
executor, checks that they agree, and measures how often a step's module is the only one
consistent with it (the aliasing the identifiability experiments must report). Then
simulates traces from known modular parameters under two regimes, fits them by EM and
prints how well the parameters and the executed modules are recovered.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from latentsel.consistency import consistent_modules
from latentsel.regimes import REGIMES, bigram_split, generate
from latentsel.traces import read_traces, write_traces
from latentsel.world import default_world


def run_demo(out: str | Path = "latentsel-demo", n: int = 2000, seed: int = 0) -> dict:
    """Run the demo, write its files under ``out`` and print a summary; returns the summary rows."""
    out = Path(out)
    world = default_world()
    split = bigram_split(world.n_skills, seed=0)
    counts = split.counts()
    print(f"latentsel demo: {world.n_routes} routings x {world.n_skills} skills = {world.n_modules} modules; "
          f"skill bigrams: {counts['seen']} seen, {counts['rl']} RL, {counts['held_out']} held out")
    rows = {}
    for regime in tqdm(REGIMES, desc="regimes", unit="regime"):
        t0 = time.perf_counter()
        traces = generate(regime, n, seed, world=world, split=split)
        path = out / f"{regime}.jsonl.gz"
        write_traces(path, traces, world=world)
        back = read_traces(path, world=world)
        assert [t.to_dict() for t in back] == [t.to_dict() for t in traces], "round trip failed"
        consistent = consistent_modules(traces, world)
        n_consistent = np.concatenate([c.reshape(c.shape[0], -1).sum(axis=1) for c in consistent])
        truth_ok = all(c[t, world.route_index(r), world.skill_index(k)]
                       for tr, c in zip(traces, consistent) for t, (r, k) in enumerate(tr.program))
        if not truth_ok:
            raise RuntimeError("the batch executor disagrees with the reference on a golden step")
        rows[regime] = {
            "n": len(traces),
            "depth": REGIMES[regime].depth,
            "programs": len({tuple(t.program) for t in traces}),
            "skills": len({k for t in traces for _, k in t.program}),
            "routes": len({r for t in traces for r, _ in t.program}),
            "mean_len": float(np.mean([len(s) for t in traces for s in t.steps])),
            "unique_step": float(np.mean(n_consistent == 1)),
            "median_consistent": float(np.median(n_consistent)),
            "seconds": time.perf_counter() - t0,
        }
    print()
    print(f"{'regime':<12} {'n':>6} {'depth':>5} {'programs':>8} {'skills':>6} {'routes':>6} "
          f"{'mean len':>8} {'unique':>7} {'consist.':>8} {'s':>6}")
    for regime, r in rows.items():
        print(f"{regime:<12} {r['n']:>6} {r['depth']:>5} {r['programs']:>8} {r['skills']:>6} {r['routes']:>6} "
              f"{r['mean_len']:>8.2f} {r['unique_step']:>7.3f} {r['median_consistent']:>8.0f} {r['seconds']:>6.2f}")
    print()
    print("unique: fraction of golden steps whose module is the only one of the "
          f"{world.n_modules} that reproduces the step;")
    print("consist.: median number of modules consistent with a step (aliasing that no data can resolve).")
    print(f"trace files written to {out}/")
    print()
    _recovery(world, split, n, seed)
    return rows


def _recovery(world, split, n: int, seed: int) -> None:
    """Simulate from known modular parameters under two regimes, fit by EM, print recovery."""
    from latentsel.api import exact
    from latentsel.emission import build_data
    from latentsel.inference.em import fit_em
    from latentsel.models.params import default_params
    from latentsel.simulate import simulate

    rng = np.random.default_rng(seed)
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8, noise=0.03, off_module=0.03)
    # non-trivial execution: move part of each row's error mass onto one random confusion
    route, skill = np.array(truth.route_exec), np.array(truth.skill_exec)
    for m in (route, skill):
        for i in range(m.shape[0]):
            j = rng.choice(np.setdiff1d(np.arange(m.shape[0]), [i]))
            m[i, j] += 0.1
            m[i, i] -= 0.1
    truth = truth._replace(route_exec=route, skill_exec=skill)
    print(f"{'EM recovery':<12} {'n':>6} {'EM it':>6} {'route err':>9} {'skill err':>9} "
          f"{'noise':>7} {'off':>7} {'MAP acc':>8}")
    for regime in ("sft", "eval-ood"):
        traces = simulate(generate(regime, n, seed + 1, world=world, split=split), truth, "modular", world, seed=seed)
        data = build_data(traces, world)
        fit = fit_em("modular", data, tol=1e-8)
        post = exact(data, fit.params, "modular")
        visits_r, visits_k = fit.stats.route_counts.sum(-1), fit.stats.skill_counts.sum(-1)
        err_r = np.abs(fit.params.route_exec - truth.route_exec).max(-1)[visits_r > 100]
        err_k = np.abs(fit.params.skill_exec - truth.skill_exec).max(-1)[visits_k > 100]
        hits = [post.map_route[i, t] == world.route_index(tr.truth.routes[t])
                and post.map_skill[i, t] == world.skill_index(tr.truth.skills[t])
                for i, tr in enumerate(traces) for t in range(tr.depth) if not tr.truth.off[t]]
        print(f"{regime:<12} {n:>6} {len(fit.objective):>6} {err_r.max(initial=0):>9.3f} {err_k.max(initial=0):>9.3f} "
              f"{fit.params.noise:>7.4f} {fit.params.off_module:>7.4f} {np.mean(hits):>8.3f}")
    print("truth: noise 0.0300, off 0.0300; err = max-abs error over rows with > 100 expected visits;")
    print("MAP acc = exact-match rate of the MAP module on on-module steps (aliased steps cap it below 1).")
