"""The HLSM as Pyro programs, for pipelines that live in PyTorch (DESIGN §4, §5).

The same programs as :mod:`latentsel.models.numpyro_models`, site for site: the global sites
``GLOBAL_SITES[model]`` with the DESIGN priors; per step, inside the ``traces`` (dim -2) and
``steps`` (dim -1) plates, the executed routing ``route``, skill ``skill`` and off-module flag
``off`` (all marked for parallel enumeration) and the emission factor ``obs``; blocks of
hidden steps in plates ``blocks{j}`` with sites ``route_hidden{j}_{l}``, ``route_after{j}``,
``off_after{j}`` and ``obs_after{j}``; the grammar chain as a Python loop under
``pyro.markov`` with sites ``route_t``, ``skill_t``, ``off_t``, ``obs_t``.

A model takes the numpy :class:`~latentsel.models.data.HLSMData` (the emission statistics
are shared with the NumPyro programs; :func:`torch_arrays` views them as tensors without a
copy) and computes in float64 unless ``dtype`` says otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from latentsel.models.data import HLSMData
from latentsel.models.numpyro_models import GLOBAL_SITES
from latentsel.models.params import Priors

__all__ = ["modular_model", "entangled_model", "grammar_model", "PYRO_MODELS", "GLOBAL_SITES", "torch_arrays"]


def _enum():
    return {"enumerate": "parallel"}


def torch_arrays(data: HLSMData) -> dict:
    """The per-step arrays of ``data`` as tensors sharing the numpy memory (int64 indices)."""
    as_t = torch.from_numpy
    return {
        "match": as_t(np.ascontiguousarray(data.match)),
        "length": as_t(np.ascontiguousarray(data.length)),
        "step_mask": as_t(np.ascontiguousarray(data.step_mask)),
        "emit": as_t(np.ascontiguousarray(data.emit)),
        "route_intended": as_t(np.ascontiguousarray(data.route_intended)).long(),
        "skill_intended": as_t(np.ascontiguousarray(data.skill_intended)).long(),
    }


def _globals(model: str, data: HLSMData, priors: Priors, dtype):
    conc_r, conc_k = priors.concentration(model, data.n_routes, data.n_skills)
    names = GLOBAL_SITES[model]
    conc_r, conc_k = torch.as_tensor(conc_r, dtype=dtype), torch.as_tensor(conc_k, dtype=dtype)
    route = pyro.sample(names[0], dist.Dirichlet(conc_r).to_event(conc_r.dim() - 1))
    skill = pyro.sample(names[1], dist.Dirichlet(conc_k).to_event(conc_k.dim() - 1))
    noise = pyro.sample("noise", dist.Beta(*(torch.tensor(float(c), dtype=dtype) for c in priors.noise)))
    off_module = pyro.sample("off_module", dist.Beta(*(torch.tensor(float(c), dtype=dtype) for c in priors.off_module)))
    return route, skill, noise, off_module


def _log_on(match, length, noise, n_chars: int):
    """log p_on for match counts ``match`` (-1: lengths differ) of steps of length ``length``."""
    match = match.to(noise.dtype)
    value = match * torch.log1p(-noise) + (length - match) * (torch.log(noise) - math.log(n_chars - 1.0))
    return torch.where(match >= 0, value, torch.full_like(value, -math.inf))


def _log_off(length, n_chars: int, max_len: int, dtype):
    return -length.to(dtype) * math.log(n_chars) - math.log(max_len + 1.0)


def _execution_rows(model: str, route_p, skill_p, arrays, n_routes: int, n_skills: int):
    cr, ck = arrays["route_intended"], arrays["skill_intended"]
    if model == "modular":
        return route_p[cr], skill_p[ck]
    prev_r = torch.cat([torch.full_like(cr[:, :1], n_routes), cr[:, :-1]], dim=1)
    prev_k = torch.cat([torch.full_like(ck[:, :1], n_skills), ck[:, :-1]], dim=1)
    return route_p[prev_r, cr], skill_p[prev_k, ck]


def _leaf_log_on(data: HLSMData, g, noise):
    """log p_on of a block's observed step at every leaf: ``[L, R, K]``."""
    y_len = torch.from_numpy(np.asarray(data.length)[g.trace, g.step][g.owners[-1]]).to(noise.dtype)
    return _log_on(torch.from_numpy(np.asarray(g.leaf_match)), y_len[:, None, None], noise, data.n_chars)


def _leaf(g, block, hidden):
    """The leaf reached by the hidden selections ``hidden = [(r, k), ...]`` of ``block``."""
    idx = Vindex(torch.from_numpy(np.asarray(g.nodes[0])).long())[block, hidden[0][0], hidden[0][1]]
    for level in range(1, len(g.nodes)):
        idx = Vindex(torch.from_numpy(np.asarray(g.nodes[level])).long())[idx, hidden[level][0], hidden[level][1]]
    return idx


