"""Timing, and writing a benchmark's results: its rows plus the machine they were measured on."""
import json
import os
import platform
import time

from latentsel._io import atomic_open


def write_results(path, result: dict, **versions) -> None:
    """Write ``result`` with a ``machine`` entry (cores, Python, the given versions) as JSON, atomically."""
    result = dict(result, machine={"cpus": os.cpu_count(), "python": platform.python_version(), **versions})
    with atomic_open(path) as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def timed(fn, repeat=1):
    """``(best wall-clock seconds over repeat calls, the last result)``."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
