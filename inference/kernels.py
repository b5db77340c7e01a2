"""The evidence, posterior and E-step of the independent-step models, compiled (numba): one pass over the statistics.

``log p(D_n | θ) = Σ_t log Σ_{r,k} p(r | program) p(k | program) p(y_t | r, k)``: the emission
is a lookup in the ``[len, m]`` table (:func:`latentsel.models.data.emission_table`), the sum a
loop that reads each step's R*K match counts once, with no ``[N, T, R, K]`` float tensor made.
A trace with a step whose ``p(y_t)`` falls below :data:`~latentsel.inference.exact.UNDERFLOW`
is flagged, and :func:`latentsel.inference.corpus.corpus_log_evidence` recomputes it in log
space by the jitted path, so the result is the same, exact for every parameter in range.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from latentsel._compiled import numba_threads
from latentsel.models.data import HLSMData, emission_table, log_p_off, on_module_positions, previous_intended
from latentsel.models.registry import model_spec

__all__ = ["independent_log_evidence", "independent_posterior_arrays", "independent_counts"]

numba_threads()


def _rows(model: str, params, data: HLSMData):
    """The execution rows as 2-D tables and each step's row in them: ``(route_p, cr, skill_p, ck)``."""
    spec = model_spec(model)
    if spec.chain:
        raise ValueError(f"the compiled kernels are for the independent-step models, not the chain {model!r}")
    route_p, skill_p = (np.asarray(p, dtype=np.float64) for p in (params[0], params[1]))
    cr = np.asarray(data.route_intended, dtype=np.int64)
    ck = np.asarray(data.skill_intended, dtype=np.int64)
    r_n, k_n = data.n_routes, data.n_skills
    if spec.context:  # row (previous intended, intended) of the flattened context rows
        prev_r, prev_k = previous_intended(data, xp=np)
        cr, ck = prev_r * r_n + cr, prev_k * k_n + ck
        route_p, skill_p = route_p.reshape(-1, r_n), skill_p.reshape(-1, k_n)
    return np.ascontiguousarray(route_p), cr, np.ascontiguousarray(skill_p), ck


def _table(params, data: HLSMData) -> np.ndarray:
    # numpy says what JAX computes silently (log 0 for a one-letter alphabet): the same numbers
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        return np.ascontiguousarray(emission_table(float(params.noise), float(params.off_module), data.n_chars,
                                                   data.max_len, xp=np), dtype=np.float64)


def _off_term(params, data: HLSMData) -> np.ndarray:
    """π p_off(y) by length, as exp(log π + log p_off) (the jitted path's log_off_term)."""
    with np.errstate(divide="ignore", under="ignore"):
        return np.exp(np.log(float(params.off_module))
                      + log_p_off(np.arange(data.max_len + 1.0), data.n_chars, data.max_len, xp=np))


def independent_posterior_arrays(model: str, params, data: HLSMData, underflow: float, joint: bool):
    """The exact posterior of the steps outside hidden-step blocks (``modular`` / ``entangled``):
    ``(log_evidence [N], route_probs [N, T, R], skill_probs [N, T, K], p_off [N, T],
    map_route [N, T], map_skill [N, T], joint_probs [N, T, R, K] or None, careful: bool[N])``,
    as :func:`latentsel.inference.exact.exact_posterior` gives them where ``careful`` is False
    (the traces with a step whose ``p(y_t)`` is below ``underflow``, to be recomputed in log space)."""
    route_p, cr, skill_p, ck = _rows(model, params, data)
    n, t, r_n, k_n = data.match.shape
    length = np.ascontiguousarray(data.length, dtype=np.int64)
    off_term = _off_term(params, data)
    out = (np.zeros(n), np.zeros((n, t, r_n)), np.zeros((n, t, k_n)), np.zeros((n, t)),
           np.full((n, t), -1, dtype=np.int64), np.full((n, t), -1, dtype=np.int64))
    joint_probs = np.zeros((n, t, r_n, k_n)) if joint else np.zeros((0, 0, r_n, k_n))
    careful = np.zeros(n, dtype=bool)
    if n:
        _posterior(np.ascontiguousarray(data.match), length, np.ascontiguousarray(data.free),
                   np.ascontiguousarray(data.emit), cr, ck, route_p, skill_p, _table(params, data), off_term,
                   float(underflow), joint, *out, joint_probs, careful)
    return (*out, joint_probs if joint else None, careful)


