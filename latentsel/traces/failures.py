"""What went wrong in a policy's completion, step by step, before any model sees it.

A sampled completion (``latentsel sample``) is parsed into exactly ``depth`` steps; a step that
could not be read is ``None`` and the record's ``malformed`` field gives the reasons, joined by
``"; "``. The reasons are written by :mod:`latentsel.policy.tokenizer` through the functions of
this module, so that the two sides read and write one grammar:

* ``no end token``: the completion never stopped (it ran on to the sampling budget);
* ``step T holds a non-character token`` / ``step T is longer than max_len=N``: step T is unreadable;
* ``J of D steps``: the completion stopped after J of the program's D steps;
* ``J steps for a program of D``: it wrote more steps than the program has (ran on).

A missing step of a *malformed* completion is a failure, never a hidden step: the HLSM reads
``None`` as an executed, noise-free step (DESIGN §4), which would credit a completion that
stopped early with a perfect execution. :func:`completion_status` classifies every step;
:func:`fitted_prefix` is the part of a trace a model may be fitted to: the steps before the
first failed one (the steps after an unreadable one are conditioned on a history nobody saw).
"""
from __future__ import annotations

import re
from typing import NamedTuple

from latentsel.traces.format import Trace

__all__ = ["StepStatus", "CompletionStatus", "completion_status", "fitted_prefix", "read_prefixes", "is_malformed",
           "NO_END",
           "unreadable_reason", "overlong_reason", "stopped_reason", "ran_on_reason"]

NO_END = "no end token"


def unreadable_reason(t: int) -> str:
    """Step ``t`` (1-based) holds a token that is not a character."""
    return f"step {t} holds a non-character token"


def overlong_reason(t: int, max_len: int) -> str:
    """Step ``t`` (1-based) has more than ``max_len`` characters."""
    return f"step {t} is longer than max_len={max_len}"


def stopped_reason(written: int, depth: int) -> str:
    """The completion ended after ``written`` of ``depth`` steps."""
    return f"{written} of {depth} steps"


def ran_on_reason(written: int, depth: int) -> str:
    """The completion wrote ``written`` steps for a program of ``depth``."""
    return f"{written} steps for a program of {depth}"


_STOPPED = re.compile(r"^(\d+) of (\d+) steps$")
_RAN_ON = re.compile(r"^(\d+) steps for a program of (\d+)$")


class StepStatus:
    """The status of one step of a completion (plain strings, so they serialize as they are)."""

    OK = "ok"                    # read; a model may explain it
    UNREADABLE = "unreadable"    # written, but not a string of the world's alphabet (or too long)
    STOPPED = "stopped"          # never written: the completion ended first
    AFTER = "after_failure"      # read, but after an unreadable step, so its history is unknown
    ALL = (OK, UNREADABLE, STOPPED, AFTER)


class CompletionStatus(NamedTuple):
    """``steps``: one :class:`StepStatus` per program step; ``ran_on``: the completion did not
    stop where the program ends; ``reason``: the record's ``malformed`` text (``None`` if none)."""

    steps: tuple[str, ...]
    ran_on: bool
    reason: str | None

    @property
    def n_fitted(self) -> int:
        """The steps before the first failed one: the prefix a model is fitted to."""
        n = 0
        for s in self.steps:
            if s != StepStatus.OK:
                break
            n += 1
        return n


def is_malformed(trace: Trace) -> bool:
    """Does the record say its completion is malformed (a non-null ``malformed`` field)?"""
    return trace.extra.get("malformed") is not None


def completion_status(trace: Trace) -> CompletionStatus:
    """Classify every step of ``trace`` from its steps and its ``malformed`` reasons.

    A trace that is not malformed keeps its ``None`` steps as hidden steps (compressed
    traces, DESIGN §4): every step is ``ok``. In a malformed one, the trailing steps a
    ``J of D steps`` reason names are ``stopped``, every other ``None`` is ``unreadable``, and a
    read step after an unreadable one is ``after_failure``. A reason this module cannot read
    leaves the ``None`` steps ``unreadable``, so nothing is ever taken for a hidden step.
    """
    reason = trace.extra.get("malformed")
    depth = trace.depth
    if reason is None:
        return CompletionStatus((StepStatus.OK,) * depth, False, None)
    parts = [p.strip() for p in str(reason).split(";")]
    written, ran_on = depth, False
    for part in parts:
        if part == NO_END:
            ran_on = True
        elif (m := _STOPPED.match(part)) is not None:
            written = min(int(m[1]), depth)
        elif _RAN_ON.match(part) is not None:
            ran_on = True
    steps, failed = [], False
    for t, y in enumerate(trace.steps):
        if t >= written and y is None:
            steps.append(StepStatus.STOPPED)
            failed = True
        elif y is None:
            steps.append(StepStatus.UNREADABLE)
            failed = True
        else:
            steps.append(StepStatus.AFTER if failed else StepStatus.OK)
    return CompletionStatus(tuple(steps), ran_on, str(reason))


def fitted_prefix(trace: Trace, status: CompletionStatus | None = None) -> Trace | None:
    """The trace cut to the steps a model may be fitted to (its program cut alike), or ``None``
    when not even its first step was read. A trace that is not malformed is returned as it is."""
    status = completion_status(trace) if status is None else status
    if status.reason is None:
        return trace
    n = status.n_fitted
    if n == 0:
        return None
    program = None if trace.program is None else list(trace.program[:n])
    return Trace(trace.id, trace.input, program, list(trace.steps[:n]), None, trace.source, trace.truth,
                 dict(trace.extra))


def read_prefixes(traces) -> tuple[list[Trace], int, int]:
    """Every trace as a model may see it: a malformed completion cut to its read prefix (one
    with no step read left out), every other trace as it is. Returns ``(traces, cut, left_out)``:
    the malformed completions cut, and those left out."""
    out, cut, left_out = [], 0, 0
    for tr in traces:
        if not is_malformed(tr):
            out.append(tr)
            continue
        prefix = fitted_prefix(tr)
        if prefix is None:
            left_out += 1
            continue
        cut += prefix.depth < tr.depth
        out.append(prefix)
    return out, cut, left_out
