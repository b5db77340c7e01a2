"""Trace files read in bounded chunks: the reader of corpora too large to hold as one list.

:func:`iter_chunks` yields the traces of one or more JSONL files, at most ``chunk`` at a time.
Each chunk's lines are decoded by msgspec against a typed schema of the record (C code, no
per-field Python), then validated in bulk: every string of the chunk against the alphabet and
``max_len`` in one vectorized pass, names by dictionary lookups, the hidden-step rule only on
traces with hidden steps. A chunk that fails any check, or holds a record this fast path does
not model (a malformed completion, keys it does not know), is read again line by line through
:func:`latentsel.traces.format.parse_line`, the one validator of the format: the errors and the
records accepted are exactly those of :func:`latentsel.traces.format.read_traces`, down to the
``file:line: reason`` of the first bad record.

Duplicate ids are found across the whole file with a sorted array of 64-bit hashes (8 bytes a
trace, not a set of strings); a hash that repeats is compared on the ids themselves.

A trace deeper than ``max_depth`` steps is refused with its ``file:line``: one 100,000-step trace
would otherwise size every padded array built from its chunk.
"""
from __future__ import annotations

import os
from pathlib import Path
import gc
import json
from functools import lru_cache
from operator import attrgetter
from itertools import chain, islice
from typing import Any, Iterator, Literal, Optional, Sequence

import msgspec
import numpy as np

from latentsel.traces.failures import read_prefixes
from latentsel.traces.format import (TraceFormatError, _DEFAULT_WORLD, _open_lines, echo,
                                     hidden_run_error, parse_line)
from latentsel.world import World
from latentsel.world.executor import PAD, _lookup_table

__all__ = ["iter_chunks", "count_traces", "MAX_DEPTH", "CHUNK_TRACES"]

MAX_DEPTH = 1024
"""The deepest trace a streamed fit accepts by default (``max_depth`` / ``--max-depth``)."""

CHUNK_TRACES = 65_536
"""Traces per chunk by default: ~64 MB of emission statistics at depth 4 in the default world."""


class _Slow(Exception):
    """This chunk needs the line-by-line parser."""


def _depth(self) -> int:
    return len(self.steps)


def _extra(self) -> dict:
    return {}  # the fast path takes only records without other keys


@lru_cache(maxsize=8)
def _decoder(route_names: tuple[str, ...], skill_names: tuple[str, ...]) -> msgspec.json.Decoder:
    """The typed decoder of a record of a world: module names are literals, checked in C (and
    not copied: a decoded name is the literal's own string)."""
    route, skill = Literal[route_names], Literal[skill_names]
    truth = msgspec.defstruct("TruthRecord", [("routes", list[route]), ("skills", list[skill]), ("off", list[bool])],
                              forbid_unknown_fields=True, gc=False)
    # a record with any other key (``malformed``, extras) fails here and is read by the full parser
    record = msgspec.defstruct(
        "TraceRecord",
        [("id", str), ("input", str), ("steps", list[Optional[str]]),
         ("program", Optional[list[tuple[route, skill]]], None), ("answer", Optional[str], None),
         ("source", Optional[dict[str, Any]], None), ("truth", Optional[truth], None)],
        forbid_unknown_fields=True, gc=False,
        namespace={"depth": property(_depth), "extra": property(_extra), "__doc__": "A trace record decoded by the streaming reader."})
    return msgspec.json.Decoder(record)


