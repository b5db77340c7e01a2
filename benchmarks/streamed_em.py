"""EM on a corpus streamed from disk: wall time and peak memory at 1e6 and 1e7 traces.

The corpus is ``--distinct`` simulated depth-4 traces (modular truth, eval-ood prompts), written
as ``--shards`` files; a corpus larger than ``--distinct`` repeats them under new ids (the cost of
reading, building and the E-step does not depend on which traces repeat; the fit's optimum is the
one of the distinct traces, scaled). The fit is :class:`~latentsel.analysis.streaming.StreamedCorpus`
(statistics built once, kept in a cache folder on disk, read back a part at a time) and
:func:`~latentsel.inference.em.fit_em`, in a child process whose peak RSS (``ru_maxrss``, which
counts every page it touched, file-backed ones too) is reported per phase; the statistics are
built by ``--workers`` processes, whose own peak is not in that figure (each holds one chunk). The anchor, measured in
the same run: the in-memory path (``read_traces`` + ``build_data`` + ``fit_em``) on the first
``--anchor`` traces.

    python benchmarks/streamed_em.py --traces 1000000 --data /tmp/latentsel-bench
    python benchmarks/streamed_em.py --traces 10000000 --data /tmp/latentsel-bench --init-from 100000
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

from _results import write_results


def generate(data: Path, distinct: int, seed: int = 0) -> Path:
    """``distinct`` simulated traces in ``data/distinct-N.jsonl`` (written once)."""
    path = data / f"distinct-{distinct}.jsonl"
    if path.exists():
        return path
    from latentsel.models.registry import default_params
    from latentsel.traces.format import write_traces
    from latentsel.traces.regimes import generate as prompts_of
    from latentsel.traces.simulate import simulate
    from latentsel.world import default_world

    world = default_world()
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    traces = []
    for lo in range(0, distinct, 100_000):
        n = min(100_000, distinct - lo)
        prompts = prompts_of("eval-ood", n, seed=seed + lo, world=world)
        for tr in prompts:
            tr.id = f"{lo // 100_000:04d}-{tr.id}"
        traces.extend(simulate(prompts, truth, "modular", world, seed=seed + lo))
        print(f"simulated {lo + n} traces ({time.perf_counter() - t0:.0f} s)", flush=True)
    write_traces(path, traces, world=world)
    return path


def shards(data: Path, base: Path, total: int, n_shards: int) -> list[Path]:
    """``total`` traces in ``n_shards`` files, repeating the lines of ``base`` under new ids."""
    lines = base.read_bytes().splitlines(keepends=True)
    per = -(-total // n_shards)
    out = []
    done = 0
    for s in range(n_shards):
        path = data / f"corpus-{total}-{s:03d}-of-{n_shards:03d}.jsonl"
        n = min(per, total - done)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                for i in range(done, done + n):
                    copy = i // len(lines)
                    f.write(lines[i % len(lines)].replace(b'{"id": "', b'{"id": "c%d-' % copy, 1))
            tmp.rename(path)
        out.append(path)
        done += n
    return out


def _child(kind: str, paths, args, queue):
    import jax

    jax.config.update("jax_enable_x64", True)
    from latentsel.inference.em import fit_em
    from latentsel.world import default_world

    world = default_world()
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # noqa: E731 - GiB
    row = {"kind": kind, "workers": args.workers if kind == "streamed" else 1}
    t0 = time.perf_counter()
    init = None
    if kind == "streamed":
        from latentsel.analysis.streaming import StreamedCorpus

        if args.init_from:
            from latentsel.traces.format import read_traces
            from latentsel.traces.emission import build_data
            from itertools import islice
            from latentsel.traces.stream import iter_chunks

            sub = [tr for chunk in islice(iter_chunks(paths[:1], world=world), 0, None) for tr in chunk][:args.init_from]
            t_init = time.perf_counter()
            init = fit_em("modular", build_data(sub, world)).params
            row["init_s"] = time.perf_counter() - t_init
            row["init_traces"] = len(sub)
            del sub
        t0 = time.perf_counter()
        cache = Path(args.data) / f"cache-{kind}-{len(paths)}"
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        corpus = StreamedCorpus(paths, world, cache=cache, progress=False, workers=args.workers)
        row["build_s"] = time.perf_counter() - t0
        row["build_peak_gib"] = peak()
        # the build processes (ended by now): the largest one's peak
        row["build_worker_peak_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
        row["cache_bytes"] = sum(p.stat().st_size for p in cache.iterdir())
        row["traces"] = corpus.n_traces
        t1 = time.perf_counter()
        e_times = []

        def tick(i, j):
            e_times.append(time.perf_counter())
            print(f"  [{kind}] iterate {i}: J = {j:.6f} ({time.perf_counter() - t1:.0f} s)", flush=True)

        fit = fit_em("modular", corpus, init=init, max_iter=args.max_iter, progress=tick)
        row["em_s"] = time.perf_counter() - t1
        shutil.rmtree(cache, ignore_errors=True)
    else:
        from latentsel.traces.emission import build_data
        from latentsel.traces.format import read_traces

        traces = []
        for p in paths:  # whole files, as read_traces reads, until the anchor has its traces
            if len(traces) >= args.anchor:
                break
            traces.extend(read_traces(p, world=world))
        del traces[args.anchor:]
        row["read_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        data = build_data(traces, world)
        row["build_s"] = time.perf_counter() - t1
        row["build_peak_gib"] = peak()
        row["traces"] = len(traces)
        del traces
        t1 = time.perf_counter()
        fit = fit_em("modular", data, max_iter=args.max_iter)
        row["em_s"] = time.perf_counter() - t1
    row.update(e_steps=fit.e_steps, iterations=len(fit.objective) - 1, converged=bool(fit.converged),
               log_evidence=fit.log_evidence, total_s=time.perf_counter() - t0, peak_gib=peak(),
               em_s_per_e_step=row["em_s"] / fit.e_steps, noise=float(fit.params.noise),
               off_module=float(fit.params.off_module))
    queue.put(row)


def run(kind, paths, args):
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_child, args=(kind, paths, args, queue))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def main(args):
    data = Path(args.data)
    base = generate(data, args.distinct)
    paths = shards(data, base, args.traces, args.shards)
    rows = []
    if args.anchor:
        rows.append(run("in-memory", paths, args))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(run("streamed", paths, args))
    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'path':>10} {'traces':>9} {'build s':>8} {'EM s':>8} {'E-steps':>7} {'s/E-step':>9} {'peak GiB':>9}"
          f" {'converged':>9}")
    for r in rows:
        print(f"{r['kind']:>10} {r['traces']:>9} {r['build_s']:>8.1f} {r['em_s']:>8.1f} {r['e_steps']:>7} "
              f"{r['em_s_per_e_step']:>9.2f} {r['peak_gib']:>9.2f} {str(r['converged']):>9}")
    result = {"benchmark": "streamed_em", "traces": args.traces, "distinct": args.distinct, "shards": args.shards,
              "rows": rows}
    write_results(args.json, result)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", type=int, default=1_000_000)
    p.add_argument("--distinct", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--anchor", type=int, default=0, help="in-memory anchor on this many traces (0: none)")
    p.add_argument("--init-from", type=int, default=0,
                   help="start EM at the EM fit of this many traces of the first shard (0: the prior mean)")
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="processes building the statistics")
    p.add_argument("--data", default="/tmp/latentsel-bench")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.json is None:
        args.json = Path(__file__).parent / "results" / f"streamed_em-{args.traces}.json"
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()) is None)
