"""The arrays a model sees: emission statistics, intended modules and masks.

The emission of step t under module (r, k) depends on the data only through ``len(y_t)``
and ``m``, the number of positions where ``y_t`` agrees with the module's output ``e``
(``m = -1`` when the lengths differ). :class:`HLSMData` holds those counts, so the emission
tensor for any ``noise`` and ``off_module`` is a lookup in a small table (:func:`emission`)
or, in log space, one fused expression (:func:`log_emission`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = ["HLSMData", "log_p_on", "log_p_off", "log_emission", "emission_table", "emission", "previous_intended",
           "execution_rows"]


class HLSMData(NamedTuple):
    """A padded corpus of N traces of at most T steps.

    Attributes:
        match: int8[N, T, R, K]; positions where y_t agrees with module (r, k)'s output on
            the teacher-forced history, or -1 where the lengths differ (or no step).
        length: int32[N, T]; len(y_t) (0 where there is no step).
        step_mask: bool[N, T]; True for t < depth of the trace.
        route_intended: int32[N, T]; c_t^r (0 where there is no step or no program).
        skill_intended: int32[N, T]; c_t^k.
        n_chars: A, the alphabet size.
        max_len: MAX_LEN.
    """

    match: np.ndarray
    length: np.ndarray
    step_mask: np.ndarray
    route_intended: np.ndarray
    skill_intended: np.ndarray
    n_chars: int
    max_len: int

    @property
    def n_traces(self) -> int:
        return self.match.shape[0]

    @property
    def n_routes(self) -> int:
        return self.match.shape[2]

    @property
    def n_skills(self) -> int:
        return self.match.shape[3]

    def take(self, index) -> "HLSMData":
        """The traces at ``index`` (a slice or an index array)."""
        return HLSMData(*(a[index] for a in self[:5]), self.n_chars, self.max_len)


def log_p_off(length, n_chars: int, max_len: int):
    """log p_off(y) = -len(y) log A - log(MAX_LEN + 1); ``length: [...]`` -> ``[...]``."""
    return -length * jnp.log(n_chars) - jnp.log(max_len + 1.0)


def log_p_on(data: HLSMData, noise):
    """log p_on(y_t | e_{r,k}) = m log(1 - noise) + (len - m) log(noise / (A - 1)):
    ``[N, T, R, K]``, -inf where the lengths differ."""
    match = jnp.asarray(data.match)
    length = jnp.asarray(data.length)[..., None, None]
    return jnp.where(
        match >= 0,
        match * jnp.log1p(-noise) + (length - match) * (jnp.log(noise) - jnp.log(data.n_chars - 1.0)),
        -jnp.inf,
    )


def previous_intended(data: HLSMData):
    """The previous step's intended routing and skill, ``R`` / ``K`` (start) at t = 1:
    ``(int[N, T], int[N, T])``, the context index of the entangled model."""
    cr, ck = jnp.asarray(data.route_intended), jnp.asarray(data.skill_intended)
    prev_r = jnp.concatenate([jnp.full_like(cr[:, :1], data.n_routes), cr[:, :-1]], axis=1)
    prev_k = jnp.concatenate([jnp.full_like(ck[:, :1], data.n_skills), ck[:, :-1]], axis=1)
    return prev_r, prev_k


def execution_rows(model: str, route_p, skill_p, data: HLSMData):
    """p(r_t | program) and p(k_t | program) of every step: ``([N, T, R], [N, T, K])``.

    ``route_p`` / ``skill_p`` are ``route_exec`` / ``skill_exec`` (modular) or
    ``route_exec_ctx`` / ``skill_exec_ctx`` (entangled).
    """
    cr, ck = jnp.asarray(data.route_intended), jnp.asarray(data.skill_intended)
    if model == "modular":
        return jnp.asarray(route_p)[cr], jnp.asarray(skill_p)[ck]
    if model == "entangled":
        prev_r, prev_k = previous_intended(data)
        return jnp.asarray(route_p)[prev_r, cr], jnp.asarray(skill_p)[prev_k, ck]
    raise ValueError(f"execution rows are for the modular and entangled models, not {model!r}")


def log_emission(data: HLSMData, noise, off_module):
    """log p(y_t | r_t, k_t) with the off-module flag summed out: ``[N, T, R, K]``.

    ``(1 - off) p_on(y | e) + off p_off(y)`` with
    ``p_on = (1 - noise)^m (noise / (A - 1))^(len - m)`` (0 when the lengths differ).
    Steps outside ``step_mask`` get 0.
    """
    off = log_p_off(jnp.asarray(data.length)[..., None, None], data.n_chars, data.max_len)
    le = jnp.logaddexp(jnp.log1p(-off_module) + log_p_on(data, noise), jnp.log(off_module) + off)
    return jnp.where(jnp.asarray(data.step_mask)[..., None, None], le, 0.0)


def emission_table(noise, off_module, n_chars: int, max_len: int):
    """p(y | r, k) for every (len(y), m): ``[max_len + 1, max_len + 2]``, column ``m + 1``
    (column 0 is m = -1, lengths differ). Entries with m > len are unused."""
    length = jnp.arange(max_len + 1.0)[:, None]
    m = jnp.arange(-1.0, max_len + 1.0)[None, :]
    on = jnp.where(
        (m >= 0) & (m <= length),
        jnp.exp(m * jnp.log1p(-noise) + (length - m) * (jnp.log(noise) - jnp.log(n_chars - 1.0))),
        0.0,
    )
    return (1 - off_module) * on + off_module * jnp.exp(log_p_off(length, n_chars, max_len))


def emission(data: HLSMData, noise, off_module):
    """p(y_t | r_t, k_t) with the off flag summed out, by table lookup: ``[N, T, R, K]``
    (1 outside ``step_mask``). Float64 holds it without underflow for any step of the world."""
    table = emission_table(noise, off_module, data.n_chars, data.max_len)
    length = jnp.asarray(data.length)
    p = table[length[..., None, None], jnp.asarray(data.match).astype(jnp.int32) + 1]
    return jnp.where(jnp.asarray(data.step_mask)[..., None, None], p, 1.0)
