"""Bring your own world and traces: define skills and routings, write traces in the trace
format, read them back in that world and fit the HLSM to them.

    python examples/own_world.py --n 1500 --out own-world
    latentsel fit own-world/traces.jsonl.gz --world examples/own_world.py:WORLD --out own-world/fit
"""
import argparse
from pathlib import Path

import numpy as np

import latentsel as ls
from latentsel import Route, Skill, World
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate


def _remove_vowels(s, alphabet):
    return "".join(c for c in s if c not in "aeiou") or s


WORLD = World(
    skills=(Skill("reverse", lambda s, a: s[::-1]), Skill("double", lambda s, a: s + s),
            Skill("remove_vowels", _remove_vowels), Skill("rotl", lambda s, a: s[1:] + s[:1]),
            Skill("first_half", lambda s, a: s[: (len(s) + 1) // 2])),
    # `reads` says which history entries a routing can read: exact inference with hidden steps
    # uses it; leaving it out is always exact, only slower
    routes=(Route("prev", lambda h: h[-1], reads=lambda t: (t - 1,)),
            Route("input", lambda h: h[0], reads=lambda t: (0,)),
            Route("cat", lambda h: h[-1] + h[0], reads=lambda t: (t - 1, 0))),
    alphabet="abcdefghij", max_len=12)


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # your traces would come from your policy; here they are simulated with a known confusion
    skill_exec = np.eye(WORLD.n_skills)
    v, r = WORLD.skill_index("remove_vowels"), WORLD.skill_index("reverse")
    skill_exec[v, v], skill_exec[v, r] = 0.7, 0.3
    truth = ls.ModularParams(np.eye(WORLD.n_routes), skill_exec, 0.01, 0.01)
    prompts = generate("eval-seen", args.n, seed=args.seed, world=WORLD)
    path = out / "traces.jsonl.gz"
    ls.write_traces(path, simulate(prompts, truth, "modular", WORLD, seed=args.seed), world=WORLD)
    traces = ls.read_traces(path, world=WORLD)  # read in the default world, the first unknown name is an error
    fit = ls.fit(traces, "modular", "em", world=WORLD, progress=not args.no_progress)
    table = fit.execution_table()
    print(f"{len(traces)} traces of a world with {WORLD.n_routes} routings and {WORLD.n_skills} skills; "
          "remove_vowels was simulated to run as reverse 30% of the time:")
    rows = table[(table.kind == "skill") & (table.intended == "remove_vowels")]
    print(rows.sort_values("prob", ascending=False).round(3).to_string(index=False))
    fit.save(out / "fit")
    print(f"wrote {path} and {out / 'fit'}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500, help="traces (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the simulation")
    parser.add_argument("--out", default="own-world", help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    main(parser.parse_args())
