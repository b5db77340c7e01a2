"""Commands of the experiments: ``demo``, ``identify``, ``analyze`` and ``report``.

JAX and the experiment code load inside the commands (``latentsel --help`` stays fast); the
choices come from the JAX-free tables of :mod:`latentsel.experiments.designs`.
"""
from __future__ import annotations

import argparse
import time

from latentsel._io import locked_folder
from latentsel.cli._argtypes import add_world, at_least, nonneg_int, world_of
from latentsel.experiments.designs import IDENTIFY_MODELS, SWEEP_BACKENDS
from latentsel.traces import read_traces

__all__ = ["add_demo", "add_commands"]

def _names(choices):
    def parse(value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            what = f"unknown {bad[0]!r}" if bad else "an empty list"
            raise argparse.ArgumentTypeError(f"{what}: choose from {', '.join(choices)}, comma-separated")
        return names

    return parse


def _list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("an empty list")
    return names


def cmd_demo(args) -> int:
    from latentsel.experiments.demo import run_demo

    run_demo(out=args.out, n=args.n, seed=args.seed, sizes=args.sizes, seeds=args.seeds, nuts_max=args.nuts_max,
             nuts_draws=args.nuts_draws, sbc_reps=args.sbc, corpora=args.corpora, policy_traces=args.policy_traces,
             nuts_traces=args.nuts_traces, jobs=args.jobs)
    return 0


def cmd_identify(args) -> int:
    from latentsel.plots.report import retract_sections

    with locked_folder(args.out):  # a second run into this --out fails at once
        # a run stopped half-way leaves no section vouching for a mix; identify writes only its own
        retract_sections(args.out, recursive=False)
        return _identify(args)


def _identify(args) -> int:
    import shutil
    from pathlib import Path

    from latentsel.analysis.claims import claim_verdicts
    from latentsel.experiments.designs import load_design
    from latentsel.experiments.identify_outputs import posterior_checks, summary_rows, write_identify
    from latentsel.experiments.sweeps import done_tasks, sbc, sbc_tasks, sweep, sweep_tasks

    t0 = time.perf_counter()
    design = _design(args, load_design)
    cells = design.cells()
    print(f"identify: {design.source}: {len(cells)} tasks (regime x truth x N x seed, {len(design.models)} models "
          f"each, the largest N = {max(c[2] for c in cells)}), SBC on {len(design.sbc_groups())} data layout(s) x "
          f"{design.sbc_reps} replications of {design.sbc_traces} traces, on {args.jobs} {args.backend} worker(s)",
          flush=True)
    # every finished fit and SBC replication is saved here; it stays after the outputs are written,
    # so that a rerun (another figure, a larger sweep) redoes only what is new
    tasks_dir = Path(args.out) / ".tasks"
    if args.fresh and tasks_dir.exists():
        shutil.rmtree(tasks_dir)
    planned = sweep_tasks(design, world=args.world) + sbc_tasks(design, world=args.world)
    done = done_tasks(planned, tasks_dir)
    if done:
        print(f"identify: {done} of {len(planned)} tasks (fits and SBC replications) already done in {args.out}, "
              f"running {len(planned) - done}", flush=True)
    records = sweep(design, n_jobs=args.jobs, backend=args.backend, world=args.world, tasks_dir=tasks_dir)
    calib = sbc(design, n_jobs=args.jobs, backend=args.backend, world=args.world, tasks_dir=tasks_dir)
    verdicts = claim_verdicts(records, design.claims)
    config = {k: getattr(args, k) for k in ("design", "backend", "jobs", "world")}
    path = write_identify(args.out, records, config, world_of(args), design=design, sbc=calib, verdicts=verdicts,
                          exemplar_n=args.exemplar_n)
    for name, res in calib.items():
        failed = [p for p, bad in zip(res["parameters"], res["failed"]) if bad]
        print(f"SBC {', '.join(res['regimes'])}: " + (f"FAILED on {len(failed)} of {len(failed) + res['failed'].count(False)}: "
                                 f"{', '.join(failed)}" if failed else f"{len(res['parameters'])} quantities pass"))
    for check in posterior_checks(records, design):
        print(f"posterior {check['regime']} · {check['truth']}: {check['text']}")
    print(f"{'regime':<14} {'truth':<10} {'model':<10} {'N':>6} {'MAP acc':>8} {'class acc':>9} {'truth mass':>10} "
          f"{'class err':>9} {'coverage':>8} {'held-out Δ':>10}")
    for regime, truth, model, n, _, acc, cls, mass, err, cov, _, diff in summary_rows(records):
        diff = "-" if diff is None else f"{diff:+.3f}"
        print(f"{regime:<14} {truth:<10} {model:<10} {n:>6} {acc:>8.3f} {cls:>9.3f} {mass:>10.3f} {err:>9.3f} "
              f"{cov:>8.2f} {diff:>10}")
    for v in verdicts:
        print(f"{v['label']}: {v['verdict'].upper()}: {v['text']}")
    print(f"wrote {path} and figures under {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


def _design(args, load_design):
    """The design of ``--design`` with the command line's overrides."""
    design = load_design(args.design)
    design = design.restrict(regimes=args.regimes, truths=args.truths, sizes=args.sizes, seeds=args.seeds,
                             models=args.models)
    changes = {k: v for k, v in (("nuts_max", args.nuts_max), ("nuts_draws", args.nuts_draws),
                                 ("sbc_reps", args.sbc), ("sbc_traces", args.sbc_traces)) if v is not None}
    return design._replace(**changes)


def cmd_analyze(args) -> int:
    from latentsel.plots.report import retract_sections

    with locked_folder(args.out):  # a second run into this --out fails at once
        retract_sections(args.out)  # a run stopped half-way leaves no section vouching for a mix
        return _analyze(args)


def _analyze(args) -> int:
    import sys

    from latentsel.experiments.policy_fits import (FITTED_MODELS, find_checkpoints, find_corpora, fit_policy_corpora,
                                                   nuts_diagnostics, summary_lines)

    world = world_of(args)
    corpora = find_corpora(args.corpora, args.policies)
    checkpoints = find_checkpoints(args.checkpoints, sorted({p for p, _ in corpora})) if args.checkpoints else None
    print(f"analyze: {len(corpora)} corpora x {len(FITTED_MODELS)} models by EM"
          + (f", up to {args.max_traces} traces each" if args.max_traces else "")
          + (f"; NUTS on {args.nuts_traces} traces, 2 chains x ({args.nuts_draws} + {args.nuts_draws}) draws"
             if args.nuts_traces else ""), flush=True)
    result = fit_policy_corpora(corpora, args.out, world, draws=args.draws, max_traces=args.max_traces,
                                seed=args.seed, folds=args.folds, split_seed=args.split_seed,
                                entangle=not args.no_entanglement, checkpoints=checkpoints, resume=not args.fresh)
    if result["resumed"]:
        print(f"analyze: {result['resumed']} of {len(corpora)} corpora already fitted in {args.out}, read back")
    for line in result["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    print("\n".join(summary_lines(result)))
    if args.nuts_traces:
        key = next((k for k in sorted(corpora) if k[1] == "seen"), sorted(corpora)[0])
        traces = read_traces(corpora[key], world=world)
        res = nuts_diagnostics(traces, world, f"{args.out}/diagnostics", label=f"{key[0]} ({key[1]})",
                               n_traces=args.nuts_traces, warmup=args.nuts_draws, samples=args.nuts_draws,
                               seed=args.seed)
        print(f"NUTS on {res['n_traces']} traces of {key[0]}.{key[1]}: max R-hat {res['max_r_hat']:.3f}, "
              f"min bulk ESS {res['min_ess_bulk']:.0f}, {res['divergences']} divergences")
        for flag in res["flags"]:
            print(f"  {flag}")
    print(f"wrote {args.out}")
    return 0


def cmd_report(args) -> int:
    from latentsel.plots.report import write_report

    path = write_report(args.run_dir, out=args.output)
    print(f"wrote {path}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end run (minutes on a laptop CPU)")
    p.add_argument("--out", default="latentsel-demo", help="output folder (default: %(default)s)")
    p.add_argument("--n", type=nonneg_int, default=2000, help="golden traces per data regime (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the regimes' prompts")
    p.add_argument("--sizes", type=at_least(1), nargs="+", default=None, metavar="N",
                   help="trace counts of the identify sweep (default: the default design's)")
    p.add_argument("--seeds", type=nonneg_int, nargs="+", default=None, metavar="SEED",
                   help="seeds of the identify sweep (default: the default design's)")
    p.add_argument("--nuts-max", type=nonneg_int, default=100,
                   help="NUTS cross-check of identify where N is at most this (default: %(default)s)")
    p.add_argument("--nuts-draws", type=at_least(4), default=100,
                   help="NUTS warm-up and kept draws per chain (default: %(default)s)")
    p.add_argument("--sbc", type=nonneg_int, default=30, help="SBC replications per data layout (default: %(default)s)")
    p.add_argument("--corpora", default=None,
                   help="folder of policy corpora (default: the shipped CPU-run corpora of the checkout)")
    p.add_argument("--policy-traces", type=at_least(1), default=400,
                   help="traces of each policy corpus to fit (default: %(default)s)")
    p.add_argument("--nuts-traces", type=nonneg_int, default=150,
                   help="policy traces for the NUTS diagnostics; 0 skips them (default: %(default)s)")
    p.add_argument("--jobs", type=at_least(1), default=2, help="worker processes (default: %(default)s)")
    p.set_defaults(func=cmd_demo, jax_devices=lambda args: 2)  # the NUTS checks run 2 chains


def add_commands(sub) -> None:
    p = sub.add_parser("identify", help="identifiability experiments: a design of regimes x truths x N x seeds, "
                                        "with a verdict per claim")
    p.add_argument("--design", default=None, metavar="FILE",
                   help="a TOML design (default: the shipped one, latentsel/experiments/default_design.toml: copy "
                        "and extend it)")
    p.add_argument("--regimes", type=_list, default=None,
                   help="comma-separated regimes of the design to run (default: all its runs)")
    p.add_argument("--truths", type=_list, default=None, help="comma-separated truths of the design to run")
    p.add_argument("--sizes", type=at_least(1), nargs="+", default=None, metavar="N",
                   help="numbers of traces, replacing every run's")
    p.add_argument("--seeds", type=nonneg_int, nargs="+", default=None, metavar="SEED",
                   help="seeds, replacing every run's: each draws its own prompts and traces")
    p.add_argument("--models", type=_names(list(IDENTIFY_MODELS)), default=None, help="comma-separated models")
    p.add_argument("--nuts-max", type=nonneg_int, default=None,
                   help="run the NUTS check where N is at most this (default: the design's; 0: never)")
    p.add_argument("--nuts-draws", type=at_least(4), default=None, help="NUTS warm-up and kept draws per chain")
    p.add_argument("--sbc", type=nonneg_int, default=None, help="SBC replications per regime (0: none)")
    p.add_argument("--sbc-traces", type=at_least(1), default=None, help="traces per SBC replication")
    p.add_argument("--exemplar-n", type=at_least(1), default=None,
                   help="traces of the data sets drawn in the class and heatmap figures (default: the largest N, "
                        "at most 300)")
    p.add_argument("--jobs", type=at_least(1), default=2, help="parallel worker processes (default: %(default)s)")
    p.add_argument("--backend", choices=SWEEP_BACKENDS, default="loky",
                   help="joblib backend; ray or dask to run the sweep on a cluster (default: %(default)s)")
    p.add_argument("--out", required=True,
                   help="output folder (identify.json, sbc.json, figures/, and .tasks/: every finished fit and SBC "
                        "replication, kept so that a rerun into the same folder runs only the missing ones)")
    p.add_argument("--fresh", action="store_true",
                   help="remove the finished tasks in --out/.tasks and run every task again")
    add_world(p)
    p.set_defaults(func=cmd_identify, jax_devices=lambda args: 1)

    p = sub.add_parser("analyze", help="fit policy corpora: where every step went, the emission, a modularity test, "
                                       "policy differences, PSIS-LOO and NUTS diagnostics")
    p.add_argument("corpora", help="folder of POLICY.eval-SPLIT.jsonl.gz corpora (as `latentsel protocol` writes)")
    p.add_argument("--policies", type=lambda v: [x for x in v.split(",") if x], default=None,
                   help="comma-separated policies to fit (default: all found)")
    p.add_argument("--max-traces", type=at_least(1), default=None, help="first traces of each corpus to fit")
    p.add_argument("--draws", type=at_least(4), default=50, help="conjugate draws per chain for PSIS-LOO")
    p.add_argument("--nuts-traces", type=nonneg_int, default=200,
                   help="traces of one seen-split corpus for the NUTS diagnostics (0: skip)")
    p.add_argument("--nuts-draws", type=at_least(4), default=100, help="NUTS warm-up and kept draws per chain")
    p.add_argument("--seed", type=int, default=0, help="seed of the conjugate draws, the folds and NUTS")
    p.add_argument("--folds", type=at_least(2), default=5,
                   help="folds of the held-out choice of the emission (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the skill-bigram split the policies were trained with (default: %(default)s)")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="folder of POLICY.pt[.gz] checkpoints: check the fit's per-skill fidelity against each "
                        "policy's teacher-forced accuracy (data/policy-cpu/policies for the shipped corpora)")
    p.add_argument("--fresh", action="store_true",
                   help="refit every corpus (default: read back the corpora an earlier run into --out finished)")
    p.add_argument("--no-entanglement", action="store_true",
                   help="skip the entanglement rho of the hierarchical model (the slowest part of the modularity test)")
    p.add_argument("--out", required=True, help="output folder")
    add_world(p)
    p.set_defaults(func=cmd_analyze, jax_devices=lambda args: 1)

    p = sub.add_parser("report", help="write report.html from a run folder's sections")
    p.add_argument("run_dir", help="a folder written by demo, identify or analyze")
    p.add_argument("-o", "--output", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
