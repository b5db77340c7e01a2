"""Sharded EM on a local Dask (or Ray) cluster: per-shard E-step throughput, bytes moved, overhead.

The first ``--traces`` lines of a trace file (default: the streamed-EM benchmark's corpus, or a
fresh simulation) are cut into ``--shards`` files, each read and kept by a worker of a local
cluster of ``--workers`` single-threaded processes
(:class:`~latentsel.analysis.sharded.ShardedCorpus`). Measured, over ``--steps`` E-steps at the
prior mean: the E-step's wall time here, each shard's seconds on its worker, the bytes of θ sent
to a shard and of the counts it returns (pickled), and, as the anchor in the same run, the
single-process E-step of the same traces
(:class:`~latentsel.analysis.streaming.StreamedCorpus` in memory, both cores). From these, the
plan for 10^9 traces in ``docs/scale.md``: workers needed for one E-step a minute.

    python benchmarks/sharded.py --traces 200000 --shards 4 --workers 2
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from _results import write_results


def shard_files(source: Path, n: int, shards: int, folder: Path) -> list[Path]:
    lines = []
    with open(source, "rb") as f:
        for line in f:
            lines.append(line)
            if len(lines) == n:
                break
    per = -(-len(lines) // shards)
    out = []
    for s in range(shards):
        path = folder / f"shard-{s:03d}.jsonl"
        path.write_bytes(b"".join(lines[s * per:(s + 1) * per]))
        out.append(path)
    return out


def main(args):
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    from latentsel.inference.em import e_step, prior_mean_params
    from latentsel.analysis.sharded import ShardedCorpus
    from latentsel.analysis.streaming import StreamedCorpus
    from latentsel.world import default_world

    world = default_world()
    folder = Path(tempfile.mkdtemp(prefix="latentsel-shards-"))
    source = Path(args.source)
    if not source.exists():
        from latentsel.models.registry import default_params
        from latentsel.traces.format import write_traces
        from latentsel.traces.regimes import generate
        from latentsel.traces.simulate import simulate

        truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
        source = folder / "source.jsonl"
        write_traces(source, simulate(generate("eval-ood", args.traces, seed=0, world=world), truth, "modular", world),
                     world=world)
    paths = shard_files(source, args.traces, args.shards, folder)
    params = prior_mean_params("modular", world.n_routes, world.n_skills)

    t0 = time.perf_counter()
    local = StreamedCorpus(paths, world, cache="memory")
    local_build = time.perf_counter() - t0
    e_step("modular", params, local)  # compile
    local_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        ref = e_step("modular", params, local)
        local_times.append(time.perf_counter() - t0)
    local.close()

    t0 = time.perf_counter()
    with ShardedCorpus(paths, None, backend=args.backend, workers=args.workers) as corpus:
        build = time.perf_counter() - t0
        e_step("modular", params, corpus)  # each worker compiles once
        walls, worker = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            got = e_step("modular", params, corpus)
            walls.append(time.perf_counter() - t0)
            worker.append(corpus.last_seconds)
        shards = corpus.shards
    for a, b in zip(got, ref):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-9), "the sharded E-step differs from the single-process one"
    per_shard_traces = [s["n_traces"] for s in shards]
    worker_s = [statistics.median(w[i] for w in worker) for i in range(len(shards))]
    theta_bytes = len(pickle.dumps(type(params)(*(np.asarray(p) for p in params))))
    counts_bytes = len(pickle.dumps([np.asarray(v) for v in got]))
    row = {
        "backend": args.backend, "workers": args.workers, "shards": len(shards), "traces": sum(per_shard_traces),
        "build_s": build, "local_build_s": local_build,
        "e_step_wall_s": statistics.median(walls), "local_e_step_s": statistics.median(local_times),
        "shard_worker_s": worker_s,
        "per_worker_traces_per_s": statistics.median(n / s for n, s in zip(per_shard_traces, worker_s)),
        "theta_bytes_per_shard": theta_bytes, "counts_bytes_per_shard": counts_bytes,
        "bytes_per_e_step": (theta_bytes + counts_bytes) * len(shards),
    }
    row["overhead_s"] = row["e_step_wall_s"] - max(worker_s) * (-(-len(shards) // args.workers))
    rate = row["per_worker_traces_per_s"]
    row["workers_for_1e9_in_60s"] = int(np.ceil(1e9 / (rate * 60)))
    print(f"{'path':<28} {'traces':>8} {'E-step s':>9} {'traces/s':>10}")
    print(f"{'single process (anchor)':<28} {row['traces']:>8} {row['local_e_step_s']:>9.3f} "
          f"{row['traces'] / row['local_e_step_s']:>10.0f}")
    print(f"{args.backend + f', {args.workers} workers':<28} {row['traces']:>8} {row['e_step_wall_s']:>9.3f} "
          f"{row['traces'] / row['e_step_wall_s']:>10.0f}")
    print(f"per worker (1 thread): {rate:.0f} traces/s; bytes per E-step: {row['bytes_per_e_step']} "
          f"({theta_bytes} θ + {counts_bytes} counts per shard); overhead {row['overhead_s']:.3f} s")
    print(f"one E-step a minute on 1e9 traces: {row['workers_for_1e9_in_60s']} such workers")
    write_results(args.json, {"benchmark": "sharded", "row": row}, numpy=np.__version__)
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", type=int, default=200_000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backend", default="dask", choices=["dask", "ray"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--source", default="/tmp/latentsel-bench/distinct-1000000.jsonl")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "sharded.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
    os._exit(0)
