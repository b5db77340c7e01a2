"""The public inference entry points: traces and parameters in, numpy arrays out."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentsel.inference.corpus import CHUNK, corpus_log_evidence, corpus_posterior
from latentsel.inference.exact import ExactPosterior
from latentsel.inference.sampling import sample_selections
from latentsel.models.data import HLSMData
from latentsel.models.registry import params_class, validate_params
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from latentsel.world import World, default_world

__all__ = ["log_evidence", "log_evidence_from_data", "posterior", "posterior_from_data", "posterior_samples"]


def posterior_from_data(data: HLSMData, params, model: str, *, chunk: int = CHUNK, joint: bool = True) -> ExactPosterior:
    """Exact posterior of a prepared corpus, in float64, computed ``chunk`` traces at a time
    (``joint=False`` leaves out ``joint_probs``, [N, T, R, K])."""
    params = validate_params(params, model, data.n_routes, data.n_skills)
    return corpus_posterior(model, params, data, chunk, joint=joint)


def posterior(traces: Sequence[Trace], params, model: str = "modular", world: World | None = None) -> ExactPosterior:
    """Exact per-trace evidence, per-step posterior marginals and MAP selections."""
    world = world or default_world()
    params_class(model)
    return posterior_from_data(build_data(traces, world, model=model), params, model)


def log_evidence_from_data(data: HLSMData, params, model: str, *, chunk: int = CHUNK) -> np.ndarray:
    """log p(D_n | θ) of every trace of a prepared corpus (float64): the evidence alone, the
    same numbers as :func:`posterior_from_data`'s ``log_evidence`` at a fraction of its cost."""
    params = validate_params(params, model, data.n_routes, data.n_skills)
    return corpus_log_evidence(model, params, data, chunk)


EVIDENCE_BACKENDS = ("closed", "numpyro", "pyro")


def log_evidence(traces: Sequence[Trace], params, model: str = "modular", world: World | None = None, *,
                 backend: str = "closed") -> np.ndarray:
    """log p(D_n | θ) for every trace: ``float64[n_traces]``.

    ``backend``: ``"closed"`` (the hand-written closed form, the fast path), ``"numpyro"`` or
    ``"pyro"`` (the enumerated generative program of that library, contracted with the
    ``traces`` plate kept). All three give the same numbers to 1e-6 relative.
    """
    if backend not in EVIDENCE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(EVIDENCE_BACKENDS)}")
    world = world or default_world()
    params_class(model)
    data = build_data(traces, world, model=model)
    if backend == "closed":
        return log_evidence_from_data(data, params, model)
    params = validate_params(params, model, data.n_routes, data.n_skills)
    if backend == "numpyro":
        # funsor loads only for the enumerated NumPyro program
        from latentsel.inference.enumerated import numpyro_log_evidence

        return numpyro_log_evidence(model, params, data)
    # torch and Pyro load only for the Pyro program
    from latentsel.inference.pyro_enum import pyro_log_evidence

    return pyro_log_evidence(model, params, data)


def posterior_samples(traces: Sequence[Trace], params, model: str = "modular", world: World | None = None,
                      n_samples: int = 100, seed: int = 0):
    """Exact draws of the executed selections: a
    :class:`~latentsel.inference.sampling.Selections` of ``[n_samples, n_traces, max_depth]`` arrays."""
    world = world or default_world()
    data = build_data(traces, world, model=model)
    return sample_selections(model, validate_params(params, model, data.n_routes, data.n_skills), data, n_samples,
                             seed)
