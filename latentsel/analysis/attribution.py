"""Where every step of a policy's completions went, counted up to what the data can tell apart.

Every step of every program ends in exactly one of these categories (expected counts under the
fitted posterior, so a step's row sums to 1):

============== =========================================================================
intended       on-module, executing a module the step cannot tell from the intended one,
               and the step is exactly that module's output
near_miss      the same module, but the step has character errors (the emission's noise)
inherited      the same module and an exact output, but the step's input was already
               wrong: the intended module applied to the observed earlier steps misses
               the golden result
routing        on-module, executing a module of another class that differs from the
               intended one by its routing only (some member of its class has the
               intended skill, none the intended routing)
skill          ... by its skill only (some member has the intended routing, none the
               intended skill)
either         ... by its routing or by its skill: its class holds members of both kinds,
               so the step cannot say which one went wrong
routing_skill  ... by both (no member has the intended routing or the intended skill)
off_module     not explained by any module (the off-module branch)
stopped        never written: the completion ended early
unreadable     written but not readable (a non-character token, or too long)
after_failure  read, but after an unreadable step; not fitted (its history is unknown)
============== =========================================================================

"Cannot tell from" is per step (DESIGN §6 restricted to one step): two modules are equivalent
at a step when they give it the same emission, i.e. the same ``match`` count. At t = 1 the
routings ``prev``, ``input``, ``skip``, ``longest`` and ``shortest`` all read the input, so a
step that executed ``input`` where ``prev`` was intended is not a routing error: no data could
say which ran. The last three categories are the failures a fit cannot see; they come from
:func:`latentsel.traces.failures.completion_status`, never from the model. A completion that
ran on past the program is counted per trace (``ran_on``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from latentsel.models.data import HLSMData
from latentsel.traces import Trace
from latentsel.traces.failures import CompletionStatus, StepStatus
from latentsel.world import World

__all__ = ["CATEGORIES", "LABELS", "FITTED", "INTENDED_MODULE", "Attribution", "attribute"]

CATEGORIES = ("intended", "near_miss", "inherited", "routing", "skill", "either", "routing_skill", "off_module",
              "stopped", "unreadable", "after_failure")
LABELS = {"intended": "as intended", "near_miss": "near miss", "inherited": "inherited error",
          "routing": "routing error",
          "skill": "skill error", "either": "routing or skill error", "routing_skill": "routing and skill error", "off_module": "off-module",
          "stopped": "stopped early", "unreadable": "unreadable step", "after_failure": "after an unreadable step"}
# the categories the fitted model explains (the others come from the completion itself)
FITTED = CATEGORIES[:8]
# the intended module ran (exactly, with character errors, or on a wrong input)
INTENDED_MODULE = CATEGORIES[:3]
_STATUS_CATEGORY = {StepStatus.STOPPED: "stopped", StepStatus.UNREADABLE: "unreadable",
                    StepStatus.AFTER: "after_failure"}


class Attribution(NamedTuple):
    """The attribution of a corpus.

    Attributes:
        mass: [N, T, C], the expected count of each category (``CATEGORIES``) at every step of
            every trace; a program step's row sums to 1, entries past a trace's depth are 0.
        depth: int[N], the program length of each trace.
        ran_on: bool[N], the completion did not stop where its program ends.
        trace_ids: the N trace ids.
        confusions: [M, M], expected on-module steps that executed module ``b`` (column) where
            ``a`` (row) was intended, over the modules not equivalent to ``a`` at that step
            (module m = r·K + k).
        route_counts: [T, R, R] and skill_counts: [T, K, K], expected on-module executions per
            step position, intended (row) against executed (column), at the label level.
    """

    mass: np.ndarray
    depth: np.ndarray
    ran_on: np.ndarray
    trace_ids: tuple
    confusions: np.ndarray
    route_counts: np.ndarray
    skill_counts: np.ndarray

    @property
    def n_steps(self) -> int:
        """The program steps of the corpus."""
        return int(self.depth.sum())

    def rates(self) -> dict[str, float]:
        """The share of program steps in each category, plus ``ran_on`` (a share of traces)."""
        total = self.mass.sum(axis=(0, 1)) / max(self.n_steps, 1)
        return {**{c: float(v) for c, v in zip(CATEGORIES, total)},
                "ran_on": float(self.ran_on.mean()) if self.ran_on.size else 0.0}

    def by_step(self) -> np.ndarray:
        """[T, C]: the share of each category among the programs' t-th steps."""
        per = self.mass.sum(axis=0)
        n = np.maximum(per.sum(axis=1, keepdims=True), 1e-300)
        return np.where(per.sum(axis=1, keepdims=True) > 0, per / n, 0.0)

    def top_confusions(self, world: World, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` largest intended -> executed confusions: (intended, executed, expected steps)."""
        flat = np.argsort(self.confusions, axis=None)[::-1][:n]
        rows = []
        for f in flat:
            a, b = np.unravel_index(f, self.confusions.shape)
            if self.confusions[a, b] <= 0:
                break
            rows.append((world.module_name(int(a)), world.module_name(int(b)), float(self.confusions[a, b])))
        return rows


def _step_classes(match: np.ndarray, c_r: np.ndarray, c_k: np.ndarray):
    """For steps ``match: int8[S, R, K]`` with intended modules ``(c_r, c_k): int[S]``: bool[S, R, K]
    masks of the modules equivalent to the intended one, of those whose class holds a module
    with the intended skill, and of those whose class holds one with the intended routing."""
    s = np.arange(match.shape[0])
    intended = match[s, c_r, c_k]
    same = match == intended[:, None, None]
    with_skill = match[s, :, c_k]  # [S, R]: the matches of the modules that keep the intended skill
    with_route = match[s, c_r, :]  # [S, K]
    route_only = (match[..., None] == with_skill[:, None, None, :]).any(-1)
    skill_only = (match[..., None] == with_route[:, None, None, :]).any(-1)
    return same, route_only, skill_only


def attribute(traces: Sequence[Trace], world: World, statuses: Sequence[CompletionStatus],
              fitted: Sequence[int], data: HLSMData | None, on: np.ndarray | None, off: np.ndarray | None, *,
              chunk: int = 2048) -> Attribution:
    """Attribute every step of ``traces``.

    Args:
        traces: the corpus as read (N traces), with their completion ``statuses``.
        fitted: int[F], the trace behind each row of ``data`` (the fitted prefixes, see
            :func:`latentsel.traces.failures.fitted_prefix`).
        data: the statistics of the fitted prefixes; every step observed and free (``None``,
            with ``on`` and ``off``, when no step of the corpus was read).
        on: [F, T', R, K], p(r_t = r, k_t = k, u_t = 0 | D) at each fitted step; off: [F, T'],
            p(u_t = 1 | D) (see :func:`latentsel.analysis.stepwise.step_joint`).
    """
    n = len(traces)
    depth = np.array([tr.depth for tr in traces], dtype=np.int64)
    t_max = int(depth.max(initial=0))
    r_n, k_n = world.n_routes, world.n_skills
    mass = np.zeros((n, t_max, len(CATEGORIES)))
    col = {c: i for i, c in enumerate(CATEGORIES)}
    for i, st in enumerate(statuses):
        for t, s in enumerate(st.steps):
            if s in _STATUS_CATEGORY:
                mass[i, t, col[_STATUS_CATEGORY[s]]] = 1.0
    confusions = np.zeros((r_n * k_n, r_n * k_n))
    route_counts = np.zeros((t_max, r_n, r_n))
    skill_counts = np.zeros((t_max, k_n, k_n))
    fitted = np.asarray(fitted, dtype=np.int64)
    if data is not None:
        on, off = np.asarray(on, dtype=np.float64), np.asarray(off, dtype=np.float64)
    rows, steps = np.nonzero(data.step_mask) if data is not None else (np.zeros(0, int), np.zeros(0, int))
    for lo in range(0, rows.size, chunk):
        j, t = rows[lo:lo + chunk], steps[lo:lo + chunk]
        c_r, c_k = data.route_intended[j, t], data.skill_intended[j, t]
        match = np.asarray(data.match[j, t])
        same, route_only, skill_only = _step_classes(match, c_r, c_k)
        exact = match[np.arange(len(j)), c_r, c_k] == data.length[j, t]
        w = on[j, t]
        i = fitted[j]
        inherited = np.array([_inherited(traces[a], b, world) for a, b in zip(i, t)], dtype=bool)
        mine = (w * same).sum((1, 2))
        other = w * ~same
        routing = (other * (route_only & ~skill_only)).sum((1, 2))
        skill = (other * (~route_only & skill_only)).sum((1, 2))
        either = (other * (route_only & skill_only)).sum((1, 2))
        both = (other * (~route_only & ~skill_only)).sum((1, 2))
        mass[i, t, col["intended"]] = np.where(exact & ~inherited, mine, 0.0)
        mass[i, t, col["near_miss"]] = np.where(~exact, mine, 0.0)
        mass[i, t, col["inherited"]] = np.where(exact & inherited, mine, 0.0)
        mass[i, t, col["routing"]] = routing
        mass[i, t, col["skill"]] = skill
        mass[i, t, col["either"]] = either
        mass[i, t, col["routing_skill"]] = both
        mass[i, t, col["off_module"]] = off[j, t]
        np.add.at(confusions, c_r * k_n + c_k, other.reshape(len(j), -1))
        np.add.at(route_counts, (t, c_r), w.sum(2))
        np.add.at(skill_counts, (t, c_k), w.sum(1))
    ran_on = np.array([st.ran_on for st in statuses], dtype=bool)
    return Attribution(mass, depth, ran_on, tuple(tr.id for tr in traces), confusions, route_counts, skill_counts)


def _inherited(trace: Trace, t: int, world: World) -> bool:
    """Does the intended module, applied to the observed steps before ``t``, miss the golden step?"""
    r, k = trace.program[t]
    golden = world.run(trace.program[: t + 1], trace.input)[t]
    history = [trace.input, *trace.steps[:t]]
    return world.apply(r, k, history) != golden
