"""Corpora larger than memory: emission statistics built chunk by chunk, E-steps summed over parts.

A :class:`StreamedCorpus` reads trace files in bounded chunks
(:func:`latentsel.traces.stream.iter_chunks`), builds each chunk's emission statistics, and
keeps them as *parts*: on disk in a cache folder (the default; one ``.npz`` a part, read back
one part at a time) or in memory. Traces are grouped by depth into parts padded to a power of
two of steps, so one deep trace sizes only its own part. Its :meth:`~StreamedCorpus.counts` is
the exact E-step of the whole corpus, summed part by part, so :func:`latentsel.inference.em.fit_em`
fits it in memory bounded by a part, not by the corpus:

    >>> corpus = StreamedCorpus(["rollouts-0.jsonl.gz", "rollouts-1.jsonl.gz"], world)
    >>> fit = fit_em("modular", corpus)

Memory: a part of ``chunk`` traces at depth T holds ``chunk * T * R * K`` bytes of match counts
(64 MB for 65,536 depth-4 traces of the default world) plus the E-step's float64 work on 1,024
traces at a time.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import weakref
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from latentsel.inference.corpus import CHUNK, chunks, corpus_counts
from latentsel.inference.em import SuffStats, expected_counts
from latentsel.models.data import HiddenBlocks, HLSMData
from latentsel.models.registry import model_spec
from latentsel.traces.emission import build_data
from latentsel.traces.format import Trace
from latentsel.traces.columns import TraceColumns
from latentsel.traces.stream import CHUNK_TRACES, MAX_DEPTH, iter_chunks
from latentsel.world import World, default_world
from latentsel.world.loading import load_world

__all__ = ["StreamedCorpus", "save_part", "load_part", "depth_groups"]

_FIELDS = ("match", "length", "step_mask", "route_intended", "skill_intended", "emit_mask", "free_mask")
_BLOCK_LEVELS = ("nodes", "parents", "owners", "read_node", "read_step", "read_match")


def save_part(path: Path, data: HLSMData, rows: np.ndarray) -> None:
    """One part as an uncompressed ``.npz`` (no pickles): its arrays, blocks and trace numbers."""
    arrays = {name: getattr(data, name) if getattr(data, name) is not None else getattr(data, "step_mask")
              for name in _FIELDS}
    arrays["rows"] = np.asarray(rows, dtype=np.int64)
    arrays["meta"] = np.array([data.n_chars, data.max_len, len(data.blocks)], dtype=np.int64)
    for gi, g in enumerate(data.blocks):
        arrays[f"b{gi}_trace"], arrays[f"b{gi}_hidden"] = g.trace, g.hidden
        for name in _BLOCK_LEVELS:
            for level, a in enumerate(getattr(g, name)):
                arrays[f"b{gi}_{name}_{level}"] = a
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_part(path: Path) -> tuple[HLSMData, np.ndarray]:
    """``(data, rows)`` of a part written by :func:`save_part`."""
    with np.load(path, allow_pickle=False) as z:
        n_chars, max_len, n_groups = (int(v) for v in z["meta"])
        blocks = []
        for gi in range(n_groups):
            j = z[f"b{gi}_hidden"].shape[1]
            levels = {name: tuple(z[f"b{gi}_{name}_{level}"] for level in range(j)) for name in _BLOCK_LEVELS}
            blocks.append(HiddenBlocks(z[f"b{gi}_trace"], z[f"b{gi}_hidden"], **levels))
        data = HLSMData(*(z[name] for name in _FIELDS[:5]), n_chars, max_len, z["emit_mask"], z["free_mask"],
                        tuple(blocks))
        return data, z["rows"]


def depth_groups(depths: np.ndarray, max_cells: int) -> list[np.ndarray]:
    """The traces of a chunk grouped by depth bucket (the next power of two), each group cut
    so that ``traces * bucket <= max_cells``: index arrays into the chunk, in order."""
    buckets = np.array([1 << max(0, int(d) - 1).bit_length() for d in depths], dtype=np.int64)
    out = []
    for b in np.unique(buckets):
        idx = np.flatnonzero(buckets == b)
        per = max(1, max_cells // int(b))
        out.extend(idx[lo:lo + per] for lo in range(0, idx.size, per))
    return out


class _Parts:
    """Where the parts live: a cache folder or a list in memory."""

    def __init__(self, cache):
        self.memory: list | None = [] if cache == "memory" else None
        self.folder: Path | None = None
        self._owned = None
        if self.memory is None:
            if cache is None:
                self.folder = Path(tempfile.mkdtemp(prefix="latentsel-parts-"))
                self._owned = weakref.finalize(self, shutil.rmtree, self.folder, True)
            else:
                self.folder = Path(cache)
                self.folder.mkdir(parents=True, exist_ok=True)
                if any(self.folder.iterdir()):
                    raise ValueError(f"cache folder {self.folder} is not empty: give an empty or a new folder")
        self.n = 0
        self.sizes: list[int] = []  # traces per part
        self.with_blocks: list[bool] = []  # does the part hold hidden-step blocks?

    def reserve(self, n: int) -> list[Path] | None:
        """The files of the next ``n`` parts (``None`` in memory): numbered in reading order."""
        if self.memory is not None:
            return None
        files = [self.folder / f"part-{self.n + i:06d}.npz" for i in range(n)]
        self.n += n
        return files

    def collect(self, files, built: list) -> None:
        """The parts of one chunk, built: kept in memory (``(data, rows)``), or already written
        to ``files`` (``(traces, with blocks)``)."""
        if self.memory is not None:
            self.memory.extend(built)
            self.n += len(built)
            built = [(rows.size, bool(data.blocks)) for data, rows in built]
        self.sizes += [int(size) for size, _ in built]
        self.with_blocks += [blocks for _, blocks in built]

    def __iter__(self) -> Iterator[tuple[HLSMData, np.ndarray]]:
        return (self[i] for i in range(self.n))

    def __getitem__(self, i: int) -> tuple[HLSMData, np.ndarray]:
        return self.memory[i] if self.memory is not None else load_part(self.folder / f"part-{i:06d}.npz")

    def close(self) -> None:
        if self._owned is not None:
            self._owned()


def _start_worker(threads: int) -> None:
    """A build worker's compiled executor takes ``threads`` of the cores (the workers share them)."""
    from latentsel.world.compiled import set_threads  # numba loads in the workers, not in every importer
    set_threads(threads)


