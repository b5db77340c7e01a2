"""Trace files (DESIGN §3): JSON Lines, one trace per line, UTF-8, optionally gzipped.

``read_traces`` validates every record against a world and reports the first bad one as
``file:line: reason`` (a :class:`TraceFormatError`), or, with ``skip_invalid=True``, skips
the bad ones and hands their errors back. ``write_traces`` writes atomically.

A record is valid only if a model can be fitted to it: :func:`hidden_run_error` is the one
statement of which runs of hidden steps the exact enumeration reads (DESIGN §4), and the
reader, ``simulate`` and ``build_data`` all ask it. An error echoes a value of the record cut
to a few hundred characters (:func:`echo`), so a huge field never makes a huge message.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import reprlib
import stat
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from latentsel._io import atomic_open
from latentsel.world import World, default_world
from latentsel.world.types import unknown_name

__all__ = ["Trace", "Truth", "TraceFormatError", "read_traces", "iter_traces", "write_traces", "parse_trace", "golden_trace",
           "MAX_HIDDEN_RUN", "hidden_run_error", "echo", "parse_line"]

_KNOWN_KEYS = ("id", "input", "program", "steps", "answer", "source", "truth")


class TraceFormatError(ValueError):
    """A trace file or record is invalid; ``str()`` is ``path:line: reason``."""

    def __init__(self, reason: str, path: str | None = None, line: int | None = None):
        self.reason, self.path, self.line = reason, path, line
        where = ":".join(str(p) for p in (path, line) if p is not None)
        super().__init__(f"{where}: {reason}" if where else reason)


@dataclass(frozen=True)
class Truth:
    """The executed selections of a simulated trace, one entry per step."""

    routes: tuple[str, ...]
    skills: tuple[str, ...]
    off: tuple[bool, ...]

    def to_dict(self) -> dict:
        return {"routes": list(self.routes), "skills": list(self.skills), "off": list(self.off)}


@dataclass
class Trace:
    """One reasoning trace.

    Attributes:
        id: identifier, unique within a file.
        input: the input string ``h_0``.
        program: the intended program ``[(route, skill), ...]``, or ``None`` when the prompt
            does not state it.
        steps: observed intermediate results, one per step; ``None`` = not observed.
        answer: the final answer, if given separately (else the last step).
        source: free-form provenance.
        truth: the executed selections, for simulated data.
        extra: any further keys of the record, kept for the round trip.
    """

    id: str
    input: str
    program: list[tuple[str, str]] | None
    steps: list[str | None]
    answer: str | None = None
    source: dict = field(default_factory=dict)
    truth: Truth | None = None
    extra: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def final(self) -> str | None:
        """The answer: ``answer`` if given, else the last step."""
        return self.answer if self.answer is not None else self.steps[-1]

    def to_dict(self) -> dict:
        out = {
            "id": self.id,
            "input": self.input,
            "program": None if self.program is None else [[r, k] for r, k in self.program],
            "steps": list(self.steps),
        }
        if self.answer is not None:
            out["answer"] = self.answer
        out["source"] = dict(self.source)
        if self.truth is not None:
            out["truth"] = self.truth.to_dict()
        out.update(self.extra)
        return out


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
MAX_HIDDEN_RUN = 2
"""The most hidden steps in a row that may precede an observed step (DESIGN §4): the exact
enumeration of a block of hidden steps grows as (R*K)^run."""


def hidden_run_error(steps: Sequence[str | None]) -> str | None:
    """Why the hidden (``None``) steps of ``steps`` cannot be fitted, or ``None`` if they can.

    The rule: at most :data:`MAX_HIDDEN_RUN` consecutive hidden steps before an observed one;
    trailing hidden steps (no observed step after them) contribute a factor 1, any number of
    them. The reader, ``simulate(hide=...)`` and ``build_data`` all apply this function.
    """
    run = 0
    for t, y in enumerate(steps):
        if y is None:
            run += 1
            continue
        if run > MAX_HIDDEN_RUN:
            return (f"steps {t - run + 1}-{t} are hidden; at most {MAX_HIDDEN_RUN} consecutive hidden steps "
                    f"can precede an observed one")
        run = 0
    return None


_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxstring, _ECHO.maxother = 3, 120, 120


def echo(value, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters (``…`` marks a cut): what an error message
    quotes of user input, so that a 20 MB field gives a short message."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("…" if len(value) > limit else "")
    text = _ECHO.repr(value)  # reprlib: bounded work however long or deep the value is
    return text if len(text) <= limit else text[:limit] + "…"


@lru_cache(maxsize=16)
def _string_pattern(alphabet: str, max_len: int) -> re.Pattern:
    return re.compile(f"[{re.escape(alphabet)}]{{0,{max_len}}}")


def _check_string(value, what: str, world: World) -> str:
    if not isinstance(value, str):
        raise TraceFormatError(f"{what} must be a string, got {_typename(value)}")
    if not _string_pattern(world.alphabet, world.max_len).fullmatch(value):
        if len(value) > world.max_len:
            raise TraceFormatError(f"{what} has length {len(value)} > max_len={world.max_len}")
        bad = "".join(sorted(set(value) - set(world.alphabet)))
        raise TraceFormatError(f"{what} {echo(value)} has characters outside the alphabet: {echo(bad)}")
    return value


def _typename(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_names(values, what: str, names: dict, n: int) -> tuple[str, ...]:
    if not isinstance(values, list) or len(values) != n:
        raise TraceFormatError(f"{what} must be a list of {n} names")
    for i, v in enumerate(values):
        if not isinstance(v, str) or v not in names:
            raise TraceFormatError(f"{what}[{i}]: unknown name {echo(v)}")
    return tuple(values)


# the hint of an unknown module name: the usual cause is traces of a user's world read as the default's
_OTHER_WORLD = "; traces of another world? pass it (world= in Python, --world MODULE:ATTR on the command line)"


def parse_trace(obj, world: World | None = None) -> Trace:
    """Validate a decoded JSON record and build a :class:`Trace` (no file position)."""
    world = world or _DEFAULT_WORLD()
    if not isinstance(obj, dict):
        raise TraceFormatError(f"a record must be a JSON object, got {_typename(obj)}")
    for key in ("id", "input", "steps"):
        if key not in obj:
            raise TraceFormatError(f"missing key {key!r}")
    tid = obj["id"]
    if not isinstance(tid, str) or not tid:
        raise TraceFormatError(f"id must be a non-empty string, got {echo(tid)}")
    x = _check_string(obj["input"], "input", world)

    steps = obj["steps"]
    if not isinstance(steps, list) or not steps:
        raise TraceFormatError("steps must be a non-empty list")
    steps = [None if s is None else _check_string(s, f"steps[{i}]", world) for i, s in enumerate(steps)]

    program = obj.get("program")
    if program is not None:
        if not isinstance(program, list):
            raise TraceFormatError(f"program must be a list of [routing, skill] pairs or null, got {_typename(program)}")
        if len(program) != len(steps):
            raise TraceFormatError(f"steps has length {len(steps)} but program has length {len(program)}")
        pairs = []
        for i, pair in enumerate(program):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise TraceFormatError(f"program[{i}] must be a [routing, skill] pair of names, got {echo(pair)}")
            route, skill = pair
            if route not in world._route_index:
                raise TraceFormatError(f"program[{i}]: {unknown_name('routing', route, world.route_names)}"
                                       f"{_OTHER_WORLD}")
            if skill not in world._skill_index:
                raise TraceFormatError(f"program[{i}]: {unknown_name('skill', skill, world.skill_names)}"
                                       f"{_OTHER_WORLD}")
            pairs.append((route, skill))
        program = pairs

    answer = obj.get("answer")
    if answer is not None:
        _check_string(answer, "answer", world)

    source = obj.get("source", {})
    if source is None:
        source = {}
    if not isinstance(source, dict):
        raise TraceFormatError(f"source must be an object, got {_typename(source)}")

    truth = obj.get("truth")
    if truth is not None:
        if not isinstance(truth, dict):
            raise TraceFormatError(f"truth must be an object, got {_typename(truth)}")
        for key in ("routes", "skills", "off"):
            if key not in truth:
                raise TraceFormatError(f"truth is missing {key!r}")
        n = len(steps)
        routes = _check_names(truth["routes"], "truth.routes", world._route_index, n)
        skills = _check_names(truth["skills"], "truth.skills", world._skill_index, n)
        off = truth["off"]
        if not isinstance(off, list) or len(off) != n or not all(isinstance(u, bool) for u in off):
            raise TraceFormatError(f"truth.off must be a list of {n} booleans")
        truth = Truth(routes, skills, tuple(off))

    # a malformed completion's missing steps are failures, not hidden steps (traces/failures.py):
    # any number of them is a valid record of what the policy wrote
    if obj.get("malformed") is None and (reason := hidden_run_error(steps)) is not None:
        raise TraceFormatError(reason)

    extra = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    return Trace(tid, x, program, steps, answer, source, truth, extra)


@lru_cache(maxsize=1)
def _DEFAULT_WORLD() -> World:
    return default_world()


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e999 parses as inf, which no JSON writer can write back: refused here, as Infinity is
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of the float64 range")
    return value


def _open_lines(path: Path) -> Iterator[bytes]:
    """The lines of a regular file (gunzipped for ``.gz``); :class:`TraceFormatError` for anything
    else, decided before the file is opened: a FIFO would block, a device might never end."""
    with _open_binary(path) as f:
        yield from f


@contextmanager
def _open_binary(path: Path):
    """A regular file opened for binary reading (gunzipped for ``.gz``); see :func:`_open_lines`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise TraceFormatError("no such file", str(path)) from None
    if stat.S_ISDIR(mode):
        raise TraceFormatError("is a directory, not a trace file", str(path))
    if not stat.S_ISREG(mode):
        raise TraceFormatError("not a regular file (a named pipe, device or socket); trace files are regular files",
                               str(path))
    # non-blocking, so that a FIFO swapped in after the stat cannot block the open; fstat says what was opened
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TraceFormatError("not a regular file (it changed while being opened)", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz"
                                      else nullcontext(raw)) as f:
        yield f