def _fast_chunk(lines: list[bytes], world: World) -> list:
    """The records of ``lines`` (no blank ones), trace-like (``id``, ``input``, ``program``,
    ``steps``, ``depth``), or :class:`_Slow` if any line needs the full parser."""
    decode = _decoder(tuple(world.route_names), tuple(world.skill_names)).decode
    enabled = gc.isenabled()
    gc.disable()  # a chunk allocates a million small objects and frees none: no collection can help
    try:
        records = [decode(raw) for raw in lines]
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise _Slow from None
    finally:
        if enabled:
            gc.enable()
    n = len(records)
    steps = [rec.steps for rec in records]
    depth = np.fromiter(map(len, steps), dtype=np.int64, count=n)
    if not depth.all() or not all(rec.id for rec in records):
        raise _Slow
    programs = [rec.program for rec in records]
    if None in programs:
        if any(p is not None and len(p) != d for p, d in zip(programs, depth.tolist())):
            raise _Slow
    elif (np.fromiter(map(len, programs), dtype=np.int64, count=n) != depth).any():
        raise _Slow
    truths = [rec.truth for rec in records]
    if truths.count(None) < n:  # simulated records: every truth list as long as the steps
        have = np.array([t is not None for t in truths])
        truths = [t for t in truths if t is not None]
        for field in ("routes", "skills", "off"):
            if (np.fromiter(map(len, map(attrgetter(field), truths)), dtype=np.int64, count=len(truths))
                    != depth[have]).any():
                raise _Slow
    # every string of the chunk against the alphabet and max_len in one pass
    strings = [rec.input for rec in records]
    strings += chain.from_iterable(steps)
    if None in strings:  # hidden steps: the rule on their runs, and only observed strings checked
        if any(hidden_run_error(s) is not None for s in steps if None in s):
            raise _Slow
        strings = [s for s in strings if s is not None]
    strings += [rec.answer for rec in records if rec.answer is not None]
    lens = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    if lens.size and lens.max() > world.max_len:
        raise _Slow
    chars = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32)
    if (_lookup_table(world.alphabet)[np.minimum(chars, 0x10FFFF)] == PAD).any():
        raise _Slow
    return records


def _fast_type(world: World) -> type:
    """The class of the records :func:`_fast_chunk` decodes for ``world``."""
    return _decoder(tuple(world.route_names), tuple(world.skill_names)).type


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
        pos = np.searchsorted(self.hashes, h)
        hit = np.zeros(h.size, dtype=bool)
        if self.hashes.size:
            hit = (pos < self.hashes.size) & (self.hashes[np.minimum(pos, self.hashes.size - 1)] == h)
        for i in np.flatnonzero(hit):  # a repeated hash: compare the ids themselves
            lo = pos[i]
            while lo < self.hashes.size and self.hashes[lo] == h[i]:
                if _id_at(self.path, int(self.lines[lo])) == ids[i]:
                    out[i] = int(self.lines[lo])
                    break
                lo += 1
        # within the chunk: every later copy names the first (runs of one hash, in line order)
        order = np.argsort(h, kind="stable")
        hs = h[order]
        starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], hs.size]):
            if hi - lo < 2:
                continue
            first: dict[str, int] = {}
            for i in order[lo:hi]:
                if out[i] is None:  # (a copy of an earlier chunk's id is named already)
                    out[i] = first.get(ids[i])
                    first.setdefault(ids[i], int(lines[i]))
        keep = np.array([o is None for o in out], dtype=bool)
        if keep.any():
            order = np.argsort(h[keep], kind="stable")
            hk, lk = h[keep][order], lines[keep][order]
            # sorted keys at non-decreasing positions: the merged array stays sorted (one copy, no sort)
            at = np.searchsorted(self.hashes, hk, side="right")
            self.hashes = np.insert(self.hashes, at, hk)
            self.lines = np.insert(self.lines, at, lk)
        return out


def _id_at(path: Path, line: int) -> str | None:
    for n, raw in enumerate(_open_lines(path), start=1):
        if n == line:
            try:  # the validating reader's decoder: it reads every id that reader accepted
                return json.loads(raw.decode("utf-8"))["id"]
            except Exception:  # noqa: BLE001 - a line read once already; anything else is no match
                return None
    return None


