"""``latentsel demo``: the embedded end-to-end run.

Generates every data regime, runs the programs through the reference and the batch
executor, checks that they agree, and measures how often a step's module is the only one
consistent with it (the aliasing the identifiability experiments must report). Then
simulates traces from known modular parameters under two regimes, fits them by EM and by
NUTS (on a subset, to keep the demo short) and prints how well the parameters and the
executed modules are recovered.
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


def run_demo(out: str | Path = "latentsel-demo", n: int = 2000, seed: int = 0, nuts_traces: int = 150,
             nuts_draws: int = 80) -> dict:
    """Run the demo, write its files under ``out`` and print a summary; returns the summary rows.

    NUTS runs on the first ``nuts_traces`` traces of each regime, 2 chains of ``nuts_draws``
    warm-up and ``nuts_draws`` kept draws each."""
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
    _recovery(world, split, n, seed, nuts_traces, nuts_draws)
    return rows


def _recovery(world, split, n: int, seed: int, nuts_traces: int, nuts_draws: int) -> None:
    """Simulate from known modular parameters under two regimes, fit by EM and NUTS, print recovery."""
    from latentsel.emission import build_data
    from latentsel.inference.em import fit_em
    from latentsel.inference.mcmc import fit_nuts, summary
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
    header = (f"{'n':>6} {'route err':>9} {'skill err':>9} {'noise':>7} {'off':>7} {'MAP acc':>8}")
    rows = []
    for regime in ("sft", "eval-ood"):
        traces = simulate(generate(regime, n, seed + 1, world=world, split=split), truth, "modular", world, seed=seed)
        data = build_data(traces, world)
        t0 = time.perf_counter()
        fit = fit_em("modular", data, tol=1e-8)
        em_s = time.perf_counter() - t0
        rows.append((regime, "EM", _scores(world, traces, data, fit.params, truth, min_visits=100),
                     f"{len(fit.objective)} it", em_s))
        m = min(nuts_traces, len(traces))
        if m and nuts_draws >= 4:
            t0 = time.perf_counter()
            sub = data.take(slice(0, m))
            res = fit_nuts("modular", sub, num_warmup=nuts_draws, num_samples=nuts_draws, num_chains=2, seed=seed)
            r_hat = max(site["r_hat_max"] for site in summary(res)["sites"].values())
            rows.append((regime, "NUTS", _scores(world, traces[:m], sub, res.params, truth, min_visits=100 * m // n),
                         f"R^ {r_hat:.2f}", time.perf_counter() - t0))
    print(f"{'recovery':<10} {'method':<6} {header} {'fit':>9} {'s':>6}")
    for regime, method, sc, note, secs in rows:
        print(f"{regime:<10} {method:<6} {sc['n']:>6} {sc['route_err']:>9.3f} {sc['skill_err']:>9.3f} "
              f"{sc['noise']:>7.4f} {sc['off']:>7.4f} {sc['map_acc']:>8.3f} {note:>9} {secs:>6.1f}")
    print("truth: noise 0.0300, off 0.0300; err = max-abs error over the rows that the fitted traces reach often")
    print(f"(> 100 intended visits per {n} traces); MAP acc = exact-match rate of the MAP module on on-module steps")
    print("(aliased steps cap it below 1). EM: the MAP on all traces; NUTS: the posterior mean on the first "
          f"{min(nuts_traces, n)} traces,")
    print(f"2 chains x {nuts_draws} warm-up + {nuts_draws} draws (R^ = the worst split R-hat; short chains, "
          "to keep the demo short).")


def _scores(world, traces, data, params, truth, min_visits: int) -> dict:
    """Max-abs row error on the often reached rows, noise, off and MAP accuracy at ``params``."""
    from latentsel.api import exact

    post = exact(data, params, "modular")
    mask = np.asarray(data.step_mask)
    visits_r = np.bincount(np.asarray(data.route_intended)[mask], minlength=world.n_routes)
    visits_k = np.bincount(np.asarray(data.skill_intended)[mask], minlength=world.n_skills)
    err_r = np.abs(params.route_exec - truth.route_exec).max(-1)[visits_r > min_visits]
    err_k = np.abs(params.skill_exec - truth.skill_exec).max(-1)[visits_k > min_visits]
    hits = [post.map_route[i, t] == world.route_index(tr.truth.routes[t])
            and post.map_skill[i, t] == world.skill_index(tr.truth.skills[t])
            for i, tr in enumerate(traces) for t in range(tr.depth) if not tr.truth.off[t]]
    return {"n": len(traces), "route_err": err_r.max(initial=0), "skill_err": err_k.max(initial=0),
            "noise": float(params.noise), "off": float(params.off_module), "map_acc": float(np.mean(hits))}