def independent_log_evidence(model: str, params, data: HLSMData, underflow: float) -> tuple[np.ndarray, np.ndarray]:
    """``(log_evidence: float64[N], careful: bool[N])`` of the steps outside hidden-step blocks
    under ``modular`` or ``entangled``; ``careful`` marks the traces with a step whose ``p(y_t)``
    is below ``underflow`` (their evidence is to be recomputed in log space)."""
    route_p, cr, skill_p, ck = _rows(model, params, data)
    table = _table(params, data)
    out = np.zeros(data.n_traces)
    careful = np.zeros(data.n_traces, dtype=bool)
    if data.n_traces:
        _evidence(np.ascontiguousarray(data.match), np.ascontiguousarray(data.length, dtype=np.int64),
                  np.ascontiguousarray(data.emit), cr, ck, route_p, skill_p, table, float(underflow), out, careful)
    return out, careful


@njit(parallel=True, cache=True, nogil=True)
def _evidence(match, length, emit, cr, ck, route_p, skill_p, table, underflow, out, careful):
    n, t, r_n, k_n = match.shape
    for i in prange(n):
        total = 0.0
        for s in range(t):
            if not emit[i, s]:
                continue
            ln, a, b = length[i, s], cr[i, s], ck[i, s]
            p = 0.0
            for r in range(r_n):
                acc = 0.0
                for k in range(k_n):
                    acc += skill_p[b, k] * table[ln, match[i, s, r, k] + 1]
                p += route_p[a, r] * acc
            if not p >= underflow:  # (NaN included)
                careful[i] = True
            else:
                total += math.log(p)
        out[i] = total


@njit(parallel=True, cache=True, nogil=True)
def _posterior(match, length, mask, emit, cr, ck, route_p, skill_p, table, off_term, underflow, with_joint,
               log_evidence, route_probs, skill_probs, p_off, map_route, map_skill, joint_probs, careful):
    n, t, r_n, k_n = match.shape
    for i in prange(n):
        w = np.empty((r_n, k_n))
        total = 0.0
        for s in range(t):
            if not mask[i, s]:
                continue
            ln, a, b = length[i, s], cr[i, s], ck[i, s]
            observed = emit[i, s]
            p = 0.0
            best, at = -1.0, 0
            for r in range(r_n):
                for k in range(k_n):
                    # (ρ κ) E in the jitted path's order, so that ties in the MAP stay ties
                    x = route_p[a, r] * skill_p[b, k]
                    if observed:
                        x *= table[ln, match[i, s, r, k] + 1]
                    w[r, k] = x
                    p += x
                    if x > best:
                        best, at = x, r * k_n + k
            if observed:
                if not p >= underflow:  # (NaN included)
                    careful[i] = True
                    continue
                total += math.log(p)
                p_off[i, s] = min(max(off_term[ln] / p, 0.0), 1.0)
            map_route[i, s], map_skill[i, s] = at // k_n, at % k_n
            for r in range(r_n):
                acc = 0.0
                for k in range(k_n):
                    x = w[r, k] / p
                    acc += x
                    skill_probs[i, s, k] += x
                    if with_joint:
                        joint_probs[i, s, r, k] = x
                route_probs[i, s, r] = acc
        log_evidence[i] = total


