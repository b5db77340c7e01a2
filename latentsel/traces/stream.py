"""Trace files read in bounded chunks: the reader of corpora too large to hold as one list.

:func:`iter_chunks` yields the traces of one or more JSONL files, at most ``chunk`` at a time.
A file is read in blocks of whole lines (bytes, not line objects), and each block is parsed
into Arrow columns and validated in vectorized passes (:func:`latentsel.traces.columns.read_columns`):
such a chunk is a :class:`~latentsel.traces.columns.TraceColumns`, which ``build_data`` reads
without a per-trace Python loop, and which decodes a record only when one is asked for. A block
that fails any check, or holds a record the fast path does not model (a malformed completion,
keys it does not know, blank lines it cannot strip), is read again line by line through
:func:`latentsel.traces.format.parse_line`, the one validator of the format: the errors and the
records accepted are exactly those of :func:`latentsel.traces.format.read_traces`, down to the
``file:line: reason`` of the first bad record.

Duplicate ids are found across the whole file with a sorted array of 64-bit hashes (8 bytes a
trace, not a set of strings); a hash that repeats is compared on the ids themselves.

A trace deeper than ``max_depth`` steps is refused with its ``file:line``: one 100,000-step trace
would otherwise size every padded array built from its chunk.
"""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from latentsel.traces.columns import Slow, TraceColumns, check_table, parse_block, read_columns
from latentsel.traces.failures import read_prefixes
from latentsel.traces.format import (TraceFormatError, _DEFAULT_WORLD, _open_binary, _open_lines, echo,
                                     parse_line)
from latentsel.world import World

__all__ = ["iter_chunks", "count_traces", "MAX_DEPTH", "CHUNK_TRACES"]

MAX_DEPTH = 1024
"""The deepest trace a streamed fit accepts by default (``max_depth`` / ``--max-depth``)."""

CHUNK_TRACES = 65_536
"""Traces per chunk by default: ~64 MB of emission statistics at depth 4 in the default world."""

_READ_BYTES = 1 << 22
"""Bytes per read of a trace file."""

_JSON_SPACE = b" \t\r\n"


class _Ids:
    """Duplicate ids of one file in 8 bytes a trace: a sorted array of the ids' hashes."""

    def __init__(self, path: Path):
        self.path = path
        self.hashes = np.empty(0, dtype=np.int64)
        self.lines = np.empty(0, dtype=np.int64)

    def first_line(self, ids: Sequence[str], lines: np.ndarray) -> list[int | None]:
        """Per id, the line of an earlier trace with the same id (``None`` if none), then record them."""
        h = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        out: list[int | None] = [None] * len(ids)
        order = np.argsort(h, kind="stable")  # the ids by hash (in line order within one hash)
        hs = h[order]
        right = np.searchsorted(self.hashes, hs, side="right")  # sorted queries: one sweep of the array
        hit = (right > 0) & (self.hashes[np.maximum(right - 1, 0)] == hs) if self.hashes.size else right < 0
        for k in np.flatnonzero(hit):  # a repeated hash: compare the ids themselves
            i, lo = order[k], int(np.searchsorted(self.hashes, hs[k]))
            while lo < self.hashes.size and self.hashes[lo] == h[i]:
                if _id_at(self.path, int(self.lines[lo])) == ids[i]:
                    out[i] = int(self.lines[lo])
                    break
                lo += 1
        # within the chunk: every later copy names the first (runs of one hash, in line order)
        starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
        ends = np.r_[starts[1:], hs.size]
        runs = ends - starts > 1
        for lo, hi in zip(starts[runs].tolist(), ends[runs].tolist()):
            first: dict[str, int] = {}
            for i in order[lo:hi]:
                if out[i] is None:  # (a copy of an earlier chunk's id is named already)
                    out[i] = first.get(ids[i])
                    first.setdefault(ids[i], int(lines[i]))
        kept = np.arange(hs.size)
        if hit.any() or runs.any():
            kept = np.flatnonzero(np.fromiter((out[i] is None for i in order), dtype=bool, count=hs.size))
        if kept.size:
            # sorted keys at non-decreasing positions: the merged array stays sorted (one copy, no sort)
            self.hashes = np.insert(self.hashes, right[kept], hs[kept])
            self.lines = np.insert(self.lines, right[kept], lines[order[kept]])
        return out


def _id_at(path: Path, line: int) -> str | None:
    for n, raw in enumerate(_open_lines(path), start=1):
        if n == line:
            try:  # the validating reader's decoder: it reads every id that reader accepted
                return json.loads(raw.decode("utf-8"))["id"]
            except Exception:  # noqa: BLE001 - a line read once already; anything else is no match
                return None
    return None


