"""Inference throughput on simulated depth-4 traces (modular model).

Rows: building the emission statistics; exact evidence + posterior marginals (closed form)
with and without that build; the NumPyro TraceEnum_ELBO evidence on the same data; EM to
convergence. Every time is also given as a ratio to the closed form on the same corpus.

    python benchmarks/inference.py --sizes 10000 100000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
from _results import write_results

from latentsel.api import exact
from latentsel.emission import build_data
from latentsel.inference.em import fit_em
from latentsel.models.params import default_params
from latentsel.regimes import generate
from latentsel.simulate import simulate
from latentsel.world import default_world


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def numpyro_evidence(data, params):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import TraceEnum_ELBO

    from latentsel.models.numpyro_models import GLOBAL_SITES, NUMPYRO_MODELS

    def guide(data):
        for name, v in zip(GLOBAL_SITES["modular"], params):
            v = jnp.asarray(v)
            numpyro.sample(name, dist.Delta(v, event_dim=v.ndim))

    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    loss = jax.jit(lambda d: elbo.loss(jax.random.PRNGKey(0), {}, NUMPYRO_MODELS["modular"], guide, d))
    with jax.enable_x64(True):
        loss(data).block_until_ready()  # compile
        return timed(lambda: float(loss(data)))[0]


def main(args):
    world = default_world()
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
    rows = []
    for n in args.sizes:
        prompts = generate("eval-ood", n, seed=args.seed, world=world)
        traces = simulate(prompts, truth, "modular", world, seed=args.seed)
        build_s, data = timed(lambda: build_data(traces, world))
        exact(data.take(slice(0, 16)), truth, "modular")  # compile
        closed_s, _ = timed(lambda: exact(data, truth, "modular"), repeat=args.repeat)
        row = {"n_traces": n, "build_s": build_s, "closed_s": closed_s,
               "closed_traces_per_s": n / closed_s, "end_to_end_traces_per_s": n / (build_s + closed_s)}
        if n <= args.numpyro_max:
            row["numpyro_s"] = numpyro_evidence(data, truth)
        em_s, fit = timed(lambda: fit_em("modular", data, tol=1e-8, max_iter=500))
        row.update(em_s=em_s, em_iterations=len(fit.objective), em_converged=bool(fit.converged))
        rows.append(row)

    print(f"{'traces':>8} {'build s':>8} {'exact s':>8} {'exact tr/s':>11} {'e2e tr/s':>10} "
          f"{'numpyro s':>10} {'x closed':>9} {'EM s':>7} {'EM it':>6} {'x closed':>9}")
    for r in rows:
        np_s = r.get("numpyro_s")
        print(f"{r['n_traces']:>8} {r['build_s']:>8.2f} {r['closed_s']:>8.3f} {r['closed_traces_per_s']:>11.3e} "
              f"{r['end_to_end_traces_per_s']:>10.3e} "
              + (f"{np_s:>10.3f} {np_s / r['closed_s']:>9.2f} " if np_s else f"{'-':>10} {'-':>9} ")
              + f"{r['em_s']:>7.2f} {r['em_iterations']:>6} {r['em_s'] / r['closed_s']:>9.1f}")
    result = {"benchmark": "inference", "model": "modular", "depth": 4, "rows": rows}
    write_results(args.json, result, jax=jax.__version__)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--numpyro-max", type=int, default=10_000, help="largest corpus for the NumPyro path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "inference.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
