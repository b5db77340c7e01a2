"""The ``fit`` command: a trace file fitted by one method, ``fit.json`` and ``posterior.jsonl``.

JAX and the fitting code load inside the command (``latentsel --help`` stays fast); the
choices come from the JAX-free registries.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from latentsel._io import locked_folder
from latentsel.analysis.options import (SHARD_BACKENDS, FIT_BACKENDS, METHODS, AmortizedOptions, EMOptions,
                                        NUTSOptions, SVIOptions)
from latentsel.cli._argtypes import add_world, at_least, nonneg_int, positive_float, world_of
from latentsel.cli.traces import read_corpus
from latentsel.models.registry import MODELS
from latentsel.traces.failures import read_prefixes

__all__ = ["add_commands", "fit_options_from_args"]

DEFAULT_BACKEND = "numpyro"


def fit_options_from_args(args):
    """The options NamedTuple of ``args.method`` from the command's flags; ``ValueError`` for a
    method the backend does not run."""
    backend, method = args.backend, args.method
    runs_on = METHODS[method].backends
    if backend not in runs_on:
        if backend == DEFAULT_BACKEND:  # the flag was probably not given: say which one to give
            raise ValueError(f"method {method} runs on the {runs_on[0]} backend (--backend {runs_on[0]})")
        fitters = " or ".join(name for name, cls in METHODS.items() if backend in cls.backends)
        raise ValueError(f"method {method} runs on the {' or '.join(runs_on)} backend; the {backend} backend fits "
                         f"by {fitters}")
    em = EMOptions(max_iter=args.max_iter, tol=args.tol)
    if method == "em":
        return em.check()
    if method == "svi":
        lr = SVIOptions().lr if args.lr is None else args.lr
        return SVIOptions(guide=args.guide, steps=args.steps, lr=lr, seed=args.seed, backend=backend).check()
    if method == "nuts":
        return NUTSOptions(warmup=args.warmup, samples=args.samples, chains=args.chains, seed=args.seed).check()
    lr = AmortizedOptions().lr if args.lr is None else args.lr
    return AmortizedOptions(em=em, em_traces=args.amortized_em_traces, estimator=args.estimator, steps=args.steps,
                            batch=args.batch, lr=lr, seed=args.seed).check()


def jax_devices(args) -> int:
    """CPU devices the command wants when JAX starts: one per NUTS chain."""
    return args.chains if args.method == "nuts" else 1


def check_out(out: str) -> None:
    """``ValueError`` naming ``--out`` unless it is a folder or can be made one: said before the
    fit runs, not after."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    above = path
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"--out {out}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {above} is not writable")


def _streamed(args) -> bool:
    """Is this a streamed or sharded fit? ``ValueError`` for a combination that is neither."""
    if args.backend in SHARD_BACKENDS or args.stream:
        if args.backend in SHARD_BACKENDS and args.method != "em":
            raise ValueError(f"--backend {args.backend} fits by em only, not --method {args.method}")
        if args.stream and args.method not in ("em", "svi"):
            raise ValueError(f"--stream fits by em or svi (on minibatches), not --method {args.method}")
        if args.stream and args.method == "svi" and args.backend != "numpyro":
            raise ValueError(f"--stream --method svi runs on the numpyro backend, not --backend {args.backend}")
        if args.backend in SHARD_BACKENDS and args.stream:
            raise ValueError(f"--stream reads the files here; --backend {args.backend} reads them on the workers: "
                             "give one of the two")
        if args.stream and args.scheduler is not None:
            raise ValueError("--scheduler is for --backend dask|ray; --stream fits here")
        if args.backend in SHARD_BACKENDS and args.cache is not None:
            raise ValueError(f"--cache is for --stream; with --backend {args.backend} each worker keeps its shard")
        return True
    for flag, value in (("--scheduler", args.scheduler), ("--cache", args.cache), ("--max-depth", args.max_depth)):
        if value is not None:
            raise ValueError(f"{flag} is for a streamed or sharded fit (--stream, or --backend dask|ray)")
    if len(args.traces) > 1:
        raise ValueError(f"{len(args.traces)} trace files: several files are fitted with --stream (read here in "
                         "chunks) or --backend dask|ray (one shard a file, on a cluster)")
    return False


