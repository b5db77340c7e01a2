"""Parameters of the HLSM (DESIGN §4) as NamedTuples of arrays, and their priors.

Shapes (R routings, K skills):

* :class:`ModularParams`: ``route_exec [R, R]``, ``skill_exec [K, K]`` (row = intended,
  column = executed), ``noise``, ``off_module``.
* :class:`EntangledParams`: ``route_exec_ctx [R + 1, R, R]``, ``skill_exec_ctx [K + 1, K, K]``
  (first index = the previous step's intended module, ``R`` / ``K`` = start).
* :class:`GrammarParams`: ``route_trans [R + 1, R]``, ``skill_trans [K + 1, K]`` (row = the
  previous step's executed module, last row = start).

Rows are probability vectors; ``noise`` and ``off_module`` lie in (0, 1). Which class goes
with which model, and how its arrays are shaped and checked, is in :mod:`latentsel.models.registry`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["ModularParams", "EntangledParams", "GrammarParams", "Priors"]


class ModularParams(NamedTuple):
    """Execution depends only on the intended module."""

    route_exec: np.ndarray  # [R, R]
    skill_exec: np.ndarray  # [K, K]
    noise: float
    off_module: float


class EntangledParams(NamedTuple):
    """Execution depends on the intended module and the previous intended module."""

    route_exec_ctx: np.ndarray  # [R + 1, R, R]
    skill_exec_ctx: np.ndarray  # [K + 1, K, K]
    noise: float
    off_module: float


class GrammarParams(NamedTuple):
    """A first-order chain over executed modules (no program stated)."""

    route_trans: np.ndarray  # [R + 1, R]
    skill_trans: np.ndarray  # [K + 1, K]
    noise: float
    off_module: float


class Priors(NamedTuple):
    """Prior hyper-parameters (DESIGN §4 defaults).

    Execution rows ~ Dirichlet(``exec_diag`` on the intended entry, ``exec_off`` elsewhere);
    transition rows ~ Dirichlet(``trans``); noise ~ Beta(*``noise``); off_module ~ Beta(*``off_module``).
    """

    exec_diag: float = 2.0
    exec_off: float = 0.5
    trans: float = 1.0
    noise: tuple[float, float] = (1.0, 9.0)
    off_module: tuple[float, float] = (1.0, 9.0)
