"""The HLSM as NumPyro programs (DESIGN §4, §5).

Each model is a plain function of a :class:`~latentsel.models.data.HLSMData` and the prior
hyper-parameters. Global sites: the execution (or transition) rows, ``noise`` and
``off_module``. Per step (inside the ``traces`` and ``steps`` plates): the executed
routing ``route``, skill ``skill`` and off-module flag ``off``, all marked for parallel
enumeration, and the emission as a factor ``obs``. The grammar model is a chain, written
as a Python loop under ``markov`` with sites ``route_t``, ``skill_t``, ``off_t`` (an
enumerated ``scan`` gives a wrong ``TraceEnum_ELBO`` loss in current NumPyro releases).

Hidden steps (:class:`~latentsel.models.data.HiddenBlocks`). In the modular and entangled
models the steps plate covers the free observed steps. A block group with J hidden steps is
a plate ``blocks{J}`` with sites ``route_hidden{J}_{l}`` / ``skill_hidden{J}_{l}`` (l = 1..J,
the hidden steps, which walk the block's tree to a leaf) and, in a nested plate ``reads{J}``
over the observed steps each block reads, ``route_read{J}`` / ``skill_read{J}`` /
``off_read{J}`` and the emission ``obs_read{J}``, which reads the match counts at the leaf's
ancestor of the step's level. In the grammar chain the current node of every block is carried
along the steps (without a ``markov`` window, since a hidden entry can be read at any later
step), and a reading step's emission reads that node's match counts. Hidden steps have no
off-module flag.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.funsor import markov
from numpyro.ops.indexing import Vindex

from latentsel.models.data import HLSMData, execution_rows, log_p_off, log_p_on, tree_tables
from latentsel.models.params import Priors
from latentsel.models.registry import model_spec

__all__ = ["modular_model", "entangled_model", "grammar_model", "NUMPYRO_MODELS"]


def _enum():
    # a fresh dict per site: NumPyro writes each site's enumeration dims into it
    return {"enumerate": "parallel"}


def _globals(model: str, data: HLSMData, priors: Priors):
    spec = model_spec(model)
    conc_r, conc_k = spec.concentration(priors, data.n_routes, data.n_skills)
    names = spec.sites
    route = numpyro.sample(names[0], dist.Dirichlet(jnp.asarray(conc_r)).to_event(conc_r.ndim - 1))
    skill = numpyro.sample(names[1], dist.Dirichlet(jnp.asarray(conc_k)).to_event(conc_k.ndim - 1))
    noise = numpyro.sample("noise", dist.Beta(*priors.noise))
    off_module = numpyro.sample("off_module", dist.Beta(*priors.off_module))
    return route, skill, noise, off_module


def _rows_log_on(data: HLSMData, tables, noise):
    """log p_on of every read row: ``[Q, R, K]``, -inf where the lengths differ."""
    y_len = jnp.asarray(data.length)[tables.row_trace, tables.row_step][:, None, None]
    m = jnp.asarray(tables.read_match).astype(jnp.int32)
    return jnp.where(m >= 0, m * jnp.log1p(-noise) + (y_len - m) * (jnp.log(noise) - jnp.log(data.n_chars - 1.0)),
                     -jnp.inf)


def _block_sites(data, g, route_rows, skill_rows, log_off, off_module, noise):
    j, b = g.n_hidden, g.n_blocks
    tables = tree_tables(g, data.step_mask.shape[1])
    log_on_rows = _rows_log_on(data, tables, noise)
    trace = jnp.asarray(g.trace)
    with numpyro.plate(f"blocks{j}", b, dim=-1):
        node = jnp.arange(b)
        for level in range(j):
            t = jnp.asarray(g.hidden[:, level])
            r = numpyro.sample(f"route_hidden{j}_{level + 1}", dist.Categorical(route_rows[trace, t]), infer=_enum())
            k = numpyro.sample(f"skill_hidden{j}_{level + 1}", dist.Categorical(skill_rows[trace, t]), infer=_enum())
            node = Vindex(jnp.asarray(tables.child))[node, r, k]
        steps = tables.read_steps.T  # [P, B]
        st = jnp.asarray(np.maximum(steps, 0))
        with numpyro.plate(f"reads{j}", steps.shape[0], dim=-2), numpyro.handlers.mask(mask=jnp.asarray(steps >= 0)):
            r = numpyro.sample(f"route_read{j}", dist.Categorical(route_rows[trace[None, :], st]), infer=_enum())
            k = numpyro.sample(f"skill_read{j}", dist.Categorical(skill_rows[trace[None, :], st]), infer=_enum())
            u = numpyro.sample(f"off_read{j}", dist.Bernoulli(off_module), infer=_enum())
            row = jnp.maximum(Vindex(jnp.asarray(tables.row_at))[node, st], 0)
            lon = Vindex(log_on_rows)[row, r, k]
            numpyro.factor(f"obs_read{j}", jnp.where(u == 1, log_off[trace[None, :], st], lon))


def _independent_model(model: str, data: HLSMData, priors: Priors):
    route_p, skill_p, noise, off_module = _globals(model, data, priors)
    n, t = data.step_mask.shape
    route_rows, skill_rows = execution_rows(model, route_p, skill_p, data)  # [N, T, R], [N, T, K]
    log_on = log_p_on(data, noise)
    log_off = log_p_off(jnp.asarray(data.length), data.n_chars, data.max_len)
    for g in data.blocks:
        _block_sites(data, g, route_rows, skill_rows, log_off, off_module, noise)
    with numpyro.plate("traces", n, dim=-2), numpyro.plate("steps", t, dim=-1):
        with numpyro.handlers.mask(mask=jnp.asarray(data.emit)):
            r = numpyro.sample("route", dist.Categorical(route_rows), infer=_enum())
            k = numpyro.sample("skill", dist.Categorical(skill_rows), infer=_enum())
            u = numpyro.sample("off", dist.Bernoulli(off_module), infer=_enum())
            n_idx = jnp.arange(n)[:, None]
            t_idx = jnp.arange(t)[None, :]
            lon = Vindex(log_on)[n_idx, t_idx, r, k]
            numpyro.factor("obs", jnp.where(u == 1, log_off, lon))


def modular_model(data: HLSMData, priors: Priors = Priors()):
    """r_t ~ Cat(route_exec[c_t^r]), k_t ~ Cat(skill_exec[c_t^k]), u_t ~ Bernoulli(off_module)."""
    _independent_model("modular", data, priors)


def entangled_model(data: HLSMData, priors: Priors = Priors()):
    """r_t ~ Cat(route_exec_ctx[c_{t-1}^r, c_t^r]), k_t ~ Cat(skill_exec_ctx[c_{t-1}^k, c_t^k])."""
    _independent_model("entangled", data, priors)


def grammar_model(data: HLSMData, priors: Priors = Priors()):
    """r_t ~ Cat(route_trans[r_{t-1}]), k_t ~ Cat(skill_trans[k_{t-1}]); start rows at t = 1."""
    route_trans, skill_trans, noise, off_module = _globals("grammar", data, priors)
    n, t_max = data.step_mask.shape
    log_on = log_p_on(data, noise)
    log_off = log_p_off(jnp.asarray(data.length), data.n_chars, data.max_len)
    step_mask = jnp.asarray(data.step_mask)
    observed = jnp.asarray(data.emit | data.block_observed)
    # per block group: its tables, the block of each trace (-1: none) and the hidden steps
    groups = []
    for g in data.blocks:
        tables = tree_tables(g, t_max)
        at = np.full(n, -1)
        at[g.trace] = np.arange(g.n_blocks)
        hidden_at = np.zeros((n, t_max), dtype=bool)
        hidden_at[g.trace[:, None], g.hidden] = True
        groups.append((tables, at, hidden_at, _rows_log_on(data, tables, noise)))
    n_idx = jnp.arange(n)
    nodes = [jnp.asarray(np.maximum(at, 0)) for _, at, _, _ in groups]
    with numpyro.plate("traces", n, dim=-1):
        r, k = data.n_routes, data.n_skills
        # with blocks a hidden entry can be read at any later step, so no step's enumeration
        # dims may be recycled: no markov window (a window of t_max recycled the first
        # step's dims at depth 4 and gave a wrong evidence)
        for t in (range(t_max) if data.blocks else markov(range(t_max))):
            with numpyro.handlers.mask(mask=step_mask[:, t]):
                r = numpyro.sample(f"route_{t}", dist.Categorical(route_trans[r]), infer=_enum())
                k = numpyro.sample(f"skill_{t}", dist.Categorical(skill_trans[k]), infer=_enum())
            lon = Vindex(log_on)[n_idx, t, r, k]
            for i, (tables, at, hidden_at, log_on_rows) in enumerate(groups):
                if hidden_at[:, t].any():
                    step = Vindex(jnp.asarray(tables.child))[nodes[i], r, k]
                    nodes[i] = jnp.where(jnp.asarray(hidden_at[:, t]), step, nodes[i])
                if (tables.row_at[:, t] >= 0).any():
                    row = Vindex(jnp.asarray(tables.row_at[:, t]))[nodes[i]]
                    has = jnp.asarray(at >= 0) & (row >= 0)
                    lon = jnp.where(has, Vindex(log_on_rows)[jnp.maximum(row, 0), r, k], lon)
            with numpyro.handlers.mask(mask=observed[:, t]):
                u = numpyro.sample(f"off_{t}", dist.Bernoulli(off_module), infer=_enum())
                numpyro.factor(f"obs_{t}", jnp.where(u == 1, log_off[:, t], lon))


NUMPYRO_MODELS = {"modular": modular_model, "entangled": entangled_model, "grammar": grammar_model}
