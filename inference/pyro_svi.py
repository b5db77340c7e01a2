"""Stochastic variational inference with the Pyro programs: the NumPyro run, in PyTorch.

The same objective as :func:`latentsel.inference.svi.fit_svi`: ``TraceEnum_ELBO`` with the
selections summed out exactly, an ``AutoDelta`` or ``AutoNormal`` guide on the global sites
(``model_spec(model).sites``), the delta guide on priors raised by one so that its optimum is EM's
(see that module's docstring), Adam with the step size decayed from ``lr`` to ``lr_final``
and gradients clipped at 10. Runs in float64; the guide's parameters live in a scoped Pyro
parameter store, so a fit neither reads nor leaves global state behind.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value

from latentsel.inference.em import prior_mean_params
from latentsel.inference.svi import SVIResult, check_options
from latentsel.models.data import HLSMData
from latentsel.models.params import Priors
from latentsel.models.pyro_models import PYRO_MODELS
from latentsel.models.registry import model_spec, params_class

__all__ = ["fit_pyro_svi"]


def fit_pyro_svi(model: str, data: HLSMData, *, guide: str = "delta", priors: Priors = Priors(), steps: int = 2000,
                 lr: float = 0.05, lr_final: float = 0.002, seed: int = 0, init=None, map_in: str = "softmax",
                 num_particles: int = 1, posterior_samples: int = 1000, progress: Callable | None = None,
                 progress_every: int = 50) -> SVIResult:
    """Fit the guide by clipped Adam on Pyro's ``TraceEnum_ELBO`` (float64); the arguments and
    the result are those of :func:`latentsel.inference.svi.fit_svi` (guide parameters by Pyro
    name: ``AutoDelta.{site}``, ``AutoNormal.locs.{site}``, ``AutoNormal.scales.{site}``)."""
    fit_priors = check_options(guide, map_in, steps, priors)
    if model not in PYRO_MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(PYRO_MODELS)}")
    names = model_spec(model).sites
    init = init if init is not None else prior_mean_params(model, data.n_routes, data.n_skills, priors)
    init_values = {name: torch.as_tensor(np.asarray(v), dtype=torch.float64) for name, v in zip(names, init)}

    def program():
        return PYRO_MODELS[model](data, fit_priors)

    with pyro.get_param_store().scope(), torch.random.fork_rng():
        pyro.set_rng_seed(seed)
        cls = AutoDelta if guide == "delta" else AutoNormal
        auto = cls(pyro.poutine.block(program, expose=list(names)), init_loc_fn=init_to_value(values=init_values))
        decay = (lr_final / lr) ** (1.0 / max(steps - 1, 1))
        optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": 10.0})
        svi = SVI(program, auto, optim, TraceEnum_ELBO(num_particles=num_particles, max_plate_nesting=2))
        losses = np.empty(steps)
        for step in range(steps):
            losses[step] = svi.step()
            if progress is not None and ((step + 1) % progress_every == 0 or step + 1 == steps):
                progress(step + 1, float(losses[step]))
        guide_params = {k: v.detach().numpy().copy() for k, v in pyro.get_param_store().items()}
        cls_params = params_class(model)
        with torch.no_grad():
            if guide == "delta":
                point = auto.median()
                return SVIResult(_as_params(cls_params, names, point), losses, guide, guide_params, None, None)
            draws = [auto() for _ in range(posterior_samples)]
            stacked = {name: torch.stack([d[name] for d in draws]) for name in names}
            mean = _as_params(cls_params, names, {k: v.mean(0) for k, v in stacked.items()})
            std = _as_params(cls_params, names, {k: v.std(0, unbiased=False) for k, v in stacked.items()})
            median = _as_params(cls_params, names, auto.median())
    mean = mean._replace(**{f: mean[i] / mean[i].sum(-1, keepdims=True) for i, f in enumerate(mean._fields[:2])})
    return SVIResult(mean, losses, guide, guide_params, median, std)


def _as_params(cls, names, values):
    """The params NamedTuple from site values: arrays float64, scalars Python floats."""
    out = [values[name].detach().numpy().astype(np.float64) for name in names]
    return cls(*(float(v) if v.ndim == 0 else v for v in out))
