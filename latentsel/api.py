"""The public inference entry points: traces and parameters in, numpy arrays out."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentsel.emission import build_data
from latentsel.inference.corpus import corpus_posterior
from latentsel.inference.exact import ExactPosterior
from latentsel.models.data import HLSMData
from latentsel.models.params import params_class, validate_params
from latentsel.traces import Trace
from latentsel.world import World, default_world

__all__ = ["log_evidence", "posterior", "exact", "posterior_samples"]

CHUNK = 8192


def exact(data: HLSMData, params, model: str, *, chunk: int = CHUNK, joint: bool = True) -> ExactPosterior:
    """Exact posterior of a prepared corpus, in float64, computed ``chunk`` traces at a time
    (``joint=False`` leaves out ``joint_probs``, [N, T, R, K])."""
    params = validate_params(params, model, data.n_routes, data.n_skills)
    return corpus_posterior(model, params, data, chunk, joint=joint)


def posterior(traces: Sequence[Trace], params, model: str = "modular", world: World | None = None) -> ExactPosterior:
    """Exact per-trace evidence, per-step posterior marginals and MAP selections."""
    world = world or default_world()
    params_class(model)
    return exact(build_data(traces, world, model=model), params, model)


def log_evidence(traces: Sequence[Trace], params, model: str = "modular", world: World | None = None) -> np.ndarray:
    """log p(D_n | θ) for every trace: ``float64[n_traces]``."""
    return posterior(traces, params, model, world).log_evidence


def posterior_samples(traces: Sequence[Trace], params, model: str = "modular", world: World | None = None,
                      n_samples: int = 100, seed: int = 0):
    """Exact draws of the executed selections: a
    :class:`~latentsel.inference.sampling.Selections` of ``[n_samples, n_traces, max_depth]`` arrays."""
    from latentsel.inference.sampling import sample_selections

    world = world or default_world()
    data = build_data(traces, world, model=model)
    return sample_selections(model, validate_params(params, model, data.n_routes, data.n_skills), data, n_samples,
                             seed)