def cmd_fit_streamed(args) -> int:
    """EM on trace files too large for memory: read in chunks here, or sharded over a cluster; or
    SVI on minibatches of the chunks read here."""
    from latentsel.analysis.options import EMOptions

    options = fit_options_from_args(args) if args.method == "svi" else EMOptions(max_iter=args.max_iter,
                                                                                 tol=args.tol).check()
    check_out(args.out)
    for path in args.traces:
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such trace file")
    if args.cache is not None and Path(args.cache).exists() and any(Path(args.cache).iterdir()):
        raise ValueError(f"--cache {args.cache}: not empty; give an empty or a new folder")
    # the fitting code loads JAX: after the checks that need none
    from latentsel.analysis.fitting import fit_corpus

    world = world_of(args)
    with locked_folder(args.out):
        if args.backend in SHARD_BACKENDS:
            from latentsel.analysis.sharded import ShardedCorpus  # loads JAX, as above

            where = args.scheduler or f"a local cluster of {args.workers} workers"
            print(f"reading {len(args.traces)} shards on {where} ({args.backend})", flush=True)
            corpus = ShardedCorpus(args.traces, args.world, args.model, backend=args.backend, address=args.scheduler,
                                   workers=args.workers, max_depth=args.max_depth, skip_invalid=args.skip_invalid)
        else:
            from latentsel.analysis.streaming import StreamedCorpus  # loads JAX, as above

            print(f"reading {len(args.traces)} trace files in chunks, statistics built by {args.workers} processes",
                  flush=True)
            corpus = StreamedCorpus(args.traces, args.world, args.model, cache=args.cache, max_depth=args.max_depth,
                                    skip_invalid=args.skip_invalid, progress=True,
                                    workers=args.workers)
        with corpus:
            skipped = (sum(len(s["skipped"]) for s in corpus.shards) if hasattr(corpus, "shards")
                       else len(corpus.skipped))
            if skipped:
                print(f"skipped {skipped} invalid records", file=sys.stderr)
            plan = _plan(options, corpus.n_traces) + (f" on minibatches of {args.batch} traces"
                                                      if options.method == "svi" else "")
            print(f"fitting {corpus.n_traces} traces, {args.model} model: {plan}", flush=True)
            fit = fit_corpus(corpus, world, args.model, options, batch=args.batch)
            fit.save(args.out, lock=False)
    rec = fit.record()
    print(f"{args.model}/{options.method}: {rec['n_traces']} traces, log evidence at the estimate {rec['log_evidence']:.6f}; "
          f"{_fit_detail(rec)}")
    print(f"wrote {Path(args.out) / 'fit.json'} (no posterior.jsonl: a streamed fit keeps no per-step posterior; "
          "score chosen traces with `latentsel fit` on them)")
    return 0


def cmd_fit(args) -> int:
    if _streamed(args):
        return cmd_fit_streamed(args)
    args.traces = args.traces[0]
    options = fit_options_from_args(args)
    check_out(args.out)
    # the fitting code loads JAX: after the checks that need none
    from latentsel.analysis.fitting import fit_traces

    world = world_of(args)
    traces = read_corpus(args, world)
    traces, cut, left_out = read_prefixes(traces)
    if cut or left_out:
        print(f"note: {cut + left_out} malformed completions: {cut} fitted on the steps read before their first "
              f"failure, {left_out} with no step read left out (their failures are not hidden steps)", flush=True)
    with locked_folder(args.out):  # a second run on this --out fails before it fits, not after
        print(f"fitting {len(traces)} traces, {args.model} model: {_plan(options, len(traces))}", flush=True)
        fit = fit_traces(traces, world, args.model, options)
        fit.save(args.out, lock=False)
    rec = fit.record()
    print(f"{args.model}/{args.method}: {rec['n_traces']} traces, log evidence at the estimate "
          f"{rec['log_evidence']:.6f}; {_fit_detail(rec)}")
    if args.method == "nuts":
        _print_nuts_summary(rec["nuts"])
    written = ["fit.json", "posterior.jsonl"] + (["samples.npz"] if args.method == "nuts" else [])
    print(f"wrote {', '.join(str(Path(args.out) / name) for name in written)}")
    return 0


def _plan(options, n: int) -> str:
    """What the fit will run, said before it runs."""
    if options.method == "em":
        return f"EM, at most {options.max_iter} iterations"
    if options.method == "svi":
        return f"{options.steps} SVI steps ({options.guide} guide, {options.backend})"
    if options.method == "nuts":
        return f"NUTS, {options.chains} chains x ({options.warmup} warm-up + {options.samples}) draws"
    em_n = min(n, options.em_traces)
    held = options.held_out(n)
    return (f"θ by EM on {em_n} of the {n} traces (--amortized-em-traces), then {options.steps} steps of "
            f"{options.batch} traces of the network; {held} held-out traces measure it against the exact posterior")


