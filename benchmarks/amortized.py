"""Amortized VI on simulated depth-4 traces of the default world (modular model).

For each corpus size N: the inference network is trained on N traces with θ fixed at the
simulating parameters, then measured on 2,000 held-out traces against the exact posterior
(mean KL per step over (r, k, u) in both directions, MAP agreement), and its posterior
throughput is set against the exact closed form's on the same held-out traces.
``--million`` builds 10^6 traces in chunks and runs a few hundred minibatch steps on them,
reporting the peak resident memory: the corpus costs its int8 match counts, the features
are made per minibatch.

    python benchmarks/amortized.py --sizes 20000
    python benchmarks/amortized.py --million
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from _results import write_results

from latentsel.analysis.posterior import posterior_from_data
from latentsel.inference.amortized import amortized_posterior, default_device, evaluate_amortized, fit_amortized
from latentsel.models.data import HLSMData
from latentsel.models.registry import default_params
from latentsel.traces.emission import build_data
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate
from latentsel.world import default_world


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def corpus(world, truth, n: int, seed: int, chunk: int = 100_000) -> HLSMData:
    """N simulated depth-4 traces, built ``chunk`` traces at a time into preallocated arrays."""
    out = None
    for i, lo in enumerate(range(0, n, chunk)):
        size = min(chunk, n - lo)
        traces = simulate(generate("eval-ood", size, seed=seed + i, world=world), truth, "modular", world, seed=seed + i)
        part = build_data(traces, world)
        if out is None:
            out = [np.empty((n, *a.shape[1:]), a.dtype) for a in part.arrays()]
        for dst, src in zip(out, part.arrays()):
            dst[lo:lo + size] = src
    return HLSMData.from_arrays(out, world.n_chars, world.max_len)


def throughput(fn, n: int) -> float:
    fn()  # compile / warm up
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def size_row(world, truth, n: int, held: HLSMData, args) -> dict:
    train = corpus(world, truth, n, seed=args.seed + 1000)
    t0 = time.perf_counter()
    res = fit_amortized("modular", train, truth, estimator=args.estimator, steps=args.steps, batch=args.batch,
                        lr=args.lr, seed=args.seed, device=args.device)
    train_s = time.perf_counter() - t0
    ev = evaluate_amortized(res, held, truth)
    q_rate = throughput(lambda: amortized_posterior(res, held), held.n_traces)
    exact_rate = throughput(lambda: posterior_from_data(held, truth, "modular", joint=False), held.n_traces)
    return {"n_traces": n, "estimator": args.estimator, "train_s": train_s, "steps": args.steps, "batch": res.batch,
            "device": res.device, "final_loss": float(res.losses[-50:].mean()), **ev,
            "amortized_traces_per_s": q_rate, "exact_traces_per_s": exact_rate}


def million_row(world, truth, args) -> dict:
    t0 = time.perf_counter()
    data = corpus(world, truth, 10**6, seed=args.seed + 2000)
    build_s = time.perf_counter() - t0
    rss_data = peak_rss_gb()
    t0 = time.perf_counter()
    res = fit_amortized("modular", data, truth, estimator=args.estimator, steps=args.million_steps, batch=args.batch,
                        lr=args.lr, seed=args.seed, device=args.device)
    train_s = time.perf_counter() - t0
    return {"n_traces": data.n_traces, "match_gb": data.match.nbytes / 2**30, "build_s": build_s,
            "peak_rss_after_build_gb": rss_data, "steps": args.million_steps, "train_s": train_s,
            "peak_rss_gb": peak_rss_gb(), "final_loss": float(res.losses[-50:].mean()), "device": res.device}


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    world = default_world()
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
    held = corpus(world, truth, args.held_out, seed=args.seed)
    rows = [size_row(world, truth, n, held, args) for n in args.sizes]
    print(f"{'N':>7} {'estimator':>10} {'train s':>8} {'steps':>6} {'KL(p‖q)':>8} {'KL(q‖p)':>8} {'MAP agr':>8} "
          f"{'MAP lab':>8} {'q tr/s':>9} {'exact tr/s':>11}")
    for r in rows:
        print(f"{r['n_traces']:>7} {r['estimator']:>10} {r['train_s']:>8.1f} {r['steps']:>6} {r['kl_exact_q']:>8.4f} "
              f"{r['kl_q_exact']:>8.4f} {r['map_agreement']:>8.4f} {r['map_label_agreement']:>8.4f} "
              f"{r['amortized_traces_per_s']:>9.3g} {r['exact_traces_per_s']:>11.3g}")
    million = million_row(world, truth, args) if args.million else None
    if million:
        print(f"\n10^6 traces: match counts {million['match_gb']:.2f} GB, built in {million['build_s']:.0f} s "
              f"(peak RSS {million['peak_rss_after_build_gb']:.2f} GB); {million['steps']} steps of {args.batch} "
              f"traces in {million['train_s']:.1f} s on {million['device']}; peak RSS {million['peak_rss_gb']:.2f} GB")
    result = {"benchmark": "amortized", "model": "modular", "depth": 4, "held_out": args.held_out, "lr": args.lr,
              "threads": torch.get_num_threads(), "rows": rows, "million": million}
    write_results(args.json, result, torch=torch.__version__, pyro=pyro.__version__)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000])
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--estimator", default="enum", choices=["enum", "tracegraph"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); minibatches are small, one is fastest")
    parser.add_argument("--million", action="store_true", help="also train on 10^6 traces and report peak memory")
    parser.add_argument("--million-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "amortized.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
