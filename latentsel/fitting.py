"""Fitting a trace file and writing the results (DESIGN §8): ``fit.json`` and ``posterior.jsonl``.

Methods: ``em`` (the MAP in softmax coordinates), ``svi`` (AutoDelta: the same point by
stochastic optimization; AutoNormal: a variational posterior, its mean as the estimate) and
``nuts`` (posterior draws; the estimate is the posterior mean, the draws go to ``samples.npz``)
on the NumPyro backend; ``svi`` and ``amortized`` on the Pyro backend. ``posterior.jsonl``
holds the exact posterior of every step at the point estimate, except for ``amortized``: θ by
EM on a random subset of traces, then an inference network trained on the rest of the corpus
gives every step's posterior (its accuracy against the exact posterior, measured on held-out
traces, goes to ``fit.json`` as ``evaluation``).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from latentsel._io import atomic_open
from latentsel.api import exact
from latentsel.emission import build_data
from latentsel.inference.em import fit_em
from latentsel.models.data import HLSMData
from latentsel.models.params import params_class, validate_params
from latentsel.traces import Trace
from latentsel.world import World

__all__ = ["fit_traces", "write_fit", "read_params", "params_to_json"]

METHODS = ("em", "svi", "nuts", "amortized")
BACKENDS = ("numpyro", "pyro")
PYRO_METHODS = ("svi", "amortized")
# the held-out traces of an amortized fit: a tenth of the corpus, at most this many
EVALUATION_TRACES = 2000
# Adam step sizes: the amortized network diverged at 0.03 under TraceGraph_ELBO and its KL was
# 40x higher at 0.05 than at 0.02 under TraceEnum_ELBO (default world, 300 steps of 256 traces)
DEFAULT_LR = {"svi": 0.05, "amortized": 0.02}


def params_to_json(params) -> dict:
    return {name: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for name, v in zip(params._fields, params)}


def read_params(path: str | Path, model: str, world: World):
    """Parameters from a ``fit.json`` (its ``params`` object), validated for ``model``."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = obj["params"]
        cls = params_class(model)
        params = cls(*(fields[name] for name in cls._fields))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: no {model} parameters ({e})") from None
    try:
        return validate_params(params, model, world.n_routes, world.n_skills)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def fit_traces(traces: Sequence[Trace], world: World, model: str = "modular", method: str = "em",
               *, max_iter: int = 500, tol: float = 1e-8, guide: str = "delta", steps: int = 2000, lr: float | None = None,
               warmup: int = 500, samples: int = 500, chains: int = 2, seed: int = 0, progress: bool = True,
               data: HLSMData | None = None, backend: str = "numpyro", batch: int = 256,
               amortized_em_traces: int = 10_000, estimator: str = "enum", device: str | None = None) -> dict:
    """Fit a corpus; returns a dict with the fitted ``params``, the ``posterior`` of every step
    (exact at them; amortized: the network's), the JSON ``record`` and, for nuts, the
    ``mcmc`` result (draws per chain). ``data``: the corpus's
    :func:`~latentsel.emission.build_data`, when the caller has it already. ``backend``:
    ``numpyro`` (em, svi, nuts) or ``pyro`` (svi, amortized); ``batch``,
    ``amortized_em_traces``, ``estimator`` and ``device``: the amortized fit's minibatch, EM
    subset, ELBO estimator and torch device."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "pyro" and method not in PYRO_METHODS:
        raise ValueError(f"method {method} runs on the numpyro backend; the pyro backend fits by "
                         f"{' or '.join(PYRO_METHODS)}")
    if method == "amortized" and backend != "pyro":
        raise ValueError("method amortized runs on the pyro backend (--backend pyro)")
    params_class(model)
    data = build_data(traces, world, model=model) if data is None else data
    fitters = {"em": _fit_em, "svi": _fit_svi, "nuts": _fit_nuts, "amortized": _fit_amortized}
    lr = DEFAULT_LR.get(method) if lr is None else lr
    options = dict(max_iter=max_iter, tol=tol, guide=guide, steps=steps, lr=lr, warmup=warmup, samples=samples,
                   chains=chains, seed=seed, backend=backend, batch=batch, em_traces=amortized_em_traces,
                   estimator=estimator, device=device)
    params, extra, out = fitters[method](model, data, progress, **options)
    post = exact(data, params, model, joint=False)
    record = {
        "model": model,
        "method": method,
        "backend": backend,
        "params": params_to_json(params),
        "log_evidence": float(post.log_evidence.sum()),
        "n_traces": len(traces),
        **extra,
    }
    return {"params": params, "posterior": out.pop("posterior", post), "record": record, **out}


@contextmanager
def _bar(total: int, desc: str, unit: str, progress: bool, label: str):
    """A progress bar, closed on exit, and its ``tick(step, value)`` (``value`` shown as ``label``)."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)

    def tick(step, value):
        bar.update(step - bar.n)
        bar.set_postfix({label: f"{value:.6g}"})

    try:
        yield tick
    finally:
        bar.close()


def _fit_em(model, data, progress, *, max_iter, tol, **_):
    with _bar(max_iter, f"EM ({model})", "it", progress, "objective") as tick:
        result = fit_em(model, data, max_iter=max_iter, tol=tol, progress=tick)
    extra = {"iterations": len(result.objective) - 1, "e_steps": result.e_steps, "converged": bool(result.converged),
             "objective": [float(j) for j in result.objective]}
    return result.params, extra, {}


