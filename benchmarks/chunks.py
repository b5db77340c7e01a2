"""Cutting a corpus into the chunks every exact pass and E-step walks: seconds per pass.

Chunks of a corpus without hidden-step blocks are slices (views of the statistics); the anchor,
measured in the same run, is the general path that gathers each chunk by an index array and
maps the blocks' traces (O(N) per chunk, so O(N^2 / chunk) per pass). Best of ``--repeat``.

    python benchmarks/chunks.py --sizes 100000 1000000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _results import timed, write_results

from latentsel.inference.corpus import CHUNK, chunks
from latentsel.models.data import HLSMData


def synthetic(n: int, t: int = 4, r: int = 10, k: int = 24) -> HLSMData:
    """Emission statistics of ``n`` depth-``t`` traces in the default world's shape (zeros: the
    cost of cutting does not depend on the values)."""
    return HLSMData(np.zeros((n, t, r, k), np.int8), np.zeros((n, t), np.int32), np.ones((n, t), bool),
                    np.zeros((n, t), np.int32), np.zeros((n, t), np.int32), 26, 16)


def main(args):
    rows = []
    for n in args.sizes:
        data = synthetic(n)
        sliced, _ = timed(lambda: sum(part.n_traces for _, part in chunks(data, args.chunk)), args.repeat)
        gathered, _ = timed(lambda: sum(data.take(np.arange(lo, min(lo + args.chunk, n))).n_traces
                                        for lo in range(0, n, args.chunk)), args.repeat)
        rows.append({"traces": n, "chunk": args.chunk, "chunks_s": sliced, "gather_s": gathered,
                     "speedup": gathered / sliced, "statistics_bytes": int(data.match.nbytes)})
    print(f"{'traces':>9} {'chunk':>6} {'chunks() s':>11} {'gather s (anchor)':>18} {'x anchor':>9}")
    for r in rows:
        print(f"{r['traces']:>9} {r['chunk']:>6} {r['chunks_s']:>11.4f} {r['gather_s']:>18.3f} {r['speedup']:>9.0f}")
    result = {"benchmark": "chunks", "rows": rows}
    write_results(args.json, result, numpy=np.__version__)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chunk", type=int, default=CHUNK)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "chunks.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
