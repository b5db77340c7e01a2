"""Pyro against NumPyro on the same work (modular model, simulated depth-4 traces).

Rows: the per-trace exact log evidence of N traces by the closed form, by the NumPyro
program's enumeration and by the Pyro program's (all three agree to 1e-6; the benchmark checks
it), then the same SVI run (AutoDelta, TraceEnum_ELBO, the same steps, step sizes and seed) in
NumPyro and in Pyro on a smaller corpus. Times are given as ratios to the closed form and,
for Pyro, to NumPyro.

    python benchmarks/backends.py --evidence-traces 10000 --svi-traces 2000 --svi-steps 200 --torch-threads 1
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import pyro
import torch
from _results import timed, write_results

from latentsel.analysis.posterior import posterior_from_data
from latentsel.inference.em import fit_em
from latentsel.inference.enumerated import numpyro_log_evidence
from latentsel.inference.pyro_enum import pyro_log_evidence
from latentsel.inference.pyro_svi import fit_pyro_svi
from latentsel.inference.svi import fit_svi
from latentsel.models.registry import default_params
from latentsel.traces.emission import build_data
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate
from latentsel.world import default_world


def corpus(world, truth, n, seed):
    traces = simulate(generate("eval-ood", n, seed=seed, world=world), truth, "modular", world, seed=seed)
    return build_data(traces, world)


def evidence_rows(world, truth, args):
    data = corpus(world, truth, args.evidence_traces, args.seed)
    warm = data.take(slice(0, 1024))
    paths = {
        "closed form": lambda d: posterior_from_data(d, truth, "modular", joint=False).log_evidence,
        "NumPyro enumeration": lambda d: numpyro_log_evidence("modular", truth, d),
        "Pyro enumeration": lambda d: pyro_log_evidence("modular", truth, d),
    }
    rows, values = [], {}
    for name, fn in paths.items():
        fn(warm)  # compile (JAX) and warm the allocator (torch)
        secs, values[name] = timed(lambda: fn(data), repeat=args.repeat)
        rows.append({"path": name, "n_traces": data.n_traces, "seconds": secs})
    ref = values["closed form"]
    for r in rows:
        r["x_closed"] = r["seconds"] / rows[0]["seconds"]
        r["max_rel_diff"] = float(np.max(np.abs(values[r["path"]] - ref) / np.abs(ref)))
    rows[-1]["x_numpyro"] = rows[-1]["seconds"] / rows[1]["seconds"]
    return rows


def svi_rows(world, truth, args):
    data = corpus(world, truth, args.svi_traces, args.seed)
    em = fit_em("modular", data, tol=1e-10, max_iter=1000)
    rows = []
    for name, fit in (("NumPyro SVI", fit_svi), ("Pyro SVI", fit_pyro_svi)):
        secs, res = timed(lambda: fit("modular", data, guide="delta", steps=args.svi_steps, seed=args.seed))
        gap = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(res.params, em.params))
        rows.append({"path": name, "n_traces": data.n_traces, "steps": args.svi_steps, "seconds": secs,
                     "first_loss": float(res.losses[0]), "final_loss": float(res.losses[-1]), "max_gap_to_em": gap})
    rows[1]["x_numpyro"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def main(args):
    jax.config.update("jax_enable_x64", True)
    torch.set_num_threads(args.torch_threads)
    world = default_world()
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
    ev = evidence_rows(world, truth, args) if args.evidence_traces else []
    print(f"{'evidence path':<22} {'traces':>7} {'s':>8} {'x closed':>9} {'x NumPyro':>10} {'max rel diff':>13}")
    for r in ev:
        x_np = f"{r['x_numpyro']:>10.2f}" if "x_numpyro" in r else f"{'-':>10}"
        print(f"{r['path']:<22} {r['n_traces']:>7} {r['seconds']:>8.3f} {r['x_closed']:>9.2f} {x_np} "
              f"{r['max_rel_diff']:>13.1e}")
    sv = svi_rows(world, truth, args) if args.svi_traces else []
    if sv:
        print()
        print(f"{'SVI (AutoDelta)':<22} {'traces':>7} {'steps':>6} {'s':>8} {'x NumPyro':>10} {'first loss':>12} "
              f"{'final loss':>12} {'max |θ-θ_EM|':>13}")
        for r in sv:
            x_np = f"{r['x_numpyro']:>10.2f}" if "x_numpyro" in r else f"{'-':>10}"
            print(f"{r['path']:<22} {r['n_traces']:>7} {r['steps']:>6} {r['seconds']:>8.2f} {x_np} "
                  f"{r['first_loss']:>12.4f} {r['final_loss']:>12.4f} {r['max_gap_to_em']:>13.1e}")
    result = {"benchmark": "backends", "model": "modular", "depth": 4, "evidence": ev, "svi": sv,
              "torch_threads": args.torch_threads}
    write_results(args.json, result, jax=jax.__version__, torch=torch.__version__, pyro=pyro.__version__)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evidence-traces", type=int, default=10_000, help="corpus for the evidence paths (0: skip)")
    parser.add_argument("--svi-traces", type=int, default=2000, help="corpus for the SVI runs (0: skip)")
    parser.add_argument("--svi-steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "backends.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