def _depths(traces) -> np.ndarray:
    if isinstance(traces, TraceColumns):
        return traces.depth
    return np.fromiter((len(tr.steps) for tr in traces), dtype=np.int64, count=len(traces))


def _plain(tr) -> Trace:
    """What the statistics read of a trace, as a :class:`Trace` (a decoded record's class is made
    per world and does not cross a process boundary)."""
    program = None if tr.program is None else [tuple(p) for p in tr.program]
    return Trace(tr.id, tr.input, program, list(tr.steps))


def _build_parts(world, model: str, max_depth: int, traces, first_row: int, max_cells: int, files):
    """The parts of one chunk: per depth group its statistics, written to ``files`` (one path a
    group) or returned. Runs here or in a worker process (``world`` then is its name)."""
    if not isinstance(world, World):
        world = load_world(world)
    depths = _depths(traces)
    out = []
    for j, idx in enumerate(depth_groups(depths, max_cells)):
        part = traces.take(idx) if isinstance(traces, TraceColumns) else [traces[i] for i in idx]
        data = build_data(part, world, model=model, max_depth=max_depth)
        rows = first_row + idx
        if files is None:
            out.append((data, rows))
        else:
            save_part(files[j], data, rows)
            out.append((idx.size, bool(data.blocks)))
    return out


