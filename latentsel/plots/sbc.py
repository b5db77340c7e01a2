"""Simulation-based calibration drawn as ECDF differences with simultaneous bands
(Säilynoja, Bürkner & Vehtari 2022).

The band is computed by the caller (:func:`latentsel.analysis.sbc.ecdf_band`): the plots
stage draws, the analysis stage computes.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from latentsel.plots._common import _LABEL, _TICK, _figure, _labels, _legend, _panels

__all__ = ["sbc_ecdf_differences"]



def sbc_ecdf_differences(ranks, n_draws: int, *, names: Sequence[str], band: dict, level: float = 0.95,
                         failed: Sequence[bool] | None = None, title: str = "") -> Figure:
    """Simulation-based calibration: the ECDF difference of each parameter's ranks with the
    simultaneous band of a uniform one.

    At ``z_i = i / (n_draws + 1)``, ``i = 0..n_draws + 1``, the step line is ``F(z_i) - z_i``, with
    ``F(z_i)`` the fraction of ranks below ``i`` (the ECDF of the fractional ranks
    ``(rank + 1) / (n_draws + 1)``). The grey band holds the whole line of uniform ranks with
    probability ``level``.

    Args:
        ranks: int[n_params, n_replications], each in 0..n_draws (the rank of the true value
            among n_draws posterior draws).
        n_draws: the number of posterior draws per replication.
        names: n_params parameter names.
        band: ``{"lower", "upper"}``, float[n_draws] each: the simultaneous band of the ECDF
            difference at ``z_1..z_L`` (:func:`latentsel.analysis.sbc.ecdf_band`).
        level: the simultaneous coverage of the band (for the legend).
        failed: n_params bools (e.g. ``failed`` of :func:`latentsel.analysis.sbc.sbc_test`); the
            panels of failed parameters are titled "(FAILED)" and drawn in red.
    Returns a figure with one axes per parameter, on up to 4 columns.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or 0 in ranks.shape or ranks.dtype == bool or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a non-empty int[n_params, n_replications], got "
                         f"{ranks.dtype}{list(ranks.shape)}")
    if isinstance(n_draws, (bool, np.bool_)) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    if ranks.min() < 0 or ranks.max() > n_draws:
        raise ValueError(f"ranks must lie in 0..n_draws={n_draws}, got {ranks.min()}..{ranks.max()}")
    n_params, n_reps = ranks.shape
    names = _labels(names, n_params, "names")
    if not isinstance(level, (float, int)) or isinstance(level, bool) or not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if failed is None:
        failed = [False] * n_params
    elif len(failed) != n_params or not all(isinstance(f, (bool, np.bool_)) for f in failed):
        raise ValueError(f"failed must be {n_params} bools, got {list(failed)!r}")

    n_draws = int(n_draws)
    z = np.arange(n_draws + 2) / (n_draws + 1)
    counts = np.stack([np.bincount(row, minlength=n_draws + 1) for row in ranks])
    differences = np.concatenate([np.zeros((n_params, 1)), np.cumsum(counts, axis=1) / n_reps], axis=1) - z
    try:
        low, high = (np.asarray(band[k], float) for k in ("lower", "upper"))
    except (KeyError, TypeError):
        raise ValueError("band must be a dict with 'lower' and 'upper' (latentsel.analysis.sbc.ecdf_band)") from None
    if low.shape != (n_draws,) or high.shape != (n_draws,):
        raise ValueError(f"band must hold {n_draws} lower and upper values, got {low.shape} and {high.shape}")
    low, high = np.concatenate([[0.0], low, [0.0]]), np.concatenate([[0.0], high, [0.0]])

    fig = _figure(2.3 * math.ceil(n_params / 4) + 1.0,
                  title or f"SBC ECDF differences ({n_reps} replications, {n_draws} draws)")
    for ax, difference, name, bad in zip(_panels(fig, n_params, ncols=4), differences, names, failed):
        ax.fill_between(z, low, high, step="post", color="0.75", linewidth=0)
        ax.axhline(0.0, color="0.4", linestyle="--", linewidth=0.8)
        ax.step(z, difference, where="post", color="tab:red" if bad else "tab:blue", linewidth=1.2)
        ax.set_title(f"{name} (FAILED)" if bad else name, fontsize=_LABEL, color="tab:red" if bad else "black")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("fractional rank z", fontsize=_TICK)
        ax.set_ylabel("ECDF(z) − z", fontsize=_TICK)
        ax.tick_params(labelsize=_TICK)
    handles = [Line2D([], [], color="tab:blue", label="ECDF difference"),
               Patch(color="0.75", label=f"{100 * level:g}% simultaneous band of a uniform ECDF")]
    if any(failed):
        handles.insert(1, Line2D([], [], color="tab:red", label="failed"))
    _legend(fig, handles)
    return fig