def _byte_blocks(f, chunk: int) -> Iterator[tuple[bytes, int]]:
    """``(block, lines)``: the file ``f`` in blocks of ``chunk`` whole lines (the last may be
    fewer, and may lack its final newline)."""
    pieces: list[bytes] = []
    newlines = 0
    while True:
        piece = f.read(_READ_BYTES)
        if not piece:
            break
        count = piece.count(b"\n")
        if newlines + count < chunk:
            pieces.append(piece)
            newlines += count
            continue
        nl = np.flatnonzero(np.frombuffer(piece, dtype=np.uint8) == 10)
        start, k = 0, chunk - newlines - 1  # the newline that ends the block
        while k < nl.size:
            cut = int(nl[k]) + 1
            pieces.append(piece[start:cut])
            yield b"".join(pieces), chunk
            pieces, start, k = [], cut, k + chunk
        pieces.append(piece[start:])
        newlines = nl.size - int(np.searchsorted(nl, start))
    rest = b"".join(pieces)
    if rest:
        yield rest, newlines + (not rest.endswith(b"\n"))


def _parsed_blocks(f, chunk: int) -> Iterator[tuple[bytes, int, object]]:
    """``(block, lines, table)``: :func:`_byte_blocks` with each block's Arrow table (``None``
    where the block needs the line-by-line parser)."""
    for block, n_lines in _byte_blocks(f, chunk):
        try:
            table = parse_block(block, n_lines)
        except Slow:
            table = None
        yield block, n_lines, table


_END = object()


def _ahead(items: Iterator) -> Iterator:
    """The items of ``items``, each next one made in a thread while the caller works on this one
    (reading and parsing release Python's lock). Exceptions come in order, with their item."""
    with ThreadPoolExecutor(1, thread_name_prefix="latentsel-read") as pool:
        future = pool.submit(next, items, _END)
        while (item := future.result()) is not _END:
            future = pool.submit(next, items, _END)
            yield item


def _split_lines(block: bytes) -> list[bytes]:
    """The lines of ``block`` as a file iterates them (each with its newline, the last maybe without)."""
    lines = block.split(b"\n")
    last = lines.pop()
    out = [line + b"\n" for line in lines]
    if last:
        out.append(last)
    return out


def _file_chunks(path: Path, world: World, chunk: int, skip_invalid: bool, errors: list | None,
                 max_depth: int) -> Iterator[Sequence]:
    ids = _Ids(path)

    def fail(reason: str, line: int) -> None:
        err = TraceFormatError(reason, str(path), line)
        if not skip_invalid:
            raise err from None
        if errors is not None:
            errors.append(err)

    def deep(depth: int) -> str:
        return (f"{depth} steps; the deepest trace a fit accepts is max_depth={max_depth} "
                "(max_depth= in Python, --max-depth on the command line)")

    def columns(cols: TraceColumns, numbers: np.ndarray) -> TraceColumns:
        """The block read as columns, less its repeated ids and too deep traces (line order)."""
        names = cols.ids
        firsts = ids.first_line(names, numbers)
        too_deep = cols.depth > max_depth
        if not too_deep.any() and firsts.count(None) == len(firsts):
            return cols
        bad = np.flatnonzero(too_deep | np.array([f is not None for f in firsts]))
        for i in bad.tolist():
            reason = (f"duplicate id {echo(names[i])} (first on line {firsts[i]})" if firsts[i] is not None
                      else deep(int(cols.depth[i])))
            fail(reason, int(numbers[i]))
        return cols.take(np.setdiff1d(np.arange(len(cols)), bad))

    def lines(buf: list[bytes], numbers: list[int]) -> Sequence:
        """The traces of the lines ``buf`` (line numbers ``numbers``)."""
        kept = [i for i, raw in enumerate(buf) if raw.strip()]
        if len(kept) < len(buf):
            buf, numbers = [buf[i] for i in kept], [numbers[i] for i in kept]
        if not buf:
            return []
        # lines with JSON whitespace around one object each: the same records without it
        stripped = [raw.strip(_JSON_SPACE) for raw in buf]
        if all(line[:1] == b"{" and line[-1:] == b"}" for line in stripped):
            try:
                return columns(read_columns(b"\n".join(stripped), len(stripped), world),
                               np.asarray(numbers, dtype=np.int64))
            except Slow:
                pass
        parsed = []
        for raw, n in zip(buf, numbers):
            try:
                tr = parse_line(raw, world)
            except TraceFormatError as e:
                parsed.append((n, e))
                continue
            if tr is not None:  # a line of Unicode whitespace only is blank, as read_traces reads it
                parsed.append((n, tr))
        good = [(n, tr) for n, tr in parsed if not isinstance(tr, TraceFormatError)]
        firsts = dict(zip((n for n, _ in good), ids.first_line([tr.id for _, tr in good],
                                                               np.asarray([n for n, _ in good], dtype=np.int64))))
        out = []
        for n, tr in parsed:  # line order: the first bad line is the one reported
            if isinstance(tr, TraceFormatError):
                fail(tr.reason, n)
            elif firsts[n] is not None:
                fail(f"duplicate id {echo(tr.id)} (first on line {firsts[n]})", n)
            elif tr.depth > max_depth:
                fail(deep(tr.depth), n)
            else:
                out.append(tr)
        return out

    line_no = 0
    try:
        with _open_binary(path) as f:
            for block, n_lines, table in _ahead(_parsed_blocks(f, chunk)):
                numbers = np.arange(line_no + 1, line_no + 1 + n_lines, dtype=np.int64)
                traces = None
                if table is not None:
                    try:
                        traces = columns(check_table(table, block, world), numbers)
                    except Slow:
                        pass
                if traces is None:
                    traces = lines(_split_lines(block), numbers.tolist())
                line_no += n_lines
                if len(traces):
                    yield traces
        return
    except (OSError, EOFError, zlib.error):
        pass  # read again line by line from the block that failed, to name the line the read fails at
    for block, first in _line_blocks(path, chunk, line_no):
        traces = lines(block, list(range(first, first + len(block))))
        if traces:
            yield traces


