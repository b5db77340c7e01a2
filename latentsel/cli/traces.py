"""Commands on the world and on trace files: ``world``, ``generate``, ``validate``, ``simulate``.

JAX-free: none of them runs inference.
"""
from __future__ import annotations

import sys

from latentsel.cli._argtypes import add_world, nonneg_int, world_of
from latentsel.models.registry import MODELS, default_params
from latentsel.traces import read_traces, write_traces
from latentsel.traces.format import MAX_HIDDEN_RUN
from latentsel.traces.regimes import PROMPT_REGIMES, bigram_split, generate
from latentsel.traces.simulate import hidden_steps, simulate

__all__ = ["add_commands", "read_corpus"]


def cmd_world(args) -> int:
    world = world_of(args)

    def text(start: int, n: int) -> str:  # example strings in the world's own alphabet
        return "".join(world.alphabet[(start + i) % world.n_chars] for i in range(n))[: world.max_len]

    x, history = text(0, 5), [text(0, 4), text(23, 3), text(15, 6)]
    print(f"alphabet: {world.alphabet} (A = {world.n_chars}), max_len = {world.max_len}, "
          f"modules = {world.n_routes} routings x {world.n_skills} skills = {world.n_modules}")
    print()
    w_skill = max(12, *(len(name) + 1 for name in world.skill_names))
    w_route = max(22, *(len(name) + 1 for name in world.route_names))
    print(f"{'#':>2}  {'skill':<{w_skill}} {x} ->")
    for k, skill in enumerate(world.skills):
        print(f"{k:>2}  {skill.name:<{w_skill}} {world.skill(k, x)}")
    print()
    print(f"{'#':>2}  {'routing':<{w_route}} H = {history} ->")
    for r, route in enumerate(world.routes):
        print(f"{r:>2}  {route.name:<{w_route}} {world.route(r, history)}")
    return 0


def cmd_generate(args) -> int:
    world = world_of(args)
    traces = generate(args.regime, args.n, args.seed, world=world, split=bigram_split(world.n_skills, args.split_seed))
    n = write_traces(args.output, traces, world=world)
    print(f"wrote {n} {args.regime} traces to {args.output}")
    return 0


def cmd_validate(args) -> int:
    errors: list = []
    traces = read_traces(args.traces, world=world_of(args), skip_invalid=args.skip_invalid, errors=errors)
    for err in errors[: args.show]:
        print(f"skipped {err}", file=sys.stderr)
    depths = sorted({t.depth for t in traces})
    missing = sum(s is None for t in traces for s in t.steps)
    print(f"{args.traces}: {len(traces)} valid traces, depths {depths}, {missing} unobserved steps"
          + (f", {len(errors)} invalid records skipped" if args.skip_invalid else ""))
    return 0


def read_corpus(args, world):
    """The traces of ``args.traces``, invalid records skipped and counted with ``--skip-invalid``."""
    errors: list = []
    traces = read_traces(args.traces, world=world, skip_invalid=args.skip_invalid, errors=errors)
    if errors:
        print(f"skipped {len(errors)} invalid records (first: {errors[0]})", file=sys.stderr)
    return traces


def cmd_simulate(args) -> int:
    world = world_of(args)
    prompts = read_corpus(args, world)
    hidden_steps(args.hide, prompts, name="--hide")  # before any work, in the command's own terms
    if args.params:
        # the fit.json reader loads JAX: only when --params is given
        from latentsel.analysis.results import read_params

        params = read_params(args.params, args.model, world)
    else:
        params = default_params(args.model, world.n_routes, world.n_skills, fidelity=args.fidelity,
                                noise=args.noise, off_module=args.off_module)
    traces = simulate(prompts, params, args.model, world, seed=args.seed, hide=args.hide)
    write_traces(args.output, traces, world=world)
    print(f"wrote {len(traces)} traces simulated from the {args.model} model to {args.output}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("world", help="print the module table of the default world")
    add_world(p)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("generate", help="write seeded golden traces of a data regime")
    p.add_argument("--regime", required=True, choices=list(PROMPT_REGIMES),
                   help="prompt regime: which programs, depths and skill bigrams (DESIGN §7)")
    p.add_argument("--n", type=nonneg_int, required=True, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the skill-bigram split (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.jsonl, or .jsonl.gz)")
    add_world(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("validate", help="check a trace file and summarize it")
    p.add_argument("traces", help="trace file (.jsonl or .jsonl.gz)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and count them")
    p.add_argument("--show", type=nonneg_int, default=5, help="skipped records to print (default: %(default)s)")
    add_world(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("simulate", help="simulate traces from the latent model for the prompts of a trace file")
    p.add_argument("traces", help="prompts: a trace file whose inputs and programs are used")
    p.add_argument("--model", default="modular", choices=list(MODELS),
                   help="; ".join(f"{name}: {spec.summary}" for name, spec in MODELS.items()))
    p.add_argument("--params", help="a fit.json to take the parameters from (default: near-faithful)")
    p.add_argument("--fidelity", type=float, default=0.9, help="mass on the intended module (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.02, help="probability that an on-module character is miscopied")
    p.add_argument("--off-module", type=float, default=0.02, help="probability that a step is off-module")
    p.add_argument("--hide", type=nonneg_int, nargs="*", default=[], metavar="STEP",
                   help="1-based steps to leave unobserved (compressed traces); each within every "
                        f"trace's depth, at most {MAX_HIDDEN_RUN} in a row before an observed step")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated selections and noise")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records and count them")
    p.add_argument("-o", "--output", required=True, help="trace file to write")
    add_world(p)
    p.set_defaults(func=cmd_simulate)