def _file_chunks(path: Path, world: World, chunk: int, skip_invalid: bool, errors: list | None,
                 max_depth: int) -> Iterator[list]:
    ids = _Ids(path)
    line_no = 0
    block: list[bytes] = []

    def flush(buf: list[bytes], buf_lines: list[int]) -> list:
        """The traces of the lines ``buf`` (line numbers ``buf_lines``)."""
        try:
            records = _fast_chunk(buf, world)
        except _Slow:
            records = None
        if records is not None:  # every line decoded and valid: only ids and depths are left to check
            lines = np.asarray(buf_lines, dtype=np.int64)
            firsts = ids.first_line([rec.id for rec in records], lines)
            deep = np.fromiter(map(len, (rec.steps for rec in records)), dtype=np.int64, count=len(records)) > max_depth
            if not deep.any() and firsts.count(None) == len(firsts):
                return records
            parsed = list(zip(buf_lines, records))
            firsts = dict(zip(buf_lines, firsts))
            return report(parsed, firsts)
        parsed = []
        for raw, n in zip(buf, buf_lines):
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
        return report(parsed, firsts)

    def report(parsed, firsts):
        """The traces of ``parsed``, each bad line (a parse error, a repeated id, too many
        steps) raised or set aside in line order."""
        out = []
        for n, tr in parsed:  # line order: the first bad line is the one reported
            if isinstance(tr, TraceFormatError):
                reason = tr.reason
            elif firsts[n] is not None:
                reason = f"duplicate id {echo(tr.id)} (first on line {firsts[n]})"
            elif tr.depth > max_depth:
                reason = (f"{tr.depth} steps; the deepest trace a fit accepts is max_depth={max_depth} "
                          "(max_depth= in Python, --max-depth on the command line)")
            else:
                out.append(tr)
                continue
            err = TraceFormatError(reason, str(path), n)
            if not skip_invalid:
                raise err from None
            if errors is not None:
                errors.append(err)
        return out

    try:
        lines = _open_lines(path)
        while True:
            block = []  # ``chunk`` lines at a time, blank ones left out
            block.extend(islice(lines, chunk))  # (lines read before a failing one stay: its number is known)
            if not block:
                break
            numbers = list(range(line_no + 1, line_no + 1 + len(block)))
            line_no += len(block)
            if not all(map(bytes.strip, block)):
                kept = [i for i, raw in enumerate(block) if raw.strip()]
                numbers, block = [numbers[i] for i in kept], [block[i] for i in kept]
            traces = flush(block, numbers) if block else []
            if traces:
                yield traces
    except FileNotFoundError:
        raise TraceFormatError("no such file", str(path)) from None
    except (OSError, EOFError) as e:
        raise TraceFormatError(f"cannot read: {e}", str(path), line_no + len(block) + 1) from None
    except Exception as e:  # zlib.error from a corrupt gzip stream
        if type(e).__module__ == "zlib":
            raise TraceFormatError(f"cannot read: {e}", str(path), line_no + len(block) + 1) from None
        raise


def iter_chunks(paths: str | os.PathLike | Sequence[str | os.PathLike], *, world: World | None = None,
                chunk: int = CHUNK_TRACES, skip_invalid: bool = False, errors: list | None = None,
                max_depth: int = MAX_DEPTH, prefixes: bool = True) -> Iterator[list]:
    """The traces of the files ``paths`` (JSONL, ``.gz`` read as gzip), at most ``chunk`` at a time.

    A chunk holds :class:`~latentsel.traces.format.Trace` objects where a line needed the full
    parser, and otherwise light records with the same attributes (``id``, ``input``, ``program``
    as ``(routing, skill)`` pairs, ``steps``, ``answer``, ``source``, ``truth``, ``depth``): what
    :func:`latentsel.traces.emission.build_data` reads.

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
    fast = _fast_type(world)
    for path in ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths)):
        for traces in _file_chunks(Path(path), world, chunk, skip_invalid, errors, max_depth):
            if prefixes and not all(type(tr) is fast for tr in traces):
                # only the full parser reads a malformed completion: records of the fast path are whole
                traces = read_prefixes(traces)[0]
            if traces:
                yield traces


def count_traces(paths, **kwargs) -> int:
    """How many traces :func:`iter_chunks` yields (one pass over the files)."""
    return sum(len(c) for c in iter_chunks(paths, **kwargs))
