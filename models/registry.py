"""The model registry: one :class:`ModelSpec` per variant of the HLSM (DESIGN §4).

Every layer reads what it needs to know about a model from here (its parameter class and
shapes, whether execution depends on a context or forms a chain, its prior concentrations and
its global sample sites) instead of branching on the model's name. Adding a model means adding
its parameter class (:mod:`latentsel.models.params`), its spec here and its programs
(:mod:`latentsel.models.numpyro_models`, :mod:`latentsel.models.pyro_models`).

numpy only: the command line reads its choices from :data:`MODELS` without loading JAX.
"""
from __future__ import annotations

import difflib
from typing import NamedTuple

import numpy as np

from latentsel.models.params import EntangledParams, GrammarParams, ModularParams, Priors

__all__ = ["ModelSpec", "MODELS", "UnknownModelError", "model_spec", "params_class", "validate_params", "default_params"]


def _diagonal_rows(n: int, diag: float, off: float, context: bool) -> np.ndarray:
    """``[n, n]`` with ``diag`` on the diagonal and ``off`` elsewhere; ``[n + 1, n, n]``
    (the same for every context) when ``context``."""
    m = np.full((n, n), off) + np.eye(n) * (diag - off)
    return np.broadcast_to(m, (n + 1, n, n)).copy() if context else m


class ModelSpec(NamedTuple):
    """What every layer needs to know about one model.

    Attributes:
        name: the model's name (``--model``).
        params: its parameter NamedTuple class; its fields are the global sample sites, in order.
        context: execution rows are indexed by the previous step's intended module (``R``/``K``
            at the first step) as well as the intended one: arrays ``[R + 1, R, R]``.
        chain: the selections form a first-order chain over executed modules and the program
            is not used: arrays ``[R + 1, R]`` (row = previous executed module, last = start).
        summary: one line for ``--help`` and reports.
    """

    name: str
    params: type
    context: bool
    chain: bool
    summary: str

    @property
    def sites(self) -> tuple[str, ...]:
        """The global sample sites of the generative programs: the parameter fields."""
        return self.params._fields

    @property
    def row_dims(self) -> tuple[str, ...]:
        """What each axis of the routing (or skill) array indexes, e.g. ``("intended", "executed")``:
        ``context`` is the previous step's intended module (or start), ``previous`` the previous
        step's executed module (or start)."""
        if self.chain:
            return ("previous", "executed")
        return ("context", "intended", "executed") if self.context else ("intended", "executed")

    @property
    def uses_program(self) -> bool:
        """Whether the model conditions on the intended modules (the trace's program)."""
        return not self.chain

    def row_shapes(self, n_routes: int, n_skills: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the routing and the skill arrays (the first two parameter fields)."""
        if self.chain:
            return (n_routes + 1, n_routes), (n_skills + 1, n_skills)
        if self.context:
            return (n_routes + 1, n_routes, n_routes), (n_skills + 1, n_skills, n_skills)
        return (n_routes, n_routes), (n_skills, n_skills)

    def concentration(self, priors: Priors, n_routes: int, n_skills: int) -> tuple[np.ndarray, np.ndarray]:
        """Dirichlet concentrations shaped like the model's two row-stochastic arrays:
        ``priors.trans`` everywhere for a chain; else ``priors.exec_diag`` on the intended
        entry and ``priors.exec_off`` elsewhere."""
        if self.chain:
            return tuple(np.full(shape, priors.trans) for shape in self.row_shapes(n_routes, n_skills))
        return (_diagonal_rows(n_routes, priors.exec_diag, priors.exec_off, self.context),
                _diagonal_rows(n_skills, priors.exec_diag, priors.exec_off, self.context))


MODELS: dict[str, ModelSpec] = {
    "modular": ModelSpec("modular", ModularParams, context=False, chain=False,
                         summary="execution depends only on the intended module"),
    "entangled": ModelSpec("entangled", EntangledParams, context=True, chain=False,
                           summary="execution depends on the intended and the previous intended module"),
    "grammar": ModelSpec("grammar", GrammarParams, context=False, chain=True,
                         summary="a first-order chain over executed modules, no program"),
}


class UnknownModelError(KeyError, ValueError):
    """A model name the registry does not hold: a ``ValueError`` (a bad argument) that is also
    the ``KeyError`` of a failed lookup, its message not quoted."""

    def __str__(self) -> str:
        return str(self.args[0])


def model_spec(model: str) -> ModelSpec:
    """The spec of ``model``; :class:`UnknownModelError` naming the choices if there is none."""
    try:
        return MODELS[model]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(model, list(MODELS), n=1) if isinstance(model, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownModelError(f"unknown model {model!r}{hint}; choose from {', '.join(MODELS)}") from None


def params_class(model: str) -> type:
    """The parameter NamedTuple class of ``model``."""
    return model_spec(model).params


_TINY = float(np.finfo(np.float64).tiny)


def validate_params(params, model: str, n_routes: int, n_skills: int, *, atol: float = 1e-6):
    """Check type, shapes, finiteness, row sums and ranges; return the params as float64 numpy.

    Every number must be exact in float64 arithmetic as JAX does it on the CPU: a subnormal
    entry (0 < x < 2.2e-308) is flushed to zero there, so it is refused rather than silently
    read as 0 (an exact zero in a row is fine; ``noise`` and ``off_module`` lie in (0, 1)).
    Raises ``TypeError`` / ``ValueError`` naming the offending field.
    """
    spec = model_spec(model)
    cls = spec.params
    if not isinstance(params, cls):
        raise TypeError(f"model={model!r} takes {cls.__name__}, got {type(params).__name__}")
    arrays = []
    for name, shape in zip(cls._fields[:2], spec.row_shapes(n_routes, n_skills)):
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


def default_params(model: str, n_routes, n_skills: int | None = None, *, fidelity: float = 0.9,
                   noise: float = 0.02, off_module: float = 0.02):
    """Near-faithful parameters: execution rows put ``fidelity`` on the intended entry and
    spread the rest uniformly; transition rows (a chain) are uniform. Sized by ``n_routes,
    n_skills`` or by a world: ``default_params("modular", world)``."""
    if n_skills is None:
        if not hasattr(n_routes, "n_routes"):
            raise TypeError("default_params takes (model, n_routes, n_skills) or (model, world)")
        n_routes, n_skills = n_routes.n_routes, n_routes.n_skills
    spec = model_spec(model)
    if spec.chain:
        route, skill = (np.full(shape, 1 / shape[-1]) for shape in spec.row_shapes(n_routes, n_skills))
    else:
        # a single module executes as itself: its row is [1], whatever the fidelity
        route, skill = (_diagonal_rows(n, fidelity if n > 1 else 1.0, (1 - fidelity) / max(n - 1, 1), spec.context)
                        for n in (n_routes, n_skills))
    return spec.params(route, skill, noise, off_module)