def _fit_detail(rec: dict) -> str:
    if rec["method"] == "em":
        return (f"{rec['iterations']} iterations ({rec['e_steps']} E-steps)"
                f"{'' if rec['converged'] else ' (not converged)'}")
    if rec["method"] == "svi":
        return f"{rec['guide']} guide, {rec['steps']} steps, final loss {rec['losses'][-1]:.6g}"
    if rec["method"] == "amortized":
        ev = rec["evaluation"]
        held = (f"; on {ev['held_out_traces']} held-out traces KL(exact ‖ q) {ev['kl_exact_q']:.4g} nats/step, "
                f"MAP agreement {ev['map_agreement']:.3f}" if ev["held_out_traces"] else "")
        return (f"θ by EM on {rec['em']['traces']} traces, network trained {rec['steps']} steps of {rec['batch']} "
                f"traces on {rec['device']}{held}")
    s = rec["nuts"]
    return (f"{s['chains']} chains x {s['draws']} draws ({rec['chain_method']}), "
            f"{s['divergences']} divergences, mean acceptance {s['accept_prob']:.3f}")


def _print_nuts_summary(s: dict) -> None:
    print(f"{'site':<16} {'max R-hat':>10} {'min ESS':>9} {'median ESS':>11}")
    for name, d in s["sites"].items():
        print(f"{name:<16} {d['r_hat_max']:>10.3f} {d['ess_min']:>9.1f} {d['ess_median']:>11.1f}")
    worst = max(d["r_hat_max"] for d in s["sites"].values())
    if worst > 1.01 or s["divergences"]:
        print(f"warning: max R-hat {worst:.3f}, {s['divergences']} divergences: run longer chains (--warmup, --samples) "
              "before trusting the draws")


def add_commands(sub) -> None:
    p = sub.add_parser("fit", help="fit the latent model to a trace file")
    p.add_argument("traces", nargs="+", metavar="TRACES",
                   help="trace file (.jsonl or .jsonl.gz); several with --stream or --backend dask|ray")
    p.add_argument("--model", default="modular", choices=list(MODELS),
                   help="; ".join(f"{name}: {spec.summary}" for name, spec in MODELS.items()))
    p.add_argument("--method", default="em", choices=list(METHODS),
                   help="em: MAP by EM; svi: TraceEnum_ELBO with an AutoDelta or AutoNormal guide; "
                        "nuts: posterior draws; amortized: θ by EM on a subset, then an inference network "
                        "for every step (--backend pyro) (default: %(default)s)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(FIT_BACKENDS) + list(SHARD_BACKENDS),
                   help="numpyro: em, svi, nuts; pyro: svi, amortized; dask, ray: em with one shard a trace file, "
                        "each read and kept by a worker of a cluster (default: %(default)s)")
    p.add_argument("--stream", action="store_true",
                   help="em on trace files too large for memory: read here in chunks, statistics kept on disk "
                        "(--cache); writes fit.json only")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="--stream: an empty folder for the statistics (default: a temporary folder, removed after)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="--backend dask|ray: a running cluster (tcp://host:8786 for Dask, ray://host:10001 or auto "
                        "for Ray); default: a local cluster of --workers processes")
    p.add_argument("--workers", type=at_least(1), default=2,
                   help="--stream: processes building the statistics; --backend dask|ray without --scheduler: "
                        "processes of the local cluster (default: %(default)s)")
    p.add_argument("--max-depth", type=at_least(1), default=None,
                   help="--stream, --backend dask|ray: the deepest trace accepted (default: 1024 steps)")
    p.add_argument("--out", required=True, help="output folder for fit.json and posterior.jsonl (nuts: samples.npz)")
    p.add_argument("--max-iter", type=nonneg_int, default=500, help="EM E-steps at most (default: %(default)s)")
    p.add_argument("--tol", type=float, default=1e-8, help="relative tolerance on the EM objective")
    p.add_argument("--guide", default="delta", choices=["delta", "normal"], help="SVI guide (default: %(default)s)")
    p.add_argument("--steps", type=at_least(1), default=2000,
                   help="SVI / amortized training steps (default: %(default)s)")
    p.add_argument("--batch", type=at_least(1), default=256,
                   help="amortized, and svi with --stream: traces per minibatch (default: %(default)s)")
    p.add_argument("--estimator", default="enum", choices=["enum", "tracegraph"],
                   help="amortized: the ELBO gradient; enum: TraceEnum_ELBO over the guide's sites (exact under q), "
                        "tracegraph: TraceGraph_ELBO score-function gradients with baselines, far slower to "
                        "converge over the 240 modules of the default world (default: %(default)s)")
    p.add_argument("--amortized-em-traces", type=at_least(1), default=10_000,
                   help="amortized: traces of the EM fit of θ, drawn at random (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam step size: SVI's initial one (default 0.05), the amortized network's (default 0.02)")
    p.add_argument("--warmup", type=nonneg_int, default=500, help="NUTS warm-up draws per chain (default: %(default)s)")
    p.add_argument("--samples", type=at_least(4), default=500, help="NUTS draws per chain (default: %(default)s)")
    p.add_argument("--chains", type=at_least(1), default=2, help="NUTS chains (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of SVI and NUTS (default: %(default)s)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and count them")
    add_world(p)
    p.set_defaults(func=cmd_fit, jax_devices=jax_devices)