def independent_counts(model: str, params, data: HLSMData, underflow: float):
    """The E-step's expected counts of the steps outside hidden-step blocks (``modular`` /
    ``entangled``), as the jitted E-step gives them: ``(route_counts, skill_counts,
    noise_counts [2], off_counts [2], log_evidence, careful: bool[N])``, summed over the traces
    where ``careful`` is False (those with a step whose ``p(y_t)`` is below ``underflow``, to be
    counted by the jitted path)."""
    route_p, cr, skill_p, ck = _rows(model, params, data)
    table, off = _table(params, data), _off_term(params, data)
    with np.errstate(invalid="ignore"):
        on_matched, on_mismatched = on_module_positions(table, off, data.max_len, xp=np)
    match = np.ascontiguousarray(data.match)
    length = np.ascontiguousarray(data.length, dtype=np.int64)
    emit, free = np.ascontiguousarray(data.emit), np.ascontiguousarray(data.free)
    n = data.n_traces
    log_ev, careful = np.zeros(n), np.zeros(n, dtype=bool)
    if n:
        _evidence(match, length, emit, cr, ck, route_p, skill_p, table, float(underflow), log_ev, careful)
    parts = max(1, min(n, 64))  # traces cut in parts, each summed into its own row: no shared writes
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    route = np.zeros((parts,) + route_p.shape)
    skill = np.zeros((parts,) + skill_p.shape)
    scalars = np.zeros((parts, 4))  # mismatched, matched, off, observed steps
    if n:
        _counts(match, length, free, emit, cr, ck, route_p, skill_p, table, np.ascontiguousarray(on_matched),
                np.ascontiguousarray(on_mismatched), off, careful, bounds, route, skill, scalars)
    sc = scalars.sum(axis=0)
    return (route.sum(axis=0).reshape(np.shape(params[0])), skill.sum(axis=0).reshape(np.shape(params[1])),
            np.array([sc[0], sc[1]]), np.array([sc[2], sc[3] - sc[2]]), float(log_ev[~careful].sum()), careful)


@njit(parallel=True, cache=True, nogil=True)
def _counts(match, length, free, emit, cr, ck, route_p, skill_p, table, on_matched, on_mismatched, off, careful,
            bounds, route, skill, scalars):
    n, t, r_n, k_n = match.shape
    for part in prange(bounds.size - 1):
        emit_k = np.empty(r_n)
        on_m = np.empty(r_n)
        on_mm = np.empty(r_n)
        skill_k = np.empty(k_n)
        for i in range(bounds[part], bounds[part + 1]):
            if careful[i]:
                continue
            for s in range(t):
                if not free[i, s]:
                    continue
                ln, a, b = length[i, s], cr[i, s], ck[i, s]
                observed = emit[i, s]
                skill_k[:] = 0.0
                p = 0.0
                for r in range(r_n):
                    acc = 0.0
                    acc_m = 0.0
                    acc_mm = 0.0
                    rho = route_p[a, r]
                    for k in range(k_n):
                        if observed:
                            j = match[i, s, r, k] + 1
                            x = table[ln, j]
                            acc_m += skill_p[b, k] * on_matched[ln, j]
                            acc_mm += skill_p[b, k] * on_mismatched[ln, j]
                        else:  # a free step no one observed: every module emits it with probability 1
                            x = 1.0
                        acc += skill_p[b, k] * x
                        skill_k[k] += rho * x
                    emit_k[r], on_m[r], on_mm[r] = acc, acc_m, acc_mm
                    p += rho * acc
                for r in range(r_n):
                    route[part, a, r] += route_p[a, r] * emit_k[r] / p
                for k in range(k_n):
                    skill[part, b, k] += skill_p[b, k] * skill_k[k] / p
                if observed:
                    mm = 0.0
                    mt = 0.0
                    for r in range(r_n):
                        mt += route_p[a, r] * on_m[r]
                        mm += route_p[a, r] * on_mm[r]
                    scalars[part, 0] += mm / p
                    scalars[part, 1] += mt / p
                    scalars[part, 2] += off[ln] / p
                    scalars[part, 3] += 1.0
