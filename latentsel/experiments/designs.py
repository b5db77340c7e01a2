"""What an identifiability sweep is made of, as data: the regimes of simulated traces, the
models it fits and the parallel backends it can run on.

JAX-free, so that the command line reads its choices from here without loading JAX.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["IdentifyRegime", "IDENTIFY_REGIMES", "IDENTIFY_MODELS", "SWEEP_BACKENDS", "NUTS_CHECK_MODELS", "identify_regime"]

IDENTIFY_MODELS = ("modular", "entangled")
# the models whose fit NUTS cross-checks where N <= nuts_max (its cost grows with the rows)
NUTS_CHECK_MODELS = ("modular",)
SWEEP_BACKENDS = ("loky", "threading", "sequential", "ray", "dask")


class IdentifyRegime(NamedTuple):
    """A regime of simulated traces: prompts of the prompt regime ``source``
    (:data:`latentsel.traces.regimes.PROMPT_REGIMES`), ``traces_per_prompt`` traces of each,
    executed with ``fidelity`` on the intended module, the 1-based steps ``hide`` unobserved."""

    name: str
    source: str
    traces_per_prompt: int
    fidelity: float
    hide: tuple = ()


IDENTIFY_REGIMES = {
    "sft": IdentifyRegime("sft", "sft", 1, 0.95),
    "rl": IdentifyRegime("rl", "rl-compound", 4, 0.8),
    "atomic": IdentifyRegime("atomic", "rl-atomic", 4, 0.8),
    "compressed": IdentifyRegime("compressed", "sft", 1, 0.95, (2,)),
}


def identify_regime(name: str) -> IdentifyRegime:
    """The regime called ``name``; ``ValueError`` naming the choices if there is none."""
    try:
        return IDENTIFY_REGIMES[name]
    except KeyError:
        raise ValueError(f"unknown regime {name!r}; choose from {', '.join(IDENTIFY_REGIMES)}") from None
