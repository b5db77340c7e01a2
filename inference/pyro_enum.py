"""Exact inference with the Pyro programs: per-trace log evidence and the MAP selections.

The evidence keeps the ``traces`` plate: the enumerated program is traced with its global
sites fixed, its local log factors packed as Pyro's ``TraceEnum_ELBO`` packs them (a
selection's unmasked prior, an emission's masked factor) and contracted by
``pyro.ops.contract.contract_to_tensor`` in the log ring, down to the ``traces`` plate (or a
``blocks{j}`` plate, whose entries are added to their traces). The global sites' priors are
left out.

The MAP selections are Pyro's own ``infer_discrete(temperature=0)`` (Viterbi-like max-product
over the enumerated sites), read back per site. Everything runs in float64 under
``torch.no_grad``.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyro
import torch
from pyro.infer import infer_discrete
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import site_is_subsample

from latentsel.models.data import HLSMData, tree_tables
from latentsel.models.pyro_models import PYRO_MODELS
from latentsel.models.registry import model_spec

__all__ = ["pyro_log_evidence", "pyro_map", "conditioned", "PYRO_CHUNK"]

PYRO_CHUNK = 2048
"""Traces per traced and contracted chunk: Pyro's tracing and packing cost a fixed time per chunk.
On 2,000 depth-4 modular traces (2 cores), 0.150 s at 256, 0.115 s at 512, 0.107 s at 1024 and
0.093 s at 2048 (~30 MB of float64 a factor at 2048)."""

_TRACE_PLATES = ("traces", "blocks")


def conditioned(model: str, params, dtype=torch.float64):
    """The program of ``model`` with its global sites fixed at ``params``."""
    if model not in PYRO_MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(PYRO_MODELS)}")
    values = {name: torch.as_tensor(np.asarray(v), dtype=dtype) for name, v in zip(model_spec(model).sites, params)}
    return pyro.poutine.condition(PYRO_MODELS[model], data=values)


def _ordinal(tr, site):
    return frozenset(tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)


def _chunk_evidence(model: str, params, data: HLSMData) -> np.ndarray:
    program = pyro.poutine.enum(conditioned(model, params), first_available_dim=-3)
    tr = pyro.poutine.trace(program).get_trace(data)
    # the global sites are left out: their prior is not part of the evidence (and a row with
    # exact zeros has a Dirichlet density of 0 or infinity there)
    tr.compute_log_prob(site_filter=lambda name, site: name not in model_spec(model).sites)
    tr.pack_tensors()
    groups: dict[str, OrderedDict] = {}
    sum_dims: set = set()
    plate_sizes: dict = {}
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or name in model_spec(model).sites:
            continue
        if site["infer"].get("_enumerate_dim") is not None:
            term = site["packed"]["unscaled_log_prob"]  # the measure: a prior sums to one, mask or not
            sum_dims.update(term._pyro_dims)
        else:
            term = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
        plate = next(f.name for f in site["cond_indep_stack"] if f.name.startswith(_TRACE_PLATES))
        plate_sizes.update((tr.plate_to_symbol[f.name], f.size) for f in site["cond_indep_stack"] if f.vectorized)
        groups.setdefault(plate, OrderedDict()).setdefault(_ordinal(tr, site), []).append(term)
    sum_dims -= set(tr.plate_to_symbol.values())
    out = torch.zeros(data.n_traces, dtype=torch.float64)
    blocks = {f"blocks{g.n_hidden}": g for g in data.blocks}
    for plate, tree in groups.items():
        target = frozenset({tr.plate_to_symbol[plate]})
        sizes = {d: size for terms in tree.values() for term in terms for d, size in zip(term._pyro_dims, term.shape)}
        sizes.update(plate_sizes)  # packing drops a plate of size one from its tensors
        values = contract_to_tensor(tree, sum_dims, target_ordinal=target, ring=LogRing(dim_to_size=sizes))
        values = values.reshape(-1)
        if plate == "traces":
            out = out + values
        else:
            out.index_add_(0, torch.from_numpy(np.asarray(blocks[plate].trace)).long(), values)
    return out.numpy()


def pyro_log_evidence(model: str, params, data: HLSMData, chunk: int = PYRO_CHUNK) -> np.ndarray:
    """log p(D_n | θ) of every trace by the Pyro program's enumeration: ``float64[N]``."""
    if model not in PYRO_MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(PYRO_MODELS)}")
    out = np.zeros(data.n_traces)
    with torch.no_grad():
        for lo in range(0, data.n_traces, chunk):
            part = data.take(slice(lo, lo + chunk))
            out[lo:lo + part.n_traces] = _chunk_evidence(model, params, part)
    return out


def pyro_map(model: str, params, data: HLSMData) -> tuple[np.ndarray, np.ndarray]:
    """The MAP executed routing and skill of every step by Pyro's ``infer_discrete``
    (``temperature=0``): ``(int[N, T], int[N, T])``, -1 where there is no step.

    This is the joint MAP over the selections *and* the off-module flags; where the flags
    matter it can differ from the MAP with the flags summed out.
    """
    n, t_max = data.step_mask.shape
    route, skill = np.full((n, t_max), -1), np.full((n, t_max), -1)
    with torch.no_grad():
        decoded = infer_discrete(conditioned(model, params), first_available_dim=-3, temperature=0)
        tr = pyro.poutine.trace(decoded).get_trace(data)
    values = {name: site["value"].numpy() for name, site in tr.nodes.items() if site["type"] == "sample"}
    mask = np.asarray(data.step_mask)
    if model_spec(model).chain:
        for t in range(t_max):
            rows = mask[:, t]
            route[rows, t] = np.broadcast_to(values[f"route_{t}"], (n,))[rows]
            skill[rows, t] = np.broadcast_to(values[f"skill_{t}"], (n,))[rows]
        return route, skill
    free = np.asarray(data.free)
    route[free] = np.broadcast_to(values["route"], (n, t_max))[free]
    skill[free] = np.broadcast_to(values["skill"], (n, t_max))[free]
    for g in data.blocks:
        j = g.n_hidden
        for level in range(j):
            steps = g.hidden[:, level]
            route[g.trace, steps] = values[f"route_hidden{j}_{level + 1}"].reshape(-1)
            skill[g.trace, steps] = values[f"skill_hidden{j}_{level + 1}"].reshape(-1)
        read = tree_tables(g, t_max).read_steps  # [B, P]
        b, p = np.nonzero(read >= 0)
        route[g.trace[b], read[b, p]] = np.broadcast_to(values[f"route_read{j}"], read.T.shape)[p, b]
        skill[g.trace[b], read[b, p]] = np.broadcast_to(values[f"skill_read{j}"], read.T.shape)[p, b]
    return route, skill
