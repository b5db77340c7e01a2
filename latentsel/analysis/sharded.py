"""EM on a cluster: every shard's statistics built and kept on a worker, only θ and the counts move.

A :class:`ShardedCorpus` sends each trace file (a *shard*) to a worker of a Dask or Ray
cluster, which reads it in chunks and keeps its emission statistics
(:class:`~latentsel.analysis.streaming.StreamedCorpus`) in its own memory or on its local disk.
Each E-step sends θ to every shard and brings back its expected sufficient statistics (a few
kilobytes), summed in shard order; the M-step runs here. So
:func:`latentsel.inference.em.fit_em` on a sharded corpus gives the single-process fit: the
counts are the same sums, grouped differently.

    >>> from dask.distributed import Client
    >>> with ShardedCorpus(shards, world, backend="dask", address="tcp://scheduler:8786") as corpus:
    ...     fit = fit_em("modular", corpus)

Without ``client`` or ``address`` a local cluster of ``workers`` processes is started and
stopped with the corpus. Bytes moved per E-step: θ out to every shard and ``2 R K + R^2 + K^2
+ 5`` float64 numbers back from each (modular model), independent of the traces a shard holds.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from latentsel._jax import use_compilation_cache
from latentsel.analysis.streaming import StreamedCorpus
from latentsel.inference.corpus import CHUNK
from latentsel.inference.em import SuffStats
from latentsel.traces.stream import CHUNK_TRACES, MAX_DEPTH
from latentsel.world import World
from latentsel.world.loading import load_world

__all__ = ["ShardedCorpus", "BACKENDS"]

BACKENDS = ("dask", "ray")


def _build(path, world, model, chunk, max_depth, skip_invalid, cache):
    use_compilation_cache()  # on the worker: compiled once per worker machine, not per run
    return StreamedCorpus(path, load_world(world), model, cache=cache, chunk=chunk, max_depth=max_depth,
                          skip_invalid=skip_invalid)


def _meta(corpus) -> dict:
    return {"n_traces": corpus.n_traces, "n_steps": corpus.n_steps, "n_parts": corpus.n_parts,
            "max_depth": corpus.max_depth_seen, "skipped": [str(e) for e in corpus.skipped],
            "host": os.uname().nodename,
            "pid": os.getpid()}


def _counts(corpus, model, params, chunk):
    """The shard's E-step and the seconds it took on the worker."""
    t0 = time.perf_counter()
    values = [np.asarray(v) for v in corpus.counts(model, params, chunk)]
    return values, time.perf_counter() - t0


class _ShardActor:
    """A Ray actor holding one shard's statistics."""

    def __init__(self, *args):
        self.corpus = _build(*args)

    def meta(self):
        return _meta(self.corpus)

    def counts(self, model, params, chunk):
        return _counts(self.corpus, model, params, chunk)