class StreamedCorpus:
    """The emission statistics of trace files, built once in bounded chunks and read back a part at a time.

    Args:
        paths: trace files (JSONL, ``.gz`` read as gzip), read in order.
        world: the world of the traces: a :class:`~latentsel.world.World`, or its name (``None``
            for the default world, ``"MODULE:ATTR"``; see :func:`latentsel.world.loading.load_world`),
            which ``workers > 1`` needs unless it is the default world.
        model: the model the statistics are for (``grammar`` ignores the programs).
        cache: a folder for the parts (created; must be empty), ``None`` for a temporary folder
            removed with the corpus, or ``"memory"`` to keep them in memory.
        chunk: traces read and built at a time (bounds memory: ``chunk * T * R * K`` bytes a chunk
            being built, so ``workers + 1`` chunks at most).
        max_depth: the deepest trace accepted (a deeper one is a ``file:line`` error).
        skip_invalid, errors: as :func:`latentsel.traces.format.read_traces`.
        progress: a tqdm bar over the traces built.
        workers: processes building the statistics (the reading stays here, in order; parts are
            numbered in reading order, so the corpus is the same for any number of workers).

    Attributes: ``n_traces``, ``n_steps``, ``n_routes``, ``n_skills``, ``n_chars``, ``max_len``,
    ``n_parts``, ``max_depth_seen``, ``skipped`` (the errors of the records skipped).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], world=None, model: str = "modular", *,
                 cache=None, chunk: int | None = None, max_depth: int | None = None, skip_invalid: bool = False,
                 errors: list | None = None, progress: bool = False, workers: int = 1):
        chunk = CHUNK_TRACES if chunk is None else chunk
        self.skipped = errors = [] if errors is None else errors
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        spec = None
        if isinstance(world, World):
            if workers > 1 and world != default_world():
                raise TypeError("workers > 1 needs the world by name ('MODULE:ATTR'), so that every worker can "
                                "load it: a World holds functions that do not cross a process boundary")
        else:
            spec, world = world, load_world(world)
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.model = model
        self.n_routes, self.n_skills = world.n_routes, world.n_skills
        self.n_chars, self.max_len = world.n_chars, world.max_len
        self._parts = _Parts(cache)
        self.max_depth = MAX_DEPTH if max_depth is None else max_depth
        self.n_traces = self.n_steps = self.max_depth_seen = 0
        bar = tqdm(desc="building statistics", unit=" traces", unit_scale=True, leave=False) if progress else None
        pool = None
        if workers > 1:
            # the workers share the cores: each compiled executor takes its part of them
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker, initargs=(max(1, (os.cpu_count() or 1) // workers),))
        pending: deque = deque()
        try:
            for traces in iter_chunks(self.paths, world=world, chunk=chunk, skip_invalid=skip_invalid, errors=errors,
                                      max_depth=self.max_depth):
                depths = _depths(traces)
                n_groups = len(depth_groups(depths, chunk * 4))
                files = self._parts.reserve(n_groups)
                if pool is None:
                    self._parts.collect(files, _build_parts(world, model, self.max_depth, traces, self.n_traces,
                                                            chunk * 4, files))
                else:
                    sent = traces if isinstance(traces, TraceColumns) else [_plain(tr) for tr in traces]
                    pending.append((files, pool.submit(_build_parts, spec, model, self.max_depth, sent,
                                                       self.n_traces, chunk * 4, files)))
                    while len(pending) > workers:  # at most workers + 1 chunks in flight
                        done_files, future = pending.popleft()
                        self._parts.collect(done_files, future.result())
                self.n_traces += len(traces)
                self.n_steps += int(depths.sum())
                self.max_depth_seen = max(self.max_depth_seen, int(depths.max()))
                if bar is not None:
                    bar.update(len(traces))
            while pending:
                done_files, future = pending.popleft()
                self._parts.collect(done_files, future.result())
        except BaseException:
            if pool is not None:  # the workers stop writing before their folder goes
                pool.shutdown(wait=True, cancel_futures=True)
            self._parts.close()
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
        if self.n_traces == 0:
            self._parts.close()
            raise ValueError(f"the corpus is empty: no traces in {', '.join(map(str, self.paths))}")

    @property
    def n_parts(self) -> int:
        return self._parts.n

    def parts(self) -> Iterator[tuple[HLSMData, np.ndarray]]:
        """``(data, rows)`` of every part: its statistics and the corpus numbers of its traces."""
        return iter(self._parts)

    def minibatches(self, batch: int, seed: int = 0) -> Iterator[tuple[HLSMData, int]]:
        """Endless ``(data, n)``: minibatches of at most ``batch`` traces for stochastic fits
        (:func:`~latentsel.inference.svi.fit_svi_batches`), padded to one of a few shapes; ``n``
        is the number of real traces.

        A part (read once per visit) is cut, in a fresh random order, into its ``k`` minibatches,
        and a visit goes to a part with probability proportional to its traces over its ``k``.
        So each step's minibatch comes from a part with probability proportional to the part's
        traces and is a uniform sample of it, and the minibatch's evidence scaled by
        ``n_traces / n`` is an unbiased estimate of the corpus's, whatever the sizes of the
        parts. ``ValueError`` for a corpus with hidden-step blocks (fit it by EM)."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if any(self._parts.with_blocks):
            raise ValueError("the corpus has traces with hidden-step blocks: minibatch fits take traces "
                             "without them (fit it by EM)")
        sizes = np.asarray(self._parts.sizes, dtype=float)
        visits = np.ceil(sizes / batch)  # minibatches a visit to each part yields
        weight = sizes / visits / (sizes / visits).sum()
        rng = np.random.default_rng(seed)
        while True:
            data, _ = self._parts[int(rng.choice(self.n_parts, p=weight))]
            for rows, part in chunks(data.take(rng.permutation(data.n_traces)), batch, pad=True):
                yield part, rows.size

    def check_model(self, model: str) -> None:
        """``ValueError`` unless the statistics serve ``model`` (``grammar`` reads no programs)."""
        if model_spec(model).uses_program != model_spec(self.model).uses_program:
            raise ValueError(f"the statistics were built for the {self.model} model, not {model}")

    def counts(self, model: str, params, chunk: int = CHUNK):
        """The exact E-step of the corpus at ``params``: the summed ``SuffStats`` fields (numpy)."""
        self.check_model(model)
        total = None
        for data, _ in self.parts():
            values = corpus_counts(model, params, data, expected_counts, chunk)
            total = values if total is None else [a + b for a, b in zip(total, values)]
        return SuffStats(*total)

    def close(self) -> None:
        """Remove the parts (a temporary cache folder; a given ``cache`` folder is kept)."""
        self._parts.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
