"""The HLSM as NumPyro programs (DESIGN §4, §5).

Each model is a plain function of a :class:`~latentsel.models.data.HLSMData` and the prior
hyper-parameters. Global sites: the execution (or transition) rows, ``noise`` and
``off_module``. Per step (inside the ``traces`` and ``steps`` plates): the executed
routing ``route``, skill ``skill`` and off-module flag ``off``, all marked for parallel
enumeration, and the emission as a factor ``obs``. The grammar model is a chain, written
as a Python loop under ``markov`` with sites ``route_t``, ``skill_t``, ``off_t`` (an
enumerated ``scan`` gives a wrong ``TraceEnum_ELBO`` loss in current NumPyro releases).
"""
from __future__ import annotations

import jax.numpy as jnp
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


def _independent_model(model: str, data: HLSMData, priors: Priors):
    route_p, skill_p, noise, off_module = _globals(model, data, priors)
    n, t = data.step_mask.shape
    route_rows, skill_rows = execution_rows(model, route_p, skill_p, data)  # [N, T, R], [N, T, K]
    log_on = log_p_on(data, noise)
    log_off = log_p_off(jnp.asarray(data.length), data.n_chars, data.max_len)
    with numpyro.plate("traces", n, dim=-2), numpyro.plate("steps", t, dim=-1):
        with numpyro.handlers.mask(mask=jnp.asarray(data.step_mask)):
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
    mask = jnp.asarray(data.step_mask)
    n_idx = jnp.arange(n)
    with numpyro.plate("traces", n, dim=-1):
        r, k = data.n_routes, data.n_skills
        for t in markov(range(t_max)):
            with numpyro.handlers.mask(mask=mask[:, t]):
                r = numpyro.sample(f"route_{t}", dist.Categorical(route_trans[r]), infer=_enum())
                k = numpyro.sample(f"skill_{t}", dist.Categorical(skill_trans[k]), infer=_enum())
                u = numpyro.sample(f"off_{t}", dist.Bernoulli(off_module), infer=_enum())
                lon = Vindex(log_on)[n_idx, t, r, k]
                numpyro.factor(f"obs_{t}", jnp.where(u == 1, log_off[:, t], lon))


NUMPYRO_MODELS = {"modular": modular_model, "entangled": entangled_model, "grammar": grammar_model}
