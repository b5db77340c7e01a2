"""Throughput of the batch executor: module applications per second.

Applies all R*K modules of the default world to N random histories (inputs of length
4-8 and 0-2 earlier steps of length 1-16), best of ``--repeat`` runs, against the
per-string reference on a sample. Prints a table and writes JSON.

    python benchmarks/world.py --sizes 10000 40000 --repeat 5
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _results import write_results

from latentsel.world import default_world
from latentsel.world.executor import apply_all, encode_histories


def random_histories(n: int, seed: int, world) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    letters = np.array(list(world.alphabet))
    out = []
    for _ in range(n):
        h = ["".join(rng.choice(letters, size=rng.integers(4, 9)))]
        for _ in range(rng.integers(0, 3)):
            h.append("".join(rng.choice(letters, size=rng.integers(1, world.max_len + 1))))
        out.append(h)
    return out


def main(args):
    world = default_world()
    rows = []
    for n in args.sizes:
        histories = random_histories(n, args.seed, world)
        t0 = time.perf_counter()
        codes, lens, depth = encode_histories(histories, world)
        encode_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            apply_all(world, codes, lens, depth)
            times.append(time.perf_counter() - t0)
        best = min(times)
        apps = n * world.n_modules
        rows.append({"histories": n, "applications": apps, "encode_s": encode_s, "best_s": best,
                     "median_s": float(np.median(times)), "apps_per_s": apps / best})
    sample = random_histories(args.reference_sample, args.seed + 1, world)
    t0 = time.perf_counter()
    for h in sample:
        for r in range(world.n_routes):
            for k in range(world.n_skills):
                world.apply(r, k, h)
    ref_rate = len(sample) * world.n_modules / (time.perf_counter() - t0)

    print(f"{'histories':>10} {'applications':>13} {'encode s':>9} {'best s':>8} {'median s':>9} "
          f"{'apps/s':>12} {'x reference':>12}")
    for r in rows:
        print(f"{r['histories']:>10} {r['applications']:>13} {r['encode_s']:>9.3f} {r['best_s']:>8.3f} "
              f"{r['median_s']:>9.3f} {r['apps_per_s']:>12.3e} {r['apps_per_s'] / ref_rate:>12.0f}")
    print(f"reference (per string, Python): {ref_rate:.3e} apps/s on {len(sample)} histories")
    result = {"benchmark": "world", "rows": rows, "reference_apps_per_s": ref_rate}
    write_results(args.json, result, numpy=np.__version__)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 100_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reference-sample", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "world.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
