"""Per-trace log evidence from the NumPyro program, by enumeration (DESIGN §5).

``TraceEnum_ELBO`` gives one number for a corpus: the discrete sites summed out and every
plate multiplied out, the global sites' prior included. The per-trace evidence keeps the
``traces`` plate instead. The program runs under NumPyro's enumeration handlers with its
global sites fixed at the given parameters; the log factors of its local sites, grouped by
the plate that indexes traces (``traces``, and each block plate ``blocks{j}``), are contracted
by funsor's ``sum_product``, which sums out the enumerated selections and multiplies out the
``steps`` plate but keeps that one (a block's entries are then added to its trace). The global sites' factors
are left out, so nothing has to be subtracted again.

This is the program's own contraction, not the closed form, and it is pinned against the
closed form and brute-force enumeration in the tests; it is the slow path (about twice the
closed form, ``benchmarks/inference.py``).
"""
from __future__ import annotations

from functools import partial

import funsor
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.contrib.funsor import enum, plate_to_enum_plate
from numpyro.contrib.funsor import trace as packed_trace
from numpyro.distributions import ExpandedDistribution, MaskedDistribution
from numpyro.handlers import substitute

from latentsel.models.data import HLSMData
from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.registry import model_spec

__all__ = ["numpyro_log_evidence", "ENUM_CHUNK", "BLOCK_CHUNK"]

ENUM_CHUNK = 32
"""Traces per step of the jitted map over a corpus. The contraction materializes
[2, K, R, chunk, T] tensors, which stay in the fastest caches when chunks are small: on 10^5
depth-4 traces, chunks of 32 took 1.28-1.44 s, of 128 1.75 s and of 512 2.41 s."""

BLOCK_CHUNK = 1024
"""Traces with hidden-step blocks per compiled part."""

_TRACE_PLATES = ("traces", "blocks")


def _local_factors(model: str, params, data: HLSMData):
    """The funsor log factors of the program's local sites, grouped by the plate that indexes
    traces (``traces`` or ``blocks{j}``): ``{plate: (factors, enumerated sites, plates)}``."""
    program = substitute(enum(NUMPYRO_MODELS[model], first_available_dim=-3),
                         data=dict(zip(model_spec(model).sites, params)))
    with plate_to_enum_plate():
        tr = packed_trace(program).get_trace(data)
    groups = {}
    for site in tr.values():
        if site["type"] != "sample" or site["name"] in model_spec(model).sites:
            continue
        fn = site["fn"]
        if not site["is_observed"]:
            # a masked selection (a padding step) still sums to one over its values: its
            # measure is the unmasked distribution, as in TraceEnum_ELBO
            shape = fn.batch_shape
            while isinstance(fn, (MaskedDistribution, ExpandedDistribution)):
                fn = fn.base_dist
            fn = fn.expand(shape)
        frames = [f.name for f in site["cond_indep_stack"] if f.dim is not None]
        factors, sum_vars, plates = groups.setdefault(next(f for f in frames if f.startswith(_TRACE_PLATES)),
                                                      ([], set(), set()))
        factors.append(funsor.to_funsor(fn.log_prob(site["value"]), output=funsor.Real,
                                        dim_to_name=site["infer"]["dim_to_name"]))
        if not site["is_observed"]:
            sum_vars.add(site["name"])
        plates.update(frames)
    return groups


def _chunk_evidence(model: str, params, data: HLSMData):
    out = jnp.zeros(data.n_traces)
    for name, (factors, sum_vars, plates) in _local_factors(model, params, data).items():
        with funsor.interpretations.lazy:
            values = funsor.sum_product.sum_product(funsor.ops.logaddexp, funsor.ops.add, factors,
                                                    eliminate=frozenset(sum_vars | plates - {name}),
                                                    plates=frozenset(plates))
        values = funsor.optimizer.apply_optimizer(values).data  # [size of the plate]; () when it is 1
        if name == "traces":
            out = out + values
        else:
            g = next(g for g in data.blocks if f"blocks{g.n_hidden}" == name)
            out = out.at[jnp.asarray(g.trace)].add(values)
    return out


@partial(jax.jit, static_argnums=(0, 3, 4))
def _free_evidence(model: str, params, arrays, n_chars: int, max_len: int):
    """Chunks ``arrays: [n_chunks, chunk, ...]`` one after the other in one call: ``[n_chunks, chunk]``."""
    return jax.lax.map(lambda a: _chunk_evidence(model, params, HLSMData.from_arrays(a, n_chars, max_len)), arrays)


def numpyro_log_evidence(model: str, params, data: HLSMData, chunk: int = ENUM_CHUNK,
                         block_chunk: int = BLOCK_CHUNK) -> np.ndarray:
    """log p(D_n | θ) of every trace by the NumPyro program's enumeration: ``float64[N]``, float64.

    The traces without hidden-step blocks are one jitted call that maps over chunks of
    ``chunk`` (the last padded with empty traces). The traces with blocks go ``block_chunk``
    at a time, each part compiled on its own: the block trees are numpy index structures the
    program reads while it is traced.
    """
    if model not in NUMPYRO_MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(NUMPYRO_MODELS)}")
    out = np.zeros(data.n_traces)
    with jax.enable_x64(True):
        params = tuple(jnp.asarray(a, jnp.float64) for a in params)
        has_block = data.has_block
        free = np.flatnonzero(~has_block)
        if free.size:
            part = data if free.size == data.n_traces else data.take(free)
            out[free] = _mapped_evidence(model, params, part, chunk)
        rows = np.flatnonzero(has_block)
        for lo in range(0, rows.size, block_chunk):
            part = data.take(rows[lo:lo + block_chunk])
            out[rows[lo:lo + block_chunk]] = np.asarray(jax.jit(lambda p: _chunk_evidence(model, p, part))(params))
    return out


def _mapped_evidence(model: str, params, data: HLSMData, chunk: int) -> np.ndarray:
    n = data.n_traces
    n_chunks = -(-n // chunk)
    size = n if n_chunks == 1 else chunk
    arrays = tuple(np.concatenate([a, np.zeros((n_chunks * size - n,) + a.shape[1:], a.dtype)])
                   .reshape((n_chunks, size) + a.shape[1:]) for a in data.arrays())
    values = _free_evidence(model, params, arrays, data.n_chars, data.max_len)
    return np.asarray(values, dtype=np.float64).reshape(-1)[:n]
