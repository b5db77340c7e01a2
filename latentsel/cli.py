"""The ``latentsel`` command line. The only module that knows about all the others."""
from __future__ import annotations

import argparse
import sys
import traceback

from latentsel._argtypes import at_least as _at_least
from latentsel._argtypes import nonneg_int as _nonneg_int
from latentsel._argtypes import positive_float as _positive_float


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------
def cmd_world(args) -> int:
    from latentsel.world import default_world

    world = default_world()
    history = ["abcd", "xyz", "pqrstu"]
    print(f"alphabet: {world.alphabet} (A = {world.n_chars}), max_len = {world.max_len}, "
          f"modules = {world.n_routes} routings x {world.n_skills} skills = {world.n_modules}")
    print()
    print(f"{'#':>2}  {'skill':<12} abcde ->")
    for k, skill in enumerate(world.skills):
        print(f"{k:>2}  {skill.name:<12} {world.skill(k, 'abcde')}")
    print()
    print(f"{'#':>2}  {'routing':<22} H = {history} ->")
    for r, route in enumerate(world.routes):
        print(f"{r:>2}  {route.name:<22} {world.route(r, history)}")
    return 0


def cmd_generate(args) -> int:
    from latentsel.regimes import bigram_split, generate
    from latentsel.traces import write_traces
    from latentsel.world import default_world

    world = default_world()
    traces = generate(args.regime, args.n, args.seed, world=world, split=bigram_split(world.n_skills, args.split_seed))
    n = write_traces(args.output, traces, world=world)
    print(f"wrote {n} {args.regime} traces to {args.output}")
    return 0


def cmd_validate(args) -> int:
    from latentsel.traces import read_traces

    errors: list = []
    traces = read_traces(args.traces, skip_invalid=args.skip_invalid, errors=errors)
    for err in errors[: args.show]:
        print(f"skipped {err}", file=sys.stderr)
    depths = sorted({t.depth for t in traces})
    missing = sum(s is None for t in traces for s in t.steps)
    print(f"{args.traces}: {len(traces)} valid traces, depths {depths}, {missing} unobserved steps"
          + (f", {len(errors)} invalid records skipped" if args.skip_invalid else ""))
    return 0


def _read(args, world):
    from latentsel.traces import read_traces

    errors: list = []
    traces = read_traces(args.traces, world=world, skip_invalid=args.skip_invalid, errors=errors)
    if errors:
        print(f"skipped {len(errors)} invalid records (first: {errors[0]})", file=sys.stderr)
    return traces


def _devices_for_chains(chains: int) -> None:
    """One CPU device per NUTS chain (up to the cores) so that the chains run in parallel.
    XLA reads this when JAX starts, so it must come before anything imports JAX; a process
    that has JAX already keeps its devices and the chains run one after the other."""
    if "jax" in sys.modules:
        return
    import os

    from numpyro.util import set_host_device_count

    set_host_device_count(max(1, min(chains, os.cpu_count() or 1)))


def cmd_fit(args) -> int:
    if args.method == "nuts":
        _devices_for_chains(args.chains)
    import jax

    jax.config.update("jax_enable_x64", True)  # the inference runs in float64 throughout
    from latentsel.fitting import fit_traces, write_fit
    from latentsel.world import default_world

    world = default_world()
    traces = _read(args, world)
    fit = fit_traces(traces, world, args.model, args.method, max_iter=args.max_iter, tol=args.tol, guide=args.guide,
                     steps=args.steps, lr=args.lr, warmup=args.warmup, samples=args.samples, chains=args.chains,
                     seed=args.seed, backend=args.backend, batch=args.batch,
                     amortized_em_traces=args.amortized_em_traces, estimator=args.estimator)
    write_fit(args.out, traces, fit, world)
    rec = fit["record"]
    print(f"{args.model}/{args.method}: {rec['n_traces']} traces, log evidence at the estimate "
          f"{rec['log_evidence']:.6f}; {_fit_detail(rec)}")
    if args.method == "nuts":
        _print_nuts_summary(rec["nuts"])
    written = ["fit.json", "posterior.jsonl"] + (["samples.npz"] if args.method == "nuts" else [])
    print(f"wrote {', '.join(f'{args.out}/{name}' for name in written)}")
    return 0


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


def cmd_simulate(args) -> int:
    from latentsel.fitting import read_params
    from latentsel.models.params import default_params
    from latentsel.simulate import simulate
    from latentsel.traces import write_traces
    from latentsel.world import default_world

    world = default_world()
    prompts = _read(args, world)
    if args.params:
        params = read_params(args.params, args.model, world)
    else:
        params = default_params(args.model, world.n_routes, world.n_skills, fidelity=args.fidelity,
                                noise=args.noise, off_module=args.off_module)
    traces = simulate(prompts, params, args.model, world, seed=args.seed, hide=args.hide)
    write_traces(args.output, traces, world=world)
    print(f"wrote {len(traces)} traces simulated from the {args.model} model to {args.output}")
    return 0


def cmd_demo(args) -> int:
    _devices_for_chains(2)
    from latentsel.demo import run_demo

    import jax

    jax.config.update("jax_enable_x64", True)
    run_demo(out=args.out, n=args.n, seed=args.seed, sizes=args.sizes, seeds=args.seeds, nuts_max=args.nuts_max,
             nuts_draws=args.nuts_draws, sbc_reps=args.sbc, corpora=args.corpora, policy_traces=args.policy_traces,
             nuts_traces=args.nuts_traces, jobs=args.jobs)
    return 0


# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from latentsel import __version__
    from latentsel.regimes import REGIMES

    parser = _Parser(prog="latentsel", description="The hierarchical latent selection model of reasoning traces.")
    parser.add_argument("--version", action="version", version=f"latentsel {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="the embedded end-to-end run (minutes on a laptop CPU)")
    p.add_argument("--out", default="latentsel-demo", help="output folder (default: %(default)s)")
    p.add_argument("--n", type=_nonneg_int, default=2000, help="golden traces per data regime (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=_at_least(1), nargs="+", default=[100, 300, 1000], metavar="N",
                   help="trace counts of the identify sweep (default: %(default)s)")
    p.add_argument("--seeds", type=_nonneg_int, nargs="+", default=[0, 1], metavar="SEED",
                   help="seeds of the identify sweep (default: %(default)s)")
    p.add_argument("--nuts-max", type=_nonneg_int, default=100,
                   help="NUTS cross-check of identify where N is at most this (default: %(default)s)")
    p.add_argument("--nuts-draws", type=_at_least(4), default=100,
                   help="NUTS warm-up and kept draws per chain (default: %(default)s)")
    p.add_argument("--sbc", type=_nonneg_int, default=100, help="SBC replications (default: %(default)s)")
    p.add_argument("--corpora", default=None,
                   help="folder of policy corpora (default: the shipped CPU-run corpora of the checkout)")
    p.add_argument("--policy-traces", type=_at_least(1), default=400,
                   help="traces of each policy corpus to fit (default: %(default)s)")
    p.add_argument("--nuts-traces", type=_nonneg_int, default=150,
                   help="policy traces for the NUTS diagnostics; 0 skips them (default: %(default)s)")
    p.add_argument("--jobs", type=_at_least(1), default=2, help="worker processes (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("world", help="print the module table of the default world")
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("generate", help="write seeded golden traces of a data regime")
    p.add_argument("--regime", required=True, choices=list(REGIMES))
    p.add_argument("--n", type=_nonneg_int, required=True, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the skill-bigram split (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.jsonl, or .jsonl.gz)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fit", help="fit the latent model to a trace file")
    p.add_argument("traces", help="trace file (.jsonl or .jsonl.gz)")
    p.add_argument("--model", default="modular", choices=["modular", "entangled", "grammar"])
    p.add_argument("--method", default="em", choices=["em", "svi", "nuts", "amortized"],
                   help="em: MAP by EM; svi: TraceEnum_ELBO with an AutoDelta or AutoNormal guide; "
                        "nuts: posterior draws; amortized: θ by EM on a subset, then an inference network "
                        "for every step (--backend pyro) (default: %(default)s)")
    p.add_argument("--backend", default="numpyro", choices=["numpyro", "pyro"],
                   help="numpyro: em, svi, nuts; pyro: svi, amortized (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder for fit.json and posterior.jsonl (nuts: samples.npz)")
    p.add_argument("--max-iter", type=_nonneg_int, default=500, help="EM E-steps at most (default: %(default)s)")
    p.add_argument("--tol", type=float, default=1e-8, help="relative tolerance on the EM objective")
    p.add_argument("--guide", default="delta", choices=["delta", "normal"], help="SVI guide (default: %(default)s)")
    p.add_argument("--steps", type=_at_least(1), default=2000,
                   help="SVI / amortized training steps (default: %(default)s)")
    p.add_argument("--batch", type=_at_least(1), default=256,
                   help="amortized: traces per minibatch (default: %(default)s)")
    p.add_argument("--estimator", default="enum", choices=["enum", "tracegraph"],
                   help="amortized: the ELBO gradient; enum: TraceEnum_ELBO over the guide's sites (exact under q), "
                        "tracegraph: TraceGraph_ELBO score-function gradients with baselines, far slower to "
                        "converge over the 240 modules of the default world (default: %(default)s)")
    p.add_argument("--amortized-em-traces", type=_at_least(1), default=10_000,
                   help="amortized: traces of the EM fit of θ, drawn at random (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="Adam step size: SVI's initial one (default 0.05), the amortized network's (default 0.02)")
    p.add_argument("--warmup", type=_nonneg_int, default=500, help="NUTS warm-up draws per chain (default: %(default)s)")
    p.add_argument("--samples", type=_at_least(4), default=500, help="NUTS draws per chain (default: %(default)s)")
    p.add_argument("--chains", type=_at_least(1), default=2, help="NUTS chains (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of SVI and NUTS (default: %(default)s)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and count them")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("simulate", help="simulate traces from the latent model for the prompts of a trace file")
    p.add_argument("traces", help="prompts: a trace file whose inputs and programs are used")
    p.add_argument("--model", default="modular", choices=["modular", "entangled", "grammar"])
    p.add_argument("--params", help="a fit.json to take the parameters from (default: near-faithful)")
    p.add_argument("--fidelity", type=float, default=0.9, help="mass on the intended module (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--off-module", type=float, default=0.02)
    p.add_argument("--hide", type=_nonneg_int, nargs="*", default=[], metavar="STEP",
                   help="1-based steps to leave unobserved (compressed traces)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and count them")
    p.add_argument("-o", "--output", required=True, help="trace file to write")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("validate", help="check a trace file and summarize it")
    p.add_argument("traces", help="trace file (.jsonl or .jsonl.gz)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and count them")
    p.add_argument("--show", type=_nonneg_int, default=5, help="skipped records to print (default: %(default)s)")
    p.set_defaults(func=cmd_validate)

    from latentsel.cli_experiments import add_commands as add_experiments
    from latentsel.policy.cli import add_commands

    add_experiments(sub)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("latentsel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, KeyError) and message.startswith(("'", '"')):
                message = message[1:-1]
            print(f"latentsel {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
