"""Parameters of the HLSM (DESIGN §4) as NamedTuples of arrays, and their priors.

Shapes (R routings, K skills):

* :class:`ModularParams`: ``route_exec [R, R]``, ``skill_exec [K, K]`` (row = intended,
  column = executed), ``noise``, ``off_module``.
* :class:`EntangledParams`: ``route_exec_ctx [R + 1, R, R]``, ``skill_exec_ctx [K + 1, K, K]``
  (first index = the previous step's intended module, ``R`` / ``K`` = start).
* :class:`GrammarParams`: ``route_trans [R + 1, R]``, ``skill_trans [K + 1, K]`` (row = the
  previous step's executed module, last row = start).

Rows are probability vectors; ``noise`` and ``off_module`` lie in (0, 1).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "ModularParams",
    "EntangledParams",
    "GrammarParams",
    "Priors",
    "MODELS",
    "params_class",
    "validate_params",
    "default_params",
]


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


MODELS = {"modular": ModularParams, "entangled": EntangledParams, "grammar": GrammarParams}


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

    def concentration(self, model: str, n_routes: int, n_skills: int) -> tuple[np.ndarray, np.ndarray]:
        """Dirichlet concentrations shaped like the model's two row-stochastic arrays."""
        if model in ("modular", "entangled"):
            ctx = model == "entangled"
            return (_diagonal_rows(n_routes, self.exec_diag, self.exec_off, ctx),
                    _diagonal_rows(n_skills, self.exec_diag, self.exec_off, ctx))
        if model == "grammar":
            return np.full((n_routes + 1, n_routes), self.trans), np.full((n_skills + 1, n_skills), self.trans)
        raise KeyError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def _diagonal_rows(n: int, diag: float, off: float, ctx: bool) -> np.ndarray:
    """``[n, n]`` with ``diag`` on the diagonal and ``off`` elsewhere; ``[n + 1, n, n]``
    (the same for every context) when ``ctx``."""
    m = np.full((n, n), off) + np.eye(n) * (diag - off)
    return np.broadcast_to(m, (n + 1, n, n)).copy() if ctx else m


def params_class(model: str):
    try:
        return MODELS[model]
    except KeyError:
        raise KeyError(f"unknown model {model!r}; choose from {', '.join(MODELS)}") from None


def _expected_shapes(model: str, n_routes: int, n_skills: int):
    r, k = n_routes, n_skills
    return {
        "modular": ((r, r), (k, k)),
        "entangled": ((r + 1, r, r), (k + 1, k, k)),
        "grammar": ((r + 1, r), (k + 1, k)),
    }[model]


_TINY = float(np.finfo(np.float64).tiny)


def validate_params(params, model: str, n_routes: int, n_skills: int, *, atol: float = 1e-6):
    """Check type, shapes, finiteness, row sums and ranges; return the params as float64 numpy.

    Every number must be exact in float64 arithmetic as JAX does it on the CPU: a subnormal
    entry (0 < x < 2.2e-308) is flushed to zero there, so it is refused rather than silently
    read as 0 (an exact zero in a row is fine; ``noise`` and ``off_module`` lie in (0, 1)).
    Raises ``TypeError`` / ``ValueError`` naming the offending field.
    """
    cls = params_class(model)
    if not isinstance(params, cls):
        raise TypeError(f"model={model!r} takes {cls.__name__}, got {type(params).__name__}")
    shapes = _expected_shapes(model, n_routes, n_skills)
    arrays = []
    for name, shape in zip(cls._fields[:2], shapes):
        a = np.asarray(getattr(params, name), dtype=np.float64)
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(a.shape)}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has NaN or infinite entries")
        if (a < 0).any():
            raise ValueError(f"{name} has negative entries")
        sub = np.argwhere((a > 0) & (a < _TINY))
        if sub.size:
            at = tuple(int(i) for i in sub[0])
            raise ValueError(f"{name}{list(at)} = {a[at]:.3g} is subnormal (below {_TINY:.3g}, the smallest normal "
                             f"float64), which JAX flushes to zero: use 0 or a normal number")
        sums = a.sum(axis=-1)
        bad = np.argwhere(np.abs(sums - 1) > atol)
        if bad.size:
            raise ValueError(f"{name} row {tuple(int(i) for i in bad[0])} sums to {sums[tuple(bad[0])]:.6g}, not 1")
        arrays.append(a)
    scalars = []
    for name in ("noise", "off_module"):
        v = getattr(params, name)
        if np.ndim(v) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {list(np.shape(v))}")
        v = float(v)
        if not 0 < v < 1:
            raise ValueError(f"{name} must lie in (0, 1), got {v}")
        if v < _TINY:
            raise ValueError(f"{name} = {v:.3g} is subnormal (below {_TINY:.3g}, the smallest normal float64), "
                             f"which JAX flushes to zero: use a normal number")
        scalars.append(v)
    return cls(*arrays, *scalars)


def default_params(model: str, n_routes: int, n_skills: int, *, fidelity: float = 0.9,
                   noise: float = 0.02, off_module: float = 0.02):
    """Near-faithful parameters: execution rows put ``fidelity`` on the intended entry and
    spread the rest uniformly; transition rows are uniform."""
    def exec_rows(n, ctx):
        return _diagonal_rows(n, fidelity, (1 - fidelity) / (n - 1), ctx)

    cls = params_class(model)
    if model == "grammar":
        return cls(np.full((n_routes + 1, n_routes), 1 / n_routes), np.full((n_skills + 1, n_skills), 1 / n_skills),
                   noise, off_module)
    ctx = model == "entangled"
    return cls(exec_rows(n_routes, ctx), exec_rows(n_skills, ctx), noise, off_module)
