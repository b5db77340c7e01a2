"""``latentsel demo``: the embedded end-to-end run.

1. The data regimes: golden traces of every regime, run through the reference and the batch
   executor (they must agree), and how often a step's module is the only one consistent with it.
2. Identifiability: traces simulated from known parameters under the sft, rl, atomic and
   compressed regimes, fitted by EM (modular and entangled), checked against NUTS where N is
   small, with simulation-based calibration (:mod:`latentsel.experiments.sweeps`).
3. The policy corpora (the shipped CPU-run corpora; tiny CPU-trained ones when none are
   shipped): PSIS-LOO of modular against entangled, error attribution, NUTS diagnostics.
4. ``report.html`` with every figure and table.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from latentsel.analysis.claims import claim_verdicts
from latentsel.experiments.designs import default_design
from latentsel.experiments.identify_outputs import write_identify
from latentsel.experiments.policy_fits import (find_checkpoints, find_corpora, fit_policy_corpora, nuts_diagnostics,
                                               summary_lines)
from latentsel.experiments.sweeps import sbc, sweep
from latentsel.plots.report import retract_sections, write_report, write_section
from latentsel.traces import read_traces, write_traces
from latentsel.traces.consistency import consistent_modules
from latentsel.traces.regimes import PROMPT_REGIMES, bigram_split, generate
from latentsel.world import default_world

# the checkout's shipped CPU run: <checkout>/data/policy-cpu (this file is latentsel/experiments/demo.py)
SHIPPED_RUN = Path(__file__).resolve().parents[2] / "data" / "policy-cpu"
SHIPPED_CORPORA = SHIPPED_RUN / "corpora"
DEMO_POLICIES = ("sft", "sft+rl-compound")


def run_demo(out: str | Path = "latentsel-demo", n: int = 2000, seed: int = 0, *, sizes: Sequence[int] | None = None,
             seeds: Sequence[int] | None = None, nuts_max: int = 100, nuts_draws: int = 100, sbc_reps: int = 30,
             corpora: str | Path | None = None, policy_traces: int = 400, nuts_traces: int = 150,
             jobs: int = 2, progress: bool = True) -> dict:
    """Run the demo into ``out`` and print its summary; returns ``{"regimes", "identify", "policies",
    "report"}``. ``n``: golden traces per data regime; ``sizes``/``seeds``: the identify sweep
    (default: the default design's, :mod:`latentsel.experiments.designs`);
    ``policy_traces``: traces of each policy corpus fitted; ``nuts_traces``: traces of the NUTS
    diagnostics (0 skips it)."""
    out = Path(out)
    world = default_world()
    t_start = time.perf_counter()
    retract_sections(out)  # a demo stopped half-way leaves no section vouching for a mix of runs
    rows = _regimes(out / "regimes", world, n, seed, progress)
    write_section(out / "regimes", "Data regimes and module aliasing", order=5, text=[
        "Golden traces of every data regime, checked against the batch executor. 'unique' is the fraction of "
        f"steps whose module is the only one of the {world.n_modules} that reproduces the step; 'consistent' the "
        "median number of modules that do (aliasing no data can resolve)."], tables=[{
            "caption": "Data regimes", "columns": ["regime", "traces", "depth", "programs", "skills", "routings",
                                                   "mean step length", "unique", "consistent"],
            "rows": [[k, r["n"], r["depth"], r["programs"], r["skills"], r["routes"], r["mean_len"],
                      r["unique_step"], r["median_consistent"]] for k, r in rows.items()]}])

    t0 = time.perf_counter()
    design = default_design().restrict(sizes=sizes, seeds=seeds)
    design = design._replace(nuts_max=nuts_max, nuts_draws=nuts_draws, sbc_reps=sbc_reps)
    records = sweep(design, n_jobs=jobs, progress=progress)
    calib = sbc(design, n_jobs=jobs, progress=progress)
    verdicts = claim_verdicts(records, design.claims)
    write_identify(out / "identify", records, {"sizes": sizes and list(sizes), "seeds": seeds and list(seeds),
                                               "nuts_max": nuts_max, "nuts_draws": nuts_draws, "sbc": sbc_reps},
                   world, design=design, sbc=calib, verdicts=verdicts)
    print(f"identify: {len(records)} fits in {time.perf_counter() - t0:.0f} s")
    for name, res in calib.items():
        failed = [p for p, bad in zip(res["parameters"], res["failed"]) if bad]
        print(f"  SBC {', '.join(res['regimes'])}: " + (f"FAILED on {', '.join(failed)}" if failed else "every quantity passes"))
    for v in verdicts:
        print(f"  {v['label']}: {v['verdict'].upper()}: {v['text']}")

    t0 = time.perf_counter()
    folder = Path(corpora) if corpora is not None else SHIPPED_CORPORA
    if corpora is None and not folder.is_dir():
        folder = _train_tiny_policies(out / "policy-run", seed, progress)
    found = find_corpora(folder, DEMO_POLICIES if corpora is None and folder == SHIPPED_CORPORA else None)
    shipped = folder == SHIPPED_CORPORA
    checkpoints = (find_checkpoints(SHIPPED_RUN / "policies", sorted({p for p, _ in found}))
                   if shipped and (SHIPPED_RUN / "policies").is_dir() else None)
    policies = fit_policy_corpora(found, out / "policies", world, max_traces=policy_traces, seed=seed,
                                  checkpoints=checkpoints, progress=progress)
    print(f"policy corpora ({folder}): {len(found)} fitted in {time.perf_counter() - t0:.0f} s")
    print("\n".join("  " + line for line in summary_lines(policies)))
    for line in policies["warnings"]:
        print(f"  warning: {line}")
    if nuts_traces:
        key = next((k for k in sorted(found) if k[1] == "seen"), sorted(found)[0])
        res = nuts_diagnostics(read_traces(found[key], world=world), world, out / "diagnostics",
                               label=f"the {key[0]} policy ({key[1]})", n_traces=nuts_traces, warmup=nuts_draws,
                               samples=nuts_draws, seed=seed, progress=False)
        print(f"NUTS diagnostics on {res['n_traces']} traces of {key[0]}.{key[1]}: max R-hat {res['max_r_hat']:.3f}, "
              f"min bulk ESS {res['min_ess_bulk']:.0f}, {res['divergences']} divergences")
        for flag in res["flags"]:
            print(f"  {flag}")
    report = write_report(out, title="latentsel demo")
    print(f"wrote {report} ({time.perf_counter() - t_start:.0f} s in all)")
    return {"regimes": rows, "identify": records, "policies": policies, "report": report}


def _train_tiny_policies(out: Path, seed: int, progress: bool) -> Path:
    """Corpora of policies trained here on the CPU, for an installation without the shipped ones."""
    # torch loads only when the demo has to train its own policies
    from latentsel.policy.protocol import run_protocol

    print(f"no shipped policy corpora at {SHIPPED_CORPORA}: training tiny CPU policies into {out} "
          "(a smoke run; `latentsel protocol --size cpu` trains real ones)")
    run_protocol(out, size="tiny", seed=seed, progress=progress, eval_n=16, corpus_n=64)
    return out / "corpora"


def _regimes(out: Path, world, n: int, seed: int, progress: bool) -> dict:
    """Generate every regime, round-trip it through a file and check the golden steps."""
    split = bigram_split(world.n_skills, seed=0)
    rows = {}
    for regime in tqdm(PROMPT_REGIMES, desc="regimes", unit="regime", disable=not progress):
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
            "depth": "–".join(map(str, PROMPT_REGIMES[regime].depths)),
            "programs": len({tuple(t.program) for t in traces}),
            "skills": len({k for t in traces for _, k in t.program}),
            "routes": len({r for t in traces for r, _ in t.program}),
            "mean_len": float(np.mean([len(s) for t in traces for s in t.steps])),
            "unique_step": float(np.mean(n_consistent == 1)),
            "median_consistent": float(np.median(n_consistent)),
            "seconds": time.perf_counter() - t0,
        }
    return rows
