"""Inference throughput on simulated depth-4 traces (modular model).

Rows: building the emission statistics; exact evidence + posterior marginals (closed form)
with and without that build; the per-trace evidence by the NumPyro program's enumeration
(:mod:`latentsel.inference.enumerated`, the traces plate kept) on the same data; EM to
convergence. Then SVI (AutoDelta, AutoNormal) and NUTS on a smaller corpus (2,000 traces by
default). Every time is also given as a ratio to the closed form on the same corpus. Then
compressed corpora: the same prompts with step 2 hidden, and with steps 2 and 3 hidden, built
and scored exactly (every later step reads the hidden entries through ``longest``/``shortest``),
against the fully observed corpus.

    python benchmarks/inference.py --sizes 10000 100000
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from numpyro.util import set_host_device_count

set_host_device_count(min(2, os.cpu_count() or 1))  # NUTS chains in parallel; before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _results import timed, write_results  # noqa: E402

from latentsel.analysis.posterior import posterior_from_data  # noqa: E402
from latentsel.inference.corpus import CHUNK  # noqa: E402
from latentsel.inference.em import fit_em  # noqa: E402
from latentsel.models.registry import default_params  # noqa: E402
from latentsel.traces.emission import build_data  # noqa: E402
from latentsel.traces.regimes import generate  # noqa: E402
from latentsel.traces.simulate import simulate  # noqa: E402
from latentsel.world import default_world  # noqa: E402


def numpyro_evidence(data, params, repeat):
    """The per-trace log evidence through the NumPyro program's own enumeration, in its chunks."""
    from latentsel.inference.enumerated import numpyro_log_evidence

    numpyro_log_evidence("modular", params, data.take(slice(0, 1024)))  # compile
    return timed(lambda: numpyro_log_evidence("modular", params, data), repeat=repeat)[0]


def main(args):
    world = default_world()
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
    rows = []
    for n in args.sizes:
        prompts = generate("eval-ood", n, seed=args.seed, world=world)
        traces = simulate(prompts, truth, "modular", world, seed=args.seed)
        build_s, data = timed(lambda: build_data(traces, world))
        posterior_from_data(data.take(slice(0, 16)), truth, "modular", joint=False)  # compile
        closed_s, _ = timed(lambda: posterior_from_data(data, truth, "modular", joint=False, chunk=args.chunk), repeat=args.repeat)
        row = {"n_traces": n, "build_s": build_s, "closed_s": closed_s,
               "closed_traces_per_s": n / closed_s, "end_to_end_traces_per_s": n / (build_s + closed_s)}
        if n <= args.numpyro_max:
            row["numpyro_s"] = numpyro_evidence(data, truth, args.repeat)
        em_s, fit = timed(lambda: fit_em("modular", data, tol=1e-8, max_iter=500, chunk=args.chunk))
        row.update(em_s=em_s, em_iterations=len(fit.objective) - 1, em_e_steps=fit.e_steps, em_converged=bool(fit.converged))
        rows.append(row)

    print(f"{'traces':>8} {'build s':>8} {'exact s':>8} {'exact tr/s':>11} {'e2e tr/s':>10} "
          f"{'numpyro s':>10} {'x closed':>9} {'EM s':>7} {'EM it':>6} {'E-steps':>8} {'x closed':>9}")
    for r in rows:
        np_s = r.get("numpyro_s")
        print(f"{r['n_traces']:>8} {r['build_s']:>8.2f} {r['closed_s']:>8.3f} {r['closed_traces_per_s']:>11.3e} "
              f"{r['end_to_end_traces_per_s']:>10.3e} "
              + (f"{np_s:>10.3f} {np_s / r['closed_s']:>9.2f} " if np_s else f"{'-':>10} {'-':>9} ")
              + f"{r['em_s']:>7.2f} {r['em_iterations']:>6} {r['em_e_steps']:>8} {r['em_s'] / r['closed_s']:>9.1f}")
    compressed = compressed_rows(world, truth, args) if args.compressed_traces else []
    if compressed:
        print()
        print(f"{'hidden':>8} {'traces':>7} {'build s':>8} {'exact s':>8} {'exact tr/s':>11} {'e2e tr/s':>10} "
              f"{'x observed':>11} {'nodes/trace':>12}")
        for r in compressed:
            print(f"{r['hidden']:>8} {r['n_traces']:>7} {r['build_s']:>8.2f} {r['closed_s']:>8.3f} "
                  f"{r['closed_traces_per_s']:>11.3e} {r['end_to_end_traces_per_s']:>10.3e} "
                  f"{r['e2e_vs_observed']:>11.2f} {r['nodes_per_trace']:>12.1f}")
    sampling = sampling_rows(world, truth, args) if args.svi_traces else []
    if sampling:
        print()
        print(f"{'method':<16} {'traces':>7} {'work':>22} {'s':>8} {'x closed':>9}  quality")
        for r in sampling:
            print(f"{r['method']:<16} {r['n_traces']:>7} {r['work']:>22} {r['seconds']:>8.2f} "
                  f"{r['seconds'] / r['closed_s']:>9.0f}  {r['quality']}")
    result = {"benchmark": "inference", "model": "modular", "depth": 4, "chunk": args.chunk, "rows": rows,
              "compressed": compressed, "sampling": sampling}
    write_results(args.json, result, jax=jax.__version__)
    return result