def _block_sites(g, route_rows, skill_rows, log_on_leaf, log_off, off_module):
    j, b = g.n_hidden, g.trace.size
    trace = torch.from_numpy(np.asarray(g.trace)).long()
    step = torch.from_numpy(np.asarray(g.step)).long()
    with pyro.plate(f"blocks{j}", b, dim=-1):
        hidden = []
        for level in range(j + 1):
            name = f"hidden{j}_{level + 1}" if level < j else f"after{j}"
            t = step - j + level
            r = pyro.sample(f"route_{name}", dist.Categorical(route_rows[trace, t]), infer=_enum())
            k = pyro.sample(f"skill_{name}", dist.Categorical(skill_rows[trace, t]), infer=_enum())
            hidden.append((r, k))
        r, k = hidden.pop()
        u = pyro.sample(f"off_after{j}", dist.Bernoulli(off_module), infer=_enum())
        lon = Vindex(log_on_leaf)[_leaf(g, torch.arange(b), hidden), r, k]
        pyro.factor(f"obs_after{j}", torch.where(u == 1, log_off[trace, step], lon))


def _independent_model(model: str, data: HLSMData, priors: Priors, dtype):
    arrays = torch_arrays(data)
    route_p, skill_p, noise, off_module = _globals(model, data, priors, dtype)
    n, t = data.step_mask.shape
    route_rows, skill_rows = _execution_rows(model, route_p, skill_p, arrays, data.n_routes, data.n_skills)
    log_on = _log_on(arrays["match"], arrays["length"][..., None, None], noise, data.n_chars)
    log_off = _log_off(arrays["length"], data.n_chars, data.max_len, noise.dtype)
    for g in data.blocks:
        _block_sites(g, route_rows, skill_rows, _leaf_log_on(data, g, noise), log_off, off_module)
    with pyro.plate("traces", n, dim=-2), pyro.plate("steps", t, dim=-1):
        with pyro.poutine.mask(mask=arrays["emit"]):
            r = pyro.sample("route", dist.Categorical(route_rows), infer=_enum())
            k = pyro.sample("skill", dist.Categorical(skill_rows), infer=_enum())
            u = pyro.sample("off", dist.Bernoulli(off_module), infer=_enum())
            lon = Vindex(log_on)[torch.arange(n)[:, None], torch.arange(t)[None, :], r, k]
            pyro.factor("obs", torch.where(u == 1, log_off, lon))


def modular_model(data: HLSMData, priors: Priors = Priors(), dtype=torch.float64):
    """r_t ~ Cat(route_exec[c_t^r]), k_t ~ Cat(skill_exec[c_t^k]), u_t ~ Bernoulli(off_module)."""
    _independent_model("modular", data, priors, dtype)


def entangled_model(data: HLSMData, priors: Priors = Priors(), dtype=torch.float64):
    """r_t ~ Cat(route_exec_ctx[c_{t-1}^r, c_t^r]), k_t ~ Cat(skill_exec_ctx[c_{t-1}^k, c_t^k])."""
    _independent_model("entangled", data, priors, dtype)


def grammar_model(data: HLSMData, priors: Priors = Priors(), dtype=torch.float64):
    """r_t ~ Cat(route_trans[r_{t-1}]), k_t ~ Cat(skill_trans[k_{t-1}]); start rows at t = 1."""
    arrays = torch_arrays(data)
    route_trans, skill_trans, noise, off_module = _globals("grammar", data, priors, dtype)
    n, t_max = data.step_mask.shape
    log_on = _log_on(arrays["match"], arrays["length"][..., None, None], noise, data.n_chars)
    log_off = _log_off(arrays["length"], data.n_chars, data.max_len, noise.dtype)
    observed = arrays["emit"] | torch.from_numpy(data.block_observed)
    block_at = []
    for g in data.blocks:
        at = np.full((n, t_max), -1)
        at[g.trace, g.step] = np.arange(g.trace.size)
        block_at.append((g, at, _leaf_log_on(data, g, noise)))
    n_idx = torch.arange(n)
    history = max([g.n_hidden for g in data.blocks], default=1)
    with pyro.plate("traces", n, dim=-1):
        r, k = data.n_routes, data.n_skills
        past = []
        for t in pyro.markov(range(t_max), history=history):
            with pyro.poutine.mask(mask=arrays["step_mask"][:, t]):
                r = pyro.sample(f"route_{t}", dist.Categorical(Vindex(route_trans)[r]), infer=_enum())
                k = pyro.sample(f"skill_{t}", dist.Categorical(Vindex(skill_trans)[k]), infer=_enum())
            past.append((r, k))
            lon = Vindex(log_on)[n_idx, t, r, k]
            for g, at, log_on_leaf in block_at:
                j = g.n_hidden
                if t < j or not (at[:, t] >= 0).any():
                    continue
                block = torch.from_numpy(np.maximum(at[:, t], 0))
                leaf_lon = Vindex(log_on_leaf)[_leaf(g, block, past[t - j: t]), r, k]
                lon = torch.where(torch.from_numpy(at[:, t] >= 0), leaf_lon, lon)
            with pyro.poutine.mask(mask=observed[:, t]):
                u = pyro.sample(f"off_{t}", dist.Bernoulli(off_module), infer=_enum())
                pyro.factor(f"obs_{t}", torch.where(u == 1, log_off[:, t], lon))


PYRO_MODELS = {"modular": modular_model, "entangled": entangled_model, "grammar": grammar_model}