def parse_line(raw: bytes, world: World) -> Trace | None:
    """One line of a trace file as a validated :class:`Trace` (``None`` for a blank line);
    :class:`TraceFormatError` without a position for a bad one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise TraceFormatError("invalid JSON: nested too deeply") from None
    except ValueError as e:
        raise TraceFormatError(f"invalid JSON: {e}") from None
    return parse_trace(obj, world)


def iter_traces(
    path: str | os.PathLike, *, world: World | None = None, skip_invalid: bool = False, errors: list | None = None
) -> Iterator[Trace]:
    """Yield the traces of a JSONL file (``.gz`` read as gzip), validated against ``world``.

    Raises :class:`TraceFormatError` naming file and line at the first invalid record,
    unless ``skip_invalid``: then bad records are skipped and their errors appended to
    ``errors`` (when given). Blank lines are not records and are ignored.
    """
    path = Path(path)
    world = world or _DEFAULT_WORLD()
    seen: dict[str, int] = {}
    line_no = 0
    try:
        for line_no, raw in enumerate(_open_lines(path), start=1):
            try:
                trace = parse_line(raw, world)
                if trace is None:
                    continue
                if trace.id in seen:
                    raise TraceFormatError(f"duplicate id {echo(trace.id)} (first on line {seen[trace.id]})")
                seen[trace.id] = line_no
            except TraceFormatError as e:
                err = TraceFormatError(e.reason, str(path), line_no)
                if not skip_invalid:
                    raise err from None
                if errors is not None:
                    errors.append(err)
                continue
            yield trace
    except FileNotFoundError:  # removed between the stat and the open
        raise TraceFormatError("no such file", str(path)) from None
    except (OSError, EOFError, zlib.error) as e:
        # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError
        raise TraceFormatError(f"cannot read: {e}", str(path), line_no + 1) from None


def read_traces(
    path: str | os.PathLike, *, world: World | None = None, skip_invalid: bool = False, errors: list | None = None
) -> list[Trace]:
    """All traces of a JSONL file; see :func:`iter_traces`."""
    return list(iter_traces(path, world=world, skip_invalid=skip_invalid, errors=errors))


def write_traces(path: str | os.PathLike, traces: Iterable[Trace], *, world: World | None = None) -> int:
    """Write traces as JSONL (gzip for a ``.gz`` path), atomically; returns the count.

    Every trace is validated first (against ``world``), so a file this writes always reads back.
    """
    world = world or _DEFAULT_WORLD()
    n = 0
    ids: set[str] = set()
    with atomic_open(path, "w") as f:
        for n, trace in enumerate(traces, start=1):
            record = trace.to_dict()
            try:
                parse_trace(record, world)
                if trace.id in ids:
                    raise TraceFormatError(f"duplicate id {echo(trace.id)}")
            except TraceFormatError as e:
                raise TraceFormatError(f"trace {n} (id {echo(trace.id)}) is invalid: {e.reason}", str(path)) from None
            ids.add(trace.id)
            try:
                line = json.dumps(record, separators=(", ", ": "), allow_nan=False)
            except ValueError:
                raise TraceFormatError(f"trace {n} (id {echo(trace.id)}) is invalid: it holds NaN or an infinite number, "
                                       "which JSON cannot hold", str(path)) from None
            f.write(line)
            f.write("\n")
    return n


def golden_trace(tid: str, x: str, program: Sequence[tuple[str, str]], world: World, source: dict) -> Trace:
    """A faithful trace: the world's own execution of ``program`` on ``x``."""
    program = [(world.routes[world.route_index(r)].name, world.skills[world.skill_index(k)].name) for r, k in program]
    steps = world.run(program, x)
    truth = Truth(tuple(r for r, _ in program), tuple(k for _, k in program), (False,) * len(program))
    return Trace(tid, x, program, list(steps), None, dict(source), truth)