def compressed_rows(world, truth, args):
    """Build + exact evidence and marginals of one corpus fully observed, with one hidden step
    and with two hidden steps in a row; e2e_vs_observed = end-to-end throughput / observed's."""
    rows = []
    for hide in ((), (2,), (2, 3)):
        # two hidden steps in a row have ~1.8e4 distinct output pairs per depth-4 trace here
        n = args.compressed_pair_traces if len(hide) == 2 else args.compressed_traces
        prompts = generate("eval-ood", n, seed=args.seed, world=world)
        traces = simulate(prompts, truth, "modular", world, seed=args.seed, hide=hide)
        build_s, data = timed(lambda: build_data(traces, world))
        posterior_from_data(data.take(slice(0, 8)), truth, "modular", joint=False)  # compile the free path
        closed_s, _ = timed(lambda: posterior_from_data(data, truth, "modular", joint=False, chunk=args.chunk), repeat=args.repeat)
        nodes = sum(int(p.size) for g in data.blocks for p in g.parents)  # tree nodes below the blocks
        rows.append({"hidden": "-".join(map(str, hide)) or "none", "n_traces": n, "build_s": build_s,
                     "closed_s": closed_s, "closed_traces_per_s": n / closed_s,
                     "end_to_end_traces_per_s": n / (build_s + closed_s), "nodes_per_trace": nodes / n})
    for r in rows:
        r["e2e_vs_observed"] = r["end_to_end_traces_per_s"] / rows[0]["end_to_end_traces_per_s"]
    return rows


def sampling_rows(world, truth, args):
    """SVI with each guide and NUTS on one corpus, timed end to end (compilation included)."""
    from latentsel.inference.mcmc import fit_nuts, summary
    from latentsel.inference.svi import fit_svi

    n = args.svi_traces
    traces = simulate(generate("eval-ood", n, seed=args.seed, world=world), truth, "modular", world, seed=args.seed)
    data = build_data(traces, world)
    posterior_from_data(data.take(slice(0, 16)), truth, "modular", joint=False)  # compile
    closed_s, _ = timed(lambda: posterior_from_data(data, truth, "modular", joint=False), repeat=args.repeat)
    em_s, em = timed(lambda: fit_em("modular", data, tol=1e-8, max_iter=500))
    rows = [{"method": "closed form", "n_traces": n, "work": "evidence + marginals", "seconds": closed_s,
             "quality": ""},
            {"method": "EM", "n_traces": n, "work": f"{len(em.objective) - 1} iterations, {em.e_steps} E-steps", "seconds": em_s, "quality": ""}]
    for guide in ("delta", "normal"):
        secs, res = timed(lambda: fit_svi("modular", data, guide=guide, steps=args.svi_steps, seed=args.seed))
        gap = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(res.params, em.params))
        rows.append({"method": f"SVI {guide}", "n_traces": n, "work": f"{args.svi_steps} steps", "seconds": secs,
                     "quality": f"max |θ - θ_EM| {gap:.1e}"})
    secs, res = timed(lambda: fit_nuts("modular", data, num_warmup=args.nuts_draws, num_samples=args.nuts_draws,
                                       num_chains=2, seed=args.seed))
    s = summary(res)
    r_hat = max(site["r_hat_max"] for site in s["sites"].values())
    ess = min(site["ess_min"] for site in s["sites"].values())
    rows.append({"method": f"NUTS ({res.chain_method})", "n_traces": n,
                 "work": f"2 x ({args.nuts_draws} + {args.nuts_draws}) draws", "seconds": secs,
                 "quality": f"R-hat {r_hat:.3f}, min ESS {ess:.0f}, {s['divergences']} div., "
                            f"{s['mean_tree_steps']:.0f} steps/draw"})
    for r in rows:
        r["closed_s"] = closed_s
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=CHUNK, help="traces per jitted call of the closed form and EM")
    parser.add_argument("--numpyro-max", type=int, default=100_000, help="largest corpus for the NumPyro path")
    parser.add_argument("--compressed-traces", type=int, default=5000,
                        help="corpus for the compressed rows (0: skip them)")
    parser.add_argument("--compressed-pair-traces", type=int, default=100,
                        help="corpus for the row with two hidden steps in a row")
    parser.add_argument("--svi-traces", type=int, default=2000, help="corpus for SVI and NUTS (0: skip them)")
    parser.add_argument("--svi-steps", type=int, default=1000)
    parser.add_argument("--nuts-draws", type=int, default=200, help="NUTS warm-up and kept draws per chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "inference.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