class ShardedCorpus:
    """Trace files fitted where they are read: one shard a file, on the workers of a cluster.

    Args:
        paths: the shards (trace files every worker can read at that path).
        world: the world of the traces, named so that every worker can load it: ``None`` (the
            default world) or ``"MODULE:ATTR"`` / ``"FILE.py:ATTR"`` (see
            :func:`latentsel.world.loading.load_world`; the file must be readable on the workers).
        model: as :class:`~latentsel.analysis.streaming.StreamedCorpus`.
        backend: ``"dask"`` or ``"ray"``.
        client: a ``dask.distributed.Client`` to use (dask), left open on :meth:`close`.
        address: a running cluster's address: a Dask scheduler (``tcp://host:8786``) or a Ray
            cluster (``ray://host:10001``, or ``"auto"``).
        workers: without ``client`` or ``address``, the processes of the local cluster started
            here (default 2).
        cache: where a worker keeps its shard's parts: ``"memory"`` (default) or ``None`` (a
            temporary folder on the worker's disk).
        chunk, max_depth, skip_invalid: as :class:`~latentsel.analysis.streaming.StreamedCorpus`.

    Attributes: ``n_traces``, ``n_routes``, ``n_skills``, ``shards`` (per shard: traces, steps,
    parts, deepest trace, skipped records, and the worker that holds it), ``last_seconds`` (per
    shard, the seconds its last E-step took on its worker).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], world: str | None = None, model: str = "modular", *,
                 backend: str = "dask",
                 client=None, address: str | None = None, workers: int = 2, cache="memory",
                 chunk: int | None = None, max_depth: int | None = None, skip_invalid: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not self.paths:
            raise ValueError("no shards: give at least one trace file")
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise ValueError(f"{missing[0]}: no such trace file")
        if isinstance(world, World):
            raise TypeError("pass the world by name (None for the default world, or 'MODULE:ATTR'), so that every "
                            "worker can load it: a World holds functions that do not cross a process boundary")
        loaded = load_world(world)
        self.backend, self.model = backend, model
        self.n_routes, self.n_skills = loaded.n_routes, loaded.n_skills
        self._owned = []
        args = [(str(p.resolve()), world, model, CHUNK_TRACES if chunk is None else chunk,
                 MAX_DEPTH if max_depth is None else max_depth, skip_invalid, cache) for p in self.paths]
        try:
            if backend == "dask":
                self._start_dask(client, address, workers, args)
            else:
                self._start_ray(address, workers, args)
        except BaseException:
            self.close()
            raise
        self.n_traces = sum(s["n_traces"] for s in self.shards)

    # --- dask ------------------------------------------------------------------------------
    def _start_dask(self, client, address, workers, args):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ImportError("the dask backend needs dask.distributed: pip install 'latentsel[dask]'") from None
        if client is None:
            if address is None:
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
                self._owned.append(cluster)
                client = Client(cluster)
            else:
                client = Client(address)
            self._owned.insert(0, client)
        self.client = client
        run = uuid.uuid4().hex[:8]
        self._futures = [client.submit(_build, *a, key=f"latentsel-shard-{i}-{run}", pure=False)
                         for i, a in enumerate(args)]
        self.shards = client.gather(client.map(_meta, self._futures, pure=False))

    # --- ray -------------------------------------------------------------------------------
    def _start_ray(self, address, workers, args):
        try:
            import ray
        except ImportError:
            raise ImportError("the ray backend needs ray: pip install ray") from None
        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            self._owned.append(ray)
        # an actor holds its CPUs for life: with more shards than CPUs, each asks for a share,
        # or the shards past the CPU count would never start
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actor = ray.remote(num_cpus=min(1.0, cpus / len(args)))(_ShardActor)
        self._actors = [actor.remote(*a) for a in args]
        self.shards = ray.get([a.meta.remote() for a in self._actors])

    # --- the E-step ------------------------------------------------------------------------
    def counts(self, model: str, params, chunk: int = CHUNK):
        """The exact E-step of every shard at ``params``, summed in shard order (numpy)."""
        params = type(params)(*(np.asarray(p) for p in params))
        if self.backend == "dask":
            parts = self.client.gather([self.client.submit(_counts, f, model, params, chunk, pure=False)
                                        for f in self._futures])
        else:
            import ray

            parts = ray.get([a.counts.remote(model, params, chunk) for a in self._actors])
        self.last_seconds = [seconds for _, seconds in parts]
        total = parts[0][0]
        for values, _ in parts[1:]:
            total = [a + b for a, b in zip(total, values)]
        return SuffStats(*total)

    def close(self) -> None:
        """Release the shards; stop the cluster (or the client) this corpus started."""
        futures = getattr(self, "_futures", None)
        if futures:
            for f in futures:
                f.release()
            self._futures = []
        self._actors = []
        for owned in self._owned:
            if getattr(owned, "__name__", "") == "ray":
                owned.shutdown()
            else:
                owned.close()
        self._owned = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