def _line_blocks(path: Path, chunk: int, skip: int) -> Iterator[tuple[list[bytes], int]]:
    """``(lines, number of the first)``: the lines of ``path`` after the first ``skip``, ``chunk``
    at a time. A read that fails yields the lines read before it, then raises the
    :class:`TraceFormatError` naming the line it fails at (as ``read_traces`` reads: those lines first)."""
    line_no = skip
    try:
        stream = islice(_open_lines(path), skip, None)
        while True:
            block: list[bytes] = []
            try:
                block.extend(islice(stream, chunk))  # (lines read before a failing one stay: its number is known)
            except (OSError, EOFError, zlib.error) as e:
                err = TraceFormatError(f"cannot read: {e}", str(path), line_no + len(block) + 1)
                if block:
                    yield block, line_no + 1
                raise err from None
            if not block:
                return
            yield block, line_no + 1
            line_no += len(block)
    except FileNotFoundError:
        raise TraceFormatError("no such file", str(path)) from None


def iter_chunks(paths: str | os.PathLike | Sequence[str | os.PathLike], *, world: World | None = None,
                chunk: int = CHUNK_TRACES, skip_invalid: bool = False, errors: list | None = None,
                max_depth: int = MAX_DEPTH, prefixes: bool = True) -> Iterator[Sequence]:
    """The traces of the files ``paths`` (JSONL, ``.gz`` read as gzip), at most ``chunk`` at a time.

    A chunk is a :class:`~latentsel.traces.columns.TraceColumns` where its block was read as
    columns (its items are light records with the attributes of a
    :class:`~latentsel.traces.format.Trace`: ``id``, ``input``, ``program`` as ``(routing, skill)``
    pairs, ``steps``, ``answer``, ``source``, ``truth``, ``depth``), and otherwise a list of
    :class:`~latentsel.traces.format.Trace`. :func:`latentsel.traces.emission.build_data` reads both.

    Accepts and refuses exactly what :func:`latentsel.traces.format.read_traces` does, with the
    same ``file:line: reason`` errors (``skip_invalid`` / ``errors`` as there), plus traces deeper
    than ``max_depth``. Ids must be unique within a file. With ``prefixes`` a malformed completion
    is cut to the steps read before its first failure (:func:`read_prefixes`), as every fit does.
    """
    world = world or _DEFAULT_WORLD()
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    for path in ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths)):
        for traces in _file_chunks(Path(path), world, chunk, skip_invalid, errors, max_depth):
            if prefixes and not isinstance(traces, TraceColumns):
                # only the line-by-line parser reads a malformed completion: columns are whole records
                traces = read_prefixes(traces)[0]
            if len(traces):
                yield traces


def count_traces(paths, **kwargs) -> int:
    """How many traces :func:`iter_chunks` yields (one pass over the files)."""
    return sum(len(c) for c in iter_chunks(paths, **kwargs))
