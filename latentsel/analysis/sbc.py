"""Simulation-based calibration (SBC) by the ECDF of the ranks, with simultaneous bands
(JAX-free: numpy and scipy only).

A calibrated posterior puts the true value's rank among ``L`` posterior draws uniformly on
``0..L``. Following Säilynoja, Bürkner & Vehtari (2022), "Graphical test for discrete
uniformity and its applications in goodness-of-fit evaluation and multiple sample
comparison", the ranks ``r_1..r_n`` of one parameter over ``n`` replications are summarized by
the empirical CDF of their fractional ranks ``u = (r + 1) / (L + 1)``, evaluated at

    z_i = i / (L + 1),   i = 1..L,   F(z_i) = #{j : r_j < i} / n.

(At ``z_0 = 0`` and ``z_{L+1} = 1`` the ECDF is 0 and 1 whatever the ranks, so those points
are left out.) Under uniform ranks ``P(r < i) = z_i``, hence ``n F(z_i) ~ Binomial(n, z_i)``
exactly, at every ``i``. The test statistic of one parameter is the smallest two-sided
pointwise tail probability

    min_i  min(1, 2 min(B(n F(z_i); n, z_i), 1 - B(n F(z_i) - 1; n, z_i))),

``B`` the Binomial CDF: small means far from uniform. Its null distribution depends on ``n``
and ``L`` only and is simulated (:func:`null_statistics`). Its ``alpha``-quantile ``gamma``
gives both the test and the simultaneous band of :func:`ecdf_band`: the ECDF lies wholly
inside the pointwise central Binomial intervals at level ``1 - gamma`` exactly when the
statistic is at least ``gamma``, so a uniform ECDF stays inside the band with probability
about ``1 - alpha``.

Ranks of discrete quantities have ties with the truth; :func:`tie_randomized_rank` splits
them at random, which keeps the rank uniform under a calibrated posterior.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.stats import binom

__all__ = ["tie_randomized_rank", "ecdf_statistic", "null_statistics", "ecdf_band", "sbc_test", "N_SIM"]

N_SIM = 20_000  # default number of simulated null statistics
_CHUNK_BYTES = 100_000_000  # working memory of one chunk of simulated rows
_TABLE_ENTRIES = 1 << 20  # entries of one block of the tail-probability table (8 MB)


def tie_randomized_rank(draws, truth, rng: np.random.Generator) -> np.ndarray:
    """The rank of ``truth`` among ``draws``, ties with the truth split at random.

    Args:
        draws: float or int[L, ...], ``L`` posterior draws of each quantity.
        truth: float or int array broadcastable to ``draws[0]``, the true values.
        rng: a :class:`numpy.random.Generator` for the ties.

    Returns:
        int[...] (the shape of ``draws[0]``), each in ``0..L``: ``#(draws < truth) + U`` with ``U``
        uniform on ``0..#(draws == truth)``. Under a calibrated posterior it is uniform on ``0..L``
        for discrete quantities too; for continuous draws (no ties) it is the plain rank.
    """
    draws, truth = np.asarray(draws), np.asarray(truth)
    if draws.ndim < 1 or draws.shape[0] == 0 or not _real(draws):
        raise ValueError(f"draws must be a real array [L, ...] with L >= 1, got {draws.dtype}{list(draws.shape)}")
    if not _real(truth):
        raise ValueError(f"truth must be a real array, got {truth.dtype}")
    try:
        ok = np.broadcast_shapes(truth.shape, draws.shape[1:]) == draws.shape[1:]
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"truth must broadcast to draws[0] of shape {list(draws.shape[1:])}, got {list(truth.shape)}")
    if np.isnan(draws).any():
        raise ValueError("draws must not contain NaN")
    if np.isnan(truth).any():
        raise ValueError("truth must not contain NaN")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    below = (draws < truth).sum(axis=0)
    ties = (draws == truth).sum(axis=0)
    return (below + rng.integers(0, ties + 1)).astype(np.int64)


def ecdf_statistic(ranks, n_draws: int) -> np.ndarray:
    """The uniformity statistic of each row of ranks: the smallest two-sided Binomial tail
    probability of the ECDF over ``z_i = i / (n_draws + 1)``, ``i = 1..n_draws`` (see the module).

    Args:
        ranks: int[..., n_reps], each in ``0..n_draws``.
        n_draws: the number ``L`` of posterior draws behind each rank.

    Returns:
        float[...] in ``(0, 1]``, one per row; small means far from uniform.
    """
    n_draws = _positive_int(n_draws, "n_draws")
    ranks = _ranks(ranks, n_draws, ndim=None)
    return _statistic(_counts(ranks, n_draws), ranks.shape[-1], n_draws)


def null_statistics(n_reps: int, n_draws: int, n_sim: int = N_SIM, seed: int = 0) -> np.ndarray:
    """The statistic of :func:`ecdf_statistic` for ``n_sim`` rows of ``n_reps`` ranks drawn
    uniformly from ``0..n_draws``.

    The rank counts are drawn as multinomial vectors, in chunks of bounded memory. Results are
    cached per ``(n_reps, n_draws, n_sim, seed)``.

    Returns:
        float[n_sim], read-only.
    """
    return _null_statistics(_positive_int(n_reps, "n_reps"), _positive_int(n_draws, "n_draws"),
                            _positive_int(n_sim, "n_sim"), _seed(seed))


def ecdf_band(n_reps: int, n_draws: int, *, level: float = 0.95, n_sim: int = N_SIM, seed: int = 0) -> dict:
    """The simultaneous band of the ECDF difference ``F(z) - z`` of ``n_reps`` uniform ranks.

    ``gamma`` is an ``alpha``-quantile (``alpha = 1 - level``) of :func:`null_statistics`: the
    ``floor(alpha * n_sim) + 1``-th smallest, so at most a fraction ``alpha`` of the simulated
    statistics lie below it. At each ``z_i`` the band is the central Binomial interval at level
    ``1 - gamma``, the counts ``k`` with both tails ``B(k; n, z_i)`` and ``1 - B(k - 1; n, z_i)``
    at least ``gamma / 2``, divided by ``n_reps``, minus ``z_i``. An ECDF lies wholly inside the
    band exactly when its statistic is at least ``gamma``, so a uniform one does with
    probability about ``level``.

    Returns:
        ``{"z": float[n_draws], "lower": float[n_draws], "upper": float[n_draws], "gamma": float}``.
    """
    n_reps, n_draws = _positive_int(n_reps, "n_reps"), _positive_int(n_draws, "n_draws")
    level = _fraction(level, "level")
    null = np.sort(null_statistics(n_reps, n_draws, n_sim, seed))
    gamma = float(null[min(int(np.floor((1.0 - level) * len(null))), len(null) - 1)])
    z = np.arange(1, n_draws + 1) / (n_draws + 1)
    low, high = np.empty(n_draws), np.empty(n_draws)
    for start, stop, table in _tail_blocks(n_reps, n_draws):
        inside = table >= gamma  # an interval of counts in each row, containing the median
        low[start:stop] = inside.argmax(axis=1)
        high[start:stop] = n_reps - inside[:, ::-1].argmax(axis=1)
    return {"z": z, "lower": low / n_reps - z, "upper": high / n_reps - z, "gamma": gamma}


def sbc_test(ranks, n_draws: int, *, alpha: float = 0.01, n_sim: int = N_SIM, seed: int = 0) -> list[dict]:
    """Test each parameter's ranks for uniformity by the ECDF statistic.

    Args:
        ranks: int[n_params, n_reps], each in ``0..n_draws``.
        n_draws: the number ``L`` of posterior draws behind each rank.
        alpha: the family-wise level: a parameter fails when ``p < alpha / n_params``
            (Bonferroni over the parameters, as in :func:`latentsel.analysis.verdicts.sbc_failed`).
        n_sim, seed: the simulated null distribution (:func:`null_statistics`).

    Returns:
        One dict per parameter: ``p``, the Monte Carlo p-value
        ``(1 + #(null <= statistic)) / (1 + n_sim)``; ``statistic``; ``failed``, a bool.
    """
    n_draws = _positive_int(n_draws, "n_draws")
    ranks = _ranks(ranks, n_draws, ndim=2)
    alpha = _fraction(alpha, "alpha")
    n_params, n_reps = ranks.shape
    null = np.sort(null_statistics(n_reps, n_draws, n_sim, seed))
    observed = _statistic(_counts(ranks, n_draws), n_reps, n_draws)
    p = (1.0 + np.searchsorted(null, observed, side="right")) / (1.0 + len(null))
    cut = alpha / n_params
    return [{"p": float(v), "statistic": float(s), "failed": bool(v < cut)} for v, s in zip(p, observed)]


# -- computation -------------------------------------------------------------------------
def _counts(ranks: np.ndarray, n_draws: int) -> np.ndarray:
    """int[..., n_draws + 1]: how many ranks of each row take each value."""
    rows = ranks.reshape(-1, ranks.shape[-1])
    offsets = (n_draws + 1) * np.arange(len(rows))[:, None]
    counts = np.bincount((rows + offsets).ravel(), minlength=len(rows) * (n_draws + 1))
    return counts.reshape(*ranks.shape[:-1], n_draws + 1)


def _statistic(counts: np.ndarray, n_reps: int, n_draws: int) -> np.ndarray:
    """The statistic of each row of rank counts int[..., n_draws + 1], each row summing to ``n_reps``."""
    below = np.cumsum(counts.reshape(-1, n_draws + 1)[:, :n_draws], axis=1)  # n F(z_i), i = 1..L
    out = np.ones(len(below))
    for start, stop, table in _tail_blocks(n_reps, n_draws):
        out = np.minimum(out, table[np.arange(stop - start), below[:, start:stop]].min(axis=1, initial=1.0))
    return out.reshape(counts.shape[:-1])


def _tail_blocks(n_reps: int, n_draws: int):
    """``(start, stop, table)`` over the rows of the tail-probability table: ``table[i - start, k]``
    is ``min(1, 2 min(B(k; n, z_i), 1 - B(k - 1; n, z_i)))`` for ``k = 0..n_reps``."""
    rows = max(1, _TABLE_ENTRIES // (n_reps + 1))
    for start in range(0, n_draws, rows):
        stop = min(start + rows, n_draws)
        yield start, stop, _tail_table(n_reps, n_draws, start, stop)


@lru_cache(maxsize=8)
def _tail_table(n_reps: int, n_draws: int, start: int, stop: int) -> np.ndarray:
    k = np.arange(n_reps + 1.0)
    z = (np.arange(start + 1, stop + 1) / (n_draws + 1))[:, None]
    table = np.minimum(1.0, 2.0 * np.minimum(binom.cdf(k, n_reps, z), binom.sf(k - 1.0, n_reps, z)))
    table.flags.writeable = False
    return table


@lru_cache(maxsize=32)
def _null_statistics(n_reps: int, n_draws: int, n_sim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # about five arrays of chunk x (n_draws + 1) 8-byte numbers live at once
    chunk = max(1, _CHUNK_BYTES // (40 * (n_draws + 1)))
    p = np.full(n_draws + 1, 1.0 / (n_draws + 1))
    out = np.empty(n_sim)
    for start in range(0, n_sim, chunk):
        stop = min(start + chunk, n_sim)
        out[start:stop] = _statistic(rng.multinomial(n_reps, p, size=stop - start), n_reps, n_draws)
    out.flags.writeable = False
    return out


# -- argument checks ---------------------------------------------------------------------
def _real(a: np.ndarray) -> bool:
    return a.dtype == bool or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _fraction(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _ranks(ranks, n_draws: int, ndim: int | None) -> np.ndarray:
    """``ranks`` as an int array: non-empty, ``ndim``-D (any, at least 1, when ``None``), each in
    ``0..n_draws``."""
    ranks = np.asarray(ranks)
    shape = "int[n_params, n_reps]" if ndim == 2 else "int[..., n_reps]"
    if (ranks.ndim != ndim if ndim else ranks.ndim < 1) or ranks.size == 0 or ranks.dtype == bool \
            or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a non-empty {shape}, got {ranks.dtype}{list(ranks.shape)}")
    if ranks.min() < 0 or ranks.max() > n_draws:
        raise ValueError(f"ranks must lie in 0..n_draws={n_draws}, got {ranks.min()}..{ranks.max()}")
    return ranks
