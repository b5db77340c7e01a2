"""Exact inference on a whole corpus: the free steps in chunks, then the hidden-step blocks.

:func:`corpus_posterior` and :func:`corpus_counts` combine the closed form of the steps
outside every block (:mod:`latentsel.inference.exact`, :mod:`latentsel.inference.em`) with the
blocks of the independent models (:mod:`latentsel.inference.blocks`) and the grammar traces
that have blocks (:mod:`latentsel.inference.chain_blocks`). Results are numpy, float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from latentsel.inference.blocks import block_map, block_posterior
from latentsel.inference.chain_blocks import chain_block_map, chain_block_posterior, layouts
from latentsel.inference.exact import UNDERFLOW, ExactPosterior, exact_log_evidence, exact_posterior
from latentsel._compiled import use_compiled
from latentsel.models.data import HLSMData
from latentsel.models.registry import model_spec

__all__ = ["corpus_posterior", "corpus_log_evidence", "corpus_counts", "chunks", "block_chunks", "CHUNK"]

CHUNK = 1024
"""Traces per jitted call: a chunk's per-step tensors ([chunk, T, R, K] float64, 8 MB at T = 4)
stay in cache, which made the evidence and the E-step about twice as fast as chunks of 8192
(``benchmarks/inference.py --chunk``)."""


COMPILED_FROM = 8_192
"""Traces from which the independent models' evidence and posterior take the compiled pass:
below it numba's start costs more than it saves."""


def _bucket(n: int, lo: int = 64) -> int:
    """The next power of two >= ``max(n, lo)``."""
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def chunks(data: HLSMData, chunk: int, pad: bool = False):
    """``(rows, part)`` over the traces, ``chunk`` at a time, without their blocks.

    With ``pad`` every part has a shape from a small set, so that a jitted function compiles
    once per shape bucket and process, not once per corpus: ``chunk`` traces (the last part,
    or a smaller corpus, padded to the next power of two of at least 64 traces) by the next
    power of two of the depth. Padding steps are masked out everywhere."""
    n = data.n_traces
    data = data.without_blocks()
    if not pad and n <= chunk:
        yield np.arange(n), data
        return
    t = data.step_mask.shape[1]
    t_pad = _bucket(t, 1) if pad else t
    for lo in range(0, n, chunk):
        rows = np.arange(lo, min(lo + chunk, n))
        part = data.take(slice(lo, lo + chunk))
        if pad:
            size = min(chunk, _bucket(rows.size)) if rows.size < chunk else chunk
            if (size, t_pad) != (rows.size, t):
                arrays = tuple(np.pad(a, [(0, size - rows.size), (0, t_pad - t)] + [(0, 0)] * (a.ndim - 2),
                                      constant_values=-1 if a.dtype == np.int8 else 0)
                               for a in part.arrays())
                part = HLSMData.from_arrays(arrays, part.n_chars, part.max_len)
        yield rows, part


def block_chunks(g, n_traces: int, max_rows: int = 1 << 16, max_blocks: int = 2048):
    """The blocks of ``g`` in consecutive parts of at most ``max_rows`` tree nodes and read rows
    and ``max_blocks`` blocks (at least one block a part)."""
    cost = np.ones(g.n_blocks, dtype=np.int64)
    for level in range(g.n_hidden):
        cost += np.bincount(g.owners[level], minlength=g.n_blocks)
        cost += np.bincount(g.owners[level][g.read_node[level]], minlength=g.n_blocks)
    ends = np.cumsum(cost)
    identity = np.arange(n_traces)
    lo = 0
    while lo < g.n_blocks:
        hi = int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + max_rows, side="right"))
        hi = min(max(lo + 1, hi), lo + max_blocks)
        keep = np.zeros(g.n_blocks, dtype=bool)
        keep[lo:hi] = True
        yield g.select(keep, identity) if (lo, hi) != (0, g.n_blocks) else g
        lo = hi


def _fast_rows(model: str, data: HLSMData) -> np.ndarray:
    # grammar traces with blocks go through the layout path whole
    return np.flatnonzero(~data.has_block) if model_spec(model).chain else np.arange(data.n_traces)


