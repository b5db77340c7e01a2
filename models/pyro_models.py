"""The HLSM as Pyro programs, for pipelines that live in PyTorch (DESIGN §4, §5).

The same programs as :mod:`latentsel.models.numpyro_models`, site for site: the global sites
``model_spec(model).sites`` with the DESIGN priors; per step, inside the ``traces`` (dim -2) and
``steps`` (dim -1) plates, the executed routing ``route``, skill ``skill`` and off-module flag
``off`` (all marked for parallel enumeration) and the emission factor ``obs``; blocks of
hidden steps in plates ``blocks{J}`` with sites ``route_hidden{J}_{l}`` and, in the nested
plate ``reads{J}``, ``route_read{J}``, ``off_read{J}`` and ``obs_read{J}``; the grammar chain
as a Python loop (under ``pyro.markov`` when no trace has a block) with sites ``route_t``,
``skill_t``, ``off_t``, ``obs_t``.

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

from latentsel.models.data import HLSMData, tree_tables
from latentsel.models.params import Priors
from latentsel.models.registry import model_spec

__all__ = ["modular_model", "entangled_model", "grammar_model", "PYRO_MODELS", "torch_arrays"]


def _enum():
    return {"enumerate": "parallel"}


def _categorical(probs):
    """Categorical by its logits: torch's ``probs=`` clamps probabilities to [eps, 1 - eps],
    which turns an exact zero in a row into 2e-16 and changes the evidence."""
    return dist.Categorical(logits=torch.log(probs))


def _bernoulli(p):
    """Bernoulli by its logit, exact for any p in (0, 1) (``probs=`` would clamp a tiny p to eps)."""
    return dist.Bernoulli(logits=torch.log(p) - torch.log1p(-p))


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
    spec = model_spec(model)
    conc_r, conc_k = spec.concentration(priors, data.n_routes, data.n_skills)
    names = spec.sites
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
    if not model_spec(model).context:
        return route_p[cr], skill_p[ck]
    prev_r = torch.cat([torch.full_like(cr[:, :1], n_routes), cr[:, :-1]], dim=1)
    prev_k = torch.cat([torch.full_like(ck[:, :1], n_skills), ck[:, :-1]], dim=1)
    return route_p[prev_r, cr], skill_p[prev_k, ck]


def _rows_log_on(data: HLSMData, tables, noise):
    """log p_on of every read row: ``[Q, R, K]``."""
    y_len = torch.from_numpy(np.asarray(data.length)[tables.row_trace, tables.row_step]).to(noise.dtype)
    return _log_on(torch.from_numpy(np.asarray(tables.read_match)), y_len[:, None, None], noise, data.n_chars)


def _block_sites(data, g, route_rows, skill_rows, log_off, off_module, noise):
    j, b = g.n_hidden, g.n_blocks
    tables = tree_tables(g, data.step_mask.shape[1])
    log_on_rows = _rows_log_on(data, tables, noise)
    child = torch.from_numpy(tables.child).long()
    trace = torch.from_numpy(np.asarray(g.trace)).long()
    with pyro.plate(f"blocks{j}", b, dim=-1):
        node = torch.arange(b)
        for level in range(j):
            t = torch.from_numpy(np.asarray(g.hidden[:, level])).long()
            r = pyro.sample(f"route_hidden{j}_{level + 1}", _categorical(route_rows[trace, t]), infer=_enum())
            k = pyro.sample(f"skill_hidden{j}_{level + 1}", _categorical(skill_rows[trace, t]), infer=_enum())
            node = Vindex(child)[node, r, k]
        steps = tables.read_steps.T  # [P, B]
        st = torch.from_numpy(np.maximum(steps, 0)).long()
        with pyro.plate(f"reads{j}", steps.shape[0], dim=-2), pyro.poutine.mask(mask=torch.from_numpy(steps >= 0)):
            r = pyro.sample(f"route_read{j}", _categorical(route_rows[trace[None, :], st]), infer=_enum())
            k = pyro.sample(f"skill_read{j}", _categorical(skill_rows[trace[None, :], st]), infer=_enum())
            u = pyro.sample(f"off_read{j}", _bernoulli(off_module), infer=_enum())
            row = Vindex(torch.from_numpy(tables.row_at).long())[node, st].clamp(min=0)
            lon = Vindex(log_on_rows)[row, r, k]
            pyro.factor(f"obs_read{j}", torch.where(u == 1, log_off[trace[None, :], st], lon))


def _independent_model(model: str, data: HLSMData, priors: Priors, dtype):
    arrays = torch_arrays(data)
    route_p, skill_p, noise, off_module = _globals(model, data, priors, dtype)
    n, t = data.step_mask.shape
    route_rows, skill_rows = _execution_rows(model, route_p, skill_p, arrays, data.n_routes, data.n_skills)
    log_on = _log_on(arrays["match"], arrays["length"][..., None, None], noise, data.n_chars)
    log_off = _log_off(arrays["length"], data.n_chars, data.max_len, noise.dtype)
    for g in data.blocks:
        _block_sites(data, g, route_rows, skill_rows, log_off, off_module, noise)
    with pyro.plate("traces", n, dim=-2), pyro.plate("steps", t, dim=-1):
        with pyro.poutine.mask(mask=arrays["emit"]):
            r = pyro.sample("route", _categorical(route_rows), infer=_enum())
            k = pyro.sample("skill", _categorical(skill_rows), infer=_enum())
            u = pyro.sample("off", _bernoulli(off_module), infer=_enum())
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
    groups = []  # per block group: its tables, the block of each trace (-1: none), the hidden steps
    for g in data.blocks:
        tables = tree_tables(g, t_max)
        at = np.full(n, -1)
        at[g.trace] = np.arange(g.n_blocks)
        hidden_at = np.zeros((n, t_max), dtype=bool)
        hidden_at[g.trace[:, None], g.hidden] = True
        groups.append((tables, torch.from_numpy(tables.child).long(), at, hidden_at, _rows_log_on(data, tables, noise)))
    n_idx = torch.arange(n)
    nodes = [torch.from_numpy(np.maximum(at, 0)) for _, _, at, _, _ in groups]
    # with blocks a hidden entry can be read at any later step: no markov window
    steps = range(t_max) if data.blocks else pyro.markov(range(t_max))
    with pyro.plate("traces", n, dim=-1):
        r, k = data.n_routes, data.n_skills
        for t in steps:
            with pyro.poutine.mask(mask=arrays["step_mask"][:, t]):
                r = pyro.sample(f"route_{t}", _categorical(Vindex(route_trans)[r]), infer=_enum())
                k = pyro.sample(f"skill_{t}", _categorical(Vindex(skill_trans)[k]), infer=_enum())
            lon = Vindex(log_on)[n_idx, t, r, k]
            for i, (tables, child, at, hidden_at, log_on_rows) in enumerate(groups):
                if hidden_at[:, t].any():
                    nodes[i] = torch.where(torch.from_numpy(hidden_at[:, t]), Vindex(child)[nodes[i], r, k], nodes[i])
                if (tables.row_at[:, t] >= 0).any():
                    row = Vindex(torch.from_numpy(tables.row_at[:, t]).long())[nodes[i]]
                    has = torch.from_numpy(at >= 0) & (row >= 0)
                    lon = torch.where(has, Vindex(log_on_rows)[row.clamp(min=0), r, k], lon)
            with pyro.poutine.mask(mask=observed[:, t]):
                u = pyro.sample(f"off_{t}", _bernoulli(off_module), infer=_enum())
                pyro.factor(f"obs_{t}", torch.where(u == 1, log_off[:, t], lon))


PYRO_MODELS = {"modular": modular_model, "entangled": entangled_model, "grammar": grammar_model}
