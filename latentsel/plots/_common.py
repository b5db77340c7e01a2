"""Private helpers shared by the figures of :mod:`latentsel.plots`: figure width and font
sizes, argument checks, figure, panel and legend construction, and :func:`save_figure`."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from latentsel._io import atomic_open

_WIDTH = 10.0  # inches; at the default 110 dpi a figure is 1100 px wide
_TICK = 7
_LABEL = 9


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as a PNG through a temporary file; returns the path."""
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def _matrix(a, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {arr.shape}")
    return arr


def _labels(labels, n: int, name: str) -> list[str]:
    labels = [str(s) for s in labels] if labels is not None else []
    if len(labels) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(labels)}")
    return labels


def _figure(height: float, title: str) -> Figure:
    fig = Figure(figsize=(_WIDTH, height), layout="constrained")
    fig.suptitle(title)
    return fig


def _panels(fig: Figure, n: int, ncols: int) -> list:
    """``n`` axes on a grid of ``ncols`` columns; the unused cells of the last row removed."""
    ncols = min(ncols, n)
    axes = fig.subplots(math.ceil(n / ncols), ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return list(axes[:n])


def _legend(fig: Figure, handles: list, fontsize: float = _LABEL, ncols: int = 8) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), ncols), fontsize=fontsize)

