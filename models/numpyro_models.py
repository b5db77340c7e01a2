"""The HLSM as NumPyro programs (DESIGN §4, §5).

Each model is a plain function of a :class:`~latentsel.models.data.HLSMData` and the prior
hyper-parameters. Global sites: the execution (or transition) rows, ``noise`` and
``off_module``. Per step (inside the ``traces`` and ``steps`` plates): the executed
routing ``route``, skill ``skill`` and off-module flag ``off``, all marked for parallel
enumeration, and the emission as a factor ``obs``. The grammar model is a chain, written
as a Python loop under ``markov`` with sites ``route_t``, ``skill_t``, ``off_t`` (an
enumerated ``scan`` gives a wrong ``TraceEnum_ELBO`` loss in current NumPyro releases).

Hidden steps (:class:`~latentsel.models.data.HiddenBlocks`). In the modular and entangled
models the steps plate covers the free observed steps; the j + 1 steps of each block are
drawn in a plate ``blocks{j}`` with sites ``route_hidden{j}_{l}`` / ``skill_hidden{j}_{l}``
(l = 1..j, the hidden steps) and ``route_after{j}`` / ``skill_after{j}`` / ``off_after{j}``
(the observed step), whose emission ``obs_after{j}`` reads the block's tree of hidden
outputs. In the grammar chain the emission of a block's observed step reads the selections
of the j steps before it (``markov`` keeps them). Hidden steps have no off-module flag.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.funsor import markov
from numpyro.ops.indexing import Vindex

from latentsel.models.data import HLSMData, execution_rows, log_p_off, log_p_on
from latentsel.models.params import Priors

__all__ = ["modular_model", "entangled_model", "grammar_model", "NUMPYRO_MODELS", "GLOBAL_SITES"]



def _enum():
    # a fresh dict per site: NumPyro writes each site's enumeration dims into it
    return {"enumerate": "parallel"}

GLOBAL_SITES = {
    "modular": ("route_exec", "skill_exec", "noise", "off_module"),
    "entangled": ("route_exec_ctx", "skill_exec_ctx", "noise", "off_module"),
    "grammar": ("route_trans", "skill_trans", "noise", "off_module"),
}


def _globals(model: str, data: HLSMData, priors: Priors):
    conc_r, conc_k = priors.concentration(model, data.n_routes, data.n_skills)
    names = GLOBAL_SITES[model]
    route = numpyro.sample(names[0], dist.Dirichlet(jnp.asarray(conc_r)).to_event(conc_r.ndim - 1))
    skill = numpyro.sample(names[1], dist.Dirichlet(jnp.asarray(conc_k)).to_event(conc_k.ndim - 1))
    noise = numpyro.sample("noise", dist.Beta(*priors.noise))
    off_module = numpyro.sample("off_module", dist.Beta(*priors.off_module))
    return route, skill, noise, off_module


def _leaf_log_on(data: HLSMData, g, noise):
    """log p_on of a block's observed step at every leaf: ``[L, R, K]``, -inf where the lengths differ."""
    y_len = jnp.asarray(data.length)[g.trace, g.step][g.owners[-1]][:, None, None]
    m = jnp.asarray(g.leaf_match).astype(jnp.int32)
    return jnp.where(m >= 0, m * jnp.log1p(-noise) + (y_len - m) * (jnp.log(noise) - jnp.log(data.n_chars - 1.0)),
                     -jnp.inf)


def _leaf(g, block, hidden):
    """The leaf reached by the hidden selections ``hidden = [(r, k), ...]`` of ``block``."""
    idx = Vindex(jnp.asarray(g.nodes[0]))[block, hidden[0][0], hidden[0][1]]
    for level in range(1, len(g.nodes)):
        idx = Vindex(jnp.asarray(g.nodes[level]))[idx, hidden[level][0], hidden[level][1]]
    return idx


def _block_sites(g, route_rows, skill_rows, log_on_leaf, log_off, off_module):
    j, b = g.n_hidden, g.trace.size
    with numpyro.plate(f"blocks{j}", b, dim=-1):
        hidden = []
        for level in range(j + 1):
            t = jnp.asarray(g.step - j + level)
            name = f"hidden{j}_{level + 1}" if level < j else f"after{j}"
            r = numpyro.sample(f"route_{name}", dist.Categorical(route_rows[g.trace, t]), infer=_enum())
            k = numpyro.sample(f"skill_{name}", dist.Categorical(skill_rows[g.trace, t]), infer=_enum())
            hidden.append((r, k))
        (r, k) = hidden.pop()
        u = numpyro.sample(f"off_after{j}", dist.Bernoulli(off_module), infer=_enum())
        lon = Vindex(log_on_leaf)[_leaf(g, jnp.arange(b), hidden), r, k]
        numpyro.factor(f"obs_after{j}", jnp.where(u == 1, log_off[g.trace, g.step], lon))


def _independent_model(model: str, data: HLSMData, priors: Priors):
    route_p, skill_p, noise, off_module = _globals(model, data, priors)
    n, t = data.step_mask.shape
    route_rows, skill_rows = execution_rows(model, route_p, skill_p, data)  # [N, T, R], [N, T, K]
    log_on = log_p_on(data, noise)
    log_off = log_p_off(jnp.asarray(data.length), data.n_chars, data.max_len)
    for g in data.blocks:
        _block_sites(g, route_rows, skill_rows, _leaf_log_on(data, g, noise), log_off, off_module)
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
    # per block group: the block whose observed step is (trace, t), or -1
    block_at = []
    for g in data.blocks:
        at = np.full((n, t_max), -1)
        at[g.trace, g.step] = np.arange(g.trace.size)
        block_at.append((g, at, _leaf_log_on(data, g, noise)))
    n_idx = jnp.arange(n)
    history = max([g.n_hidden for g in data.blocks], default=1)
    with numpyro.plate("traces", n, dim=-1):
        r, k = data.n_routes, data.n_skills
        past = []
        for t in markov(range(t_max), history=history):
            with numpyro.handlers.mask(mask=step_mask[:, t]):
                r = numpyro.sample(f"route_{t}", dist.Categorical(route_trans[r]), infer=_enum())
                k = numpyro.sample(f"skill_{t}", dist.Categorical(skill_trans[k]), infer=_enum())
            past.append((r, k))
            lon = Vindex(log_on)[n_idx, t, r, k]
            for g, at, log_on_leaf in block_at:
                j = g.n_hidden
                if t < j or not (at[:, t] >= 0).any():
                    continue
                block = jnp.asarray(np.maximum(at[:, t], 0))
                leaf_lon = Vindex(log_on_leaf)[_leaf(g, block, past[t - j: t]), r, k]
                lon = jnp.where(jnp.asarray(at[:, t] >= 0), leaf_lon, lon)
            with numpyro.handlers.mask(mask=observed[:, t]):
                u = numpyro.sample(f"off_{t}", dist.Bernoulli(off_module), infer=_enum())
                numpyro.factor(f"obs_{t}", jnp.where(u == 1, log_off[:, t], lon))


NUMPYRO_MODELS = {"modular": modular_model, "entangled": entangled_model, "grammar": grammar_model}
