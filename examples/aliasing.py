"""Which modules reproduce a golden step? Aliasing in the default world.

Generates golden traces of a regime and counts, per step position, how many of the 240
modules reproduce the observed step exactly (teacher-forced history). A step reproduced by
several modules cannot be attributed to one of them from that step alone.

    python examples/aliasing.py --regime eval-ood --n 500
"""
import argparse

import numpy as np

import latentsel as ls
from latentsel.traces.consistency import consistent_modules
from latentsel.traces.regimes import PROMPT_REGIMES, generate


def main(args):
    world = ls.default_world()
    traces = generate(args.regime, args.n, args.seed, world=world)
    consistent = np.stack(consistent_modules(traces, world))  # [n, L, R, K]
    counts = consistent.reshape(*consistent.shape[:2], -1).sum(axis=-1)  # [n, L]
    print(f"{args.regime}: {args.n} traces of depth {counts.shape[1]}")
    print(f"{'step':>4} {'unique':>7} {'median':>7} {'max':>5}")
    for t in range(counts.shape[1]):
        c = counts[:, t]
        print(f"{t + 1:>4} {np.mean(c == 1):>7.3f} {np.median(c):>7.0f} {c.max():>5}")
    example = traces[0]
    print(f"\nexample {example.id}: input {example.input!r}")
    for t, ((r, k), y) in enumerate(zip(example.program, example.steps)):
        names = [world.module_name(m) for m in np.flatnonzero(consistent[0, t].reshape(-1))]
        print(f"  step {t + 1}: {r}/{k} -> {y!r}; consistent: {', '.join(names[:6])}"
              + (f" (+{len(names) - 6} more)" if len(names) > 6 else ""))
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Count the modules consistent with golden steps.")
    parser.add_argument("--regime", default="sft", choices=list(PROMPT_REGIMES))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