def _fit_svi(model, data, progress, *, guide, steps, lr, seed, backend, **_):
    if backend == "pyro":
        from latentsel.inference.pyro_svi import fit_pyro_svi as fit_svi
    else:
        from latentsel.inference.svi import fit_svi

    with _bar(steps, f"SVI ({model}, {guide}, {backend})", "step", progress, "loss") as tick:
        result = fit_svi(model, data, guide=guide, steps=steps, lr=lr, seed=seed, progress=tick)
    extra = {"guide": guide, "steps": steps, "lr": lr, "seed": seed, "losses": [float(x) for x in result.losses]}
    if result.std is not None:
        extra["posterior_std"] = params_to_json(result.std)
        extra["posterior_median"] = params_to_json(result.median)
        # the guide's own scales, in NumPyro's unconstrained coordinates
        # NumPyro names the scales {site}_auto_scale, Pyro AutoNormal.scales.{site}
        extra["guide_scale"] = {k.removesuffix("_auto_scale").removeprefix("AutoNormal.scales."): np.asarray(v).tolist()
                                for k, v in result.guide_params.items()
                                if k.endswith("_auto_scale") or k.startswith("AutoNormal.scales.")}
    return result.params, extra, {"svi": result}


def _fit_amortized(model, data, progress, *, max_iter, tol, steps, lr, seed, batch, em_traces, estimator, device,
                   **_):
    """θ by EM on at most ``em_traces`` random traces; the network trained on every trace but
    the held-out ones, which measure it against the exact posterior at θ."""
    from latentsel.inference.amortized import (amortized_posterior, check_scope, default_device, evaluate_amortized,
                                               fit_amortized)

    check_scope(model, data)
    rng = np.random.default_rng(seed)
    n = data.n_traces
    em_rows = np.sort(rng.choice(n, size=min(n, em_traces), replace=False))
    params, em_extra, _ = _fit_em(model, data.take(em_rows), progress, max_iter=max_iter, tol=tol)
    order = rng.permutation(n)
    n_held = min(EVALUATION_TRACES, n // 10)
    held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
    device = default_device() if device is None else device
    with _bar(steps, f"amortized ({model}, {estimator}, {device})", "step", progress, "loss") as tick:
        result = fit_amortized(model, data.take(train), params, estimator=estimator, steps=steps, batch=batch, lr=lr,
                               seed=seed, device=device, progress=tick)
    evaluation = evaluate_amortized(result, data.take(held), params) if n_held else {}
    extra = {"em": {"traces": int(em_rows.size), **{k: em_extra[k] for k in ("iterations", "e_steps", "converged")}},
             "estimator": estimator, "steps": steps, "batch": result.batch, "lr": lr, "seed": seed, "device": device,
             "train_traces": int(train.size), "losses": [float(x) for x in result.losses],
             "evaluation": {"held_out_traces": int(n_held), **evaluation}}
    return params, extra, {"posterior": amortized_posterior(result, data), "amortized": result}


def _fit_nuts(model, data, progress, *, warmup, samples, chains, seed, **_):
    from latentsel.inference.collapsed import params_from_sites
    from latentsel.inference.mcmc import fit_nuts, summary

    result = fit_nuts(model, data, num_warmup=warmup, num_samples=samples, num_chains=chains, seed=seed,
                      progress_bar=progress)
    stds = params_from_sites(model, {name: v.std(axis=(0, 1)) for name, v in result.samples.items()})
    extra = {"warmup": warmup, "seed": seed, "chain_method": result.chain_method, "potential": result.potential,
             "nuts": summary(result), "posterior_std": params_to_json(stds), "samples_file": "samples.npz"}
    return result.params, extra, {"mcmc": result}


def write_fit(out: str | Path, traces: Sequence[Trace], fit: dict, world: World) -> None:
    """Write ``out/fit.json``, ``out/posterior.jsonl`` and, for nuts, ``out/samples.npz`` (each
    atomically). ``samples.npz``: every global site as ``[chains, draws, ...]`` plus the
    sampler's ``diverging``, ``accept_prob``, ``num_steps``, ``potential_energy`` ``[chains, draws]``
    and ``step_size`` ``[chains]``."""
    out = Path(out)
    post = fit["posterior"]
    with atomic_open(out / "posterior.jsonl") as f:
        for i, tr in enumerate(traces):
            steps = []
            for t in range(tr.depth):
                steps.append({
                    "map_route": world.routes[int(post.map_route[i, t])].name,
                    "map_skill": world.skills[int(post.map_skill[i, t])].name,
                    "p_off": float(post.p_off[i, t]),
                    "route_probs": [float(p) for p in post.route_probs[i, t]],
                    "skill_probs": [float(p) for p in post.skill_probs[i, t]],
                })
            f.write(json.dumps({"id": tr.id, "steps": steps}) + "\n")
    if "mcmc" in fit:
        mcmc = fit["mcmc"]
        with atomic_open(out / "samples.npz", "wb") as f:
            np.savez(f, **mcmc.samples, diverging=mcmc.diverging, accept_prob=mcmc.accept_prob,
                     num_steps=mcmc.num_steps, potential_energy=mcmc.potential_energy, step_size=mcmc.step_size)
    with atomic_open(out / "fit.json") as f:
        json.dump(fit["record"], f, indent=1)