def corpus_posterior(model: str, params, data: HLSMData, chunk: int = CHUNK, *, joint: bool = True) -> ExactPosterior:
    """Exact evidence, marginals and MAP of every trace and step (numpy, float64); the joint
    posterior of (r_t, k_t) too unless ``joint`` is False."""
    n, t = data.step_mask.shape
    r_n, k_n = data.n_routes, data.n_skills
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        fast = _fast_rows(model, data)
        compiled = not model_spec(model).chain and use_compiled(n, COMPILED_FROM)
        if compiled:
            # one compiled pass; the traces where it would underflow by the jitted path's log-space branch
            from latentsel.inference.kernels import independent_posterior_arrays  # numba: only where it pays back
            *fields, careful = independent_posterior_arrays(model, params, data, UNDERFLOW, joint)
            out = ExactPosterior(*fields)
            fast = np.flatnonzero(careful)
        if not compiled and fast.size == n:  # every trace: chunks are consecutive, concatenated once
            # padded to a shape bucket (compiled once a process), cut back to the chunk's traces and steps
            parts = [_cut(exact_posterior(model, params, part, joint=joint), rows.size, t)
                     for rows, part in chunks(data, chunk, pad=True)]
            out = parts[0] if len(parts) == 1 else ExactPosterior(*(None if f[0] is None else np.concatenate(f)
                                                                    for f in zip(*parts)))
            if data.blocks:  # writable for the blocks
                out = ExactPosterior(*(None if f is None else np.array(f) for f in out))
        else:  # the traces ``fast`` by the jitted path, into ``out``
            if not compiled:
                out = ExactPosterior(np.zeros(n), np.zeros((n, t, r_n)), np.zeros((n, t, k_n)), np.zeros((n, t)),
                                     np.full((n, t), -1), np.full((n, t), -1),
                                     np.zeros((n, t, r_n, k_n)) if joint else None)
            for rows, part in (chunks(data.take(fast), chunk, pad=True) if fast.size else ()):
                post = _cut(exact_posterior(model, params, part, joint=joint), rows.size, t)
                for field, value in zip(out, post):
                    if field is not None:
                        field[fast[rows]] = value
        if model_spec(model).chain:
            for layout in layouts(data):
                log_ev, joint, p_off = (np.asarray(a) for a in chain_block_posterior(params, data, layout)[:3])
                rows, d = layout.traces, layout.depth
                _fill(out, rows[:, None], np.arange(d)[None, :], joint, p_off)
                out.log_evidence[rows] = log_ev
                path = chain_block_map(params, data, layout)
                out.map_route[rows, :d], out.map_skill[rows, :d] = path[..., 0], path[..., 1]
            return out
        for g in (part for group in data.blocks for part in block_chunks(group, n)):
            res = block_posterior(model, params, data, g)
            bi, ti = np.nonzero(g.steps(t))
            rows = g.trace[bi]
            _fill(out, rows, ti, np.asarray(res.joint_probs)[bi, ti], np.asarray(res.p_off)[bi, ti])
            np.add.at(out.log_evidence, g.trace, np.asarray(res.log_evidence))
            path = block_map(model, params, data, g)
            out.map_route[rows, ti], out.map_skill[rows, ti] = path[bi, ti, 0], path[bi, ti, 1]
    return out


def corpus_log_evidence(model: str, params, data: HLSMData, chunk: int = CHUNK) -> np.ndarray:
    """log p(D_n | θ) of every trace (numpy, float64): :func:`corpus_posterior`'s
    ``log_evidence`` without the rest of the posterior."""
    n = data.n_traces
    out = np.zeros(n)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        fast = _fast_rows(model, data)
        if not model_spec(model).chain and use_compiled(n, COMPILED_FROM):
            # one compiled pass; the traces where it would underflow by the jitted path's log-space branch
            from latentsel.inference.kernels import independent_log_evidence  # numba: only where it pays back
            out, careful = independent_log_evidence(model, params, data, UNDERFLOW)
            fast = np.flatnonzero(careful)
        sub = data if fast.size == n else data.take(fast)
        for rows, part in (chunks(sub, chunk, pad=True) if fast.size else ()):
            out[fast[rows]] = np.asarray(exact_log_evidence(model, params, part))[:rows.size]
        if model_spec(model).chain:
            for layout in layouts(data):
                out[layout.traces] = np.asarray(chain_block_posterior(params, data, layout)[0])
            return out
        for g in (part for group in data.blocks for part in block_chunks(group, n)):
            np.add.at(out, g.trace, np.asarray(block_posterior(model, params, data, g).log_evidence))
    return out


def _cut(post: ExactPosterior, n: int, t: int) -> ExactPosterior:
    """A padded chunk's results, numpy, cut back to its ``n`` traces and ``t`` steps."""
    return jax.tree.map(lambda a: np.asarray(a)[:n, :t] if np.ndim(a) > 1 else np.asarray(a)[:n], post)


def _fill(out: ExactPosterior, rows, steps, joint, p_off) -> None:
    if out.joint_probs is not None:
        out.joint_probs[rows, steps] = joint
    out.route_probs[rows, steps] = joint.sum(-1)
    out.skill_probs[rows, steps] = joint.sum(-2)
    out.p_off[rows, steps] = np.clip(p_off, 0.0, 1.0)


def corpus_counts(model: str, params, data: HLSMData, fast_counts, chunk: int = CHUNK):
    """Expected sufficient statistics of a corpus: ``fast_counts(model, params, part)`` on
    chunks of the free steps, plus the blocks. Returns the summed fields of
    ``(route_counts, skill_counts, noise_counts, off_counts, log_evidence)`` as numpy."""
    total = None

    def add(values):
        nonlocal total
        values = [np.asarray(v, dtype=np.float64) for v in values]
        total = values if total is None else [a + b for a, b in zip(total, values)]

    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        fast = _fast_rows(model, data)
        if fast.size and not model_spec(model).chain and use_compiled(data.n_traces, COMPILED_FROM):
            # one compiled pass; the traces where it would underflow by the jitted path
            from latentsel.inference.kernels import independent_counts  # numba: only where it pays back
            *values, careful = independent_counts(model, params, data, UNDERFLOW)
            add(values)
            fast = np.flatnonzero(careful)
        if fast.size:
            sub = data.take(fast) if fast.size < data.n_traces else data
            for _, part in chunks(sub, chunk, pad=True):
                add(fast_counts(model, params, part))
        if model_spec(model).chain:
            for layout in layouts(data):
                log_ev, _, _, route_counts, skill_counts, noise, off = chain_block_posterior(params, data, layout)
                add((route_counts, skill_counts, noise, off, jnp.sum(log_ev)))
        else:
            for g in (part for group in data.blocks for part in block_chunks(group, data.n_traces)):
                res = block_posterior(model, params, data, g)
                add((res.route_counts, res.skill_counts, res.noise_counts, res.off_counts, jnp.sum(res.log_evidence)))
    return total
