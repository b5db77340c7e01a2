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
from typing import NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from latentsel._io import atomic_open
from latentsel.analysis.options import AmortizedOptions, EMOptions, FitOptions, NUTSOptions, SVIOptions, fit_options
from latentsel.analysis.posterior import posterior_from_data
from latentsel.inference.collapsed import params_from_sites
from latentsel.inference.em import fit_em
from latentsel.inference.exact import ExactPosterior
from latentsel.inference.mcmc import fit_nuts
from latentsel.inference.mcmc import summary as summary_of
from latentsel.models.data import HLSMData
from latentsel.models.registry import params_class, validate_params
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from latentsel.world import World

__all__ = ["Fit", "fit_traces", "write_fit", "read_params", "params_to_json"]

# the held-out traces of an amortized fit: a tenth of the corpus, at most this many
EVALUATION_TRACES = 2000


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


class Fit(NamedTuple):
    """A corpus fitted by one method.

    Attributes:
        model: the model's name.
        options: the method's options (:mod:`latentsel.analysis.options`); ``options.method``
            and ``options.backend`` name the method and the backend.
        params: the estimate θ̂ (the posterior mean for nuts, the guide's for svi with a normal guide).
        posterior: every step's posterior, an :class:`~latentsel.inference.exact.ExactPosterior`
            ``[n_traces, max_depth, ...]``: exact at θ̂, or the network's for ``amortized``.
        log_evidence: Σ_n log p(D_n | θ̂), exact.
        n_traces: the number of traces fitted.
        summary: what the method reports, JSON-ready (iterations, losses, NUTS diagnostics, ...).
        result: the method's own result (:class:`~latentsel.inference.em.EMResult`, an SVI,
            MCMC or amortized result), for the draws, the guide or the network.
    """

    model: str
    options: FitOptions
    params: tuple
    posterior: ExactPosterior
    log_evidence: float
    n_traces: int
    summary: dict
    result: object

    @property
    def method(self) -> str:
        return self.options.method

    def record(self) -> dict:
        """The ``fit.json`` object (DESIGN §8)."""
        return {"model": self.model, "method": self.method, "backend": self.options.backend,
                "params": params_to_json(self.params), "log_evidence": self.log_evidence, "n_traces": self.n_traces,
                **self.summary}


def fit_traces(traces: Sequence[Trace], world: World, model: str = "modular", options: str | FitOptions = "em", *,
               data: HLSMData | None = None, progress: bool = True) -> Fit:
    """Fit a corpus by the method of ``options`` (a method name for its defaults, or an
    options NamedTuple such as ``NUTSOptions(chains=4)``). ``data``: the corpus's
    :func:`~latentsel.traces.emission.build_data`, when the caller has it already."""
    options = fit_options(options)
    params_class(model)
    data = build_data(traces, world, model=model) if data is None else data
    fitter = {"em": _fit_em, "svi": _fit_svi, "nuts": _fit_nuts, "amortized": _fit_amortized}[options.method]
    params, summary, result, posterior = fitter(model, data, options, progress)
    exact = posterior_from_data(data, params, model, joint=False)
    return Fit(model, options, params, exact if posterior is None else posterior, float(exact.log_evidence.sum()),
               len(traces), summary, result)


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


def _fit_em(model, data, options: EMOptions, progress):
    with _bar(options.max_iter, f"EM ({model})", "it", progress, "objective") as tick:
        result = fit_em(model, data, max_iter=options.max_iter, tol=options.tol, progress=tick)
    summary = {"iterations": len(result.objective) - 1, "e_steps": result.e_steps,
               "converged": bool(result.converged), "objective": [float(j) for j in result.objective]}
    return result.params, summary, result, None


def _fit_svi(model, data, options: SVIOptions, progress):
    if options.backend == "pyro":
        # torch and Pyro load only when a fit runs on them
        from latentsel.inference.pyro_svi import fit_pyro_svi as fit_svi
    else:
        # NumPyro's SVI machinery loads only for an SVI fit
        from latentsel.inference.svi import fit_svi

    guide, steps, lr, seed = options.guide, options.steps, options.lr, options.seed
    with _bar(steps, f"SVI ({model}, {guide}, {options.backend})", "step", progress, "loss") as tick:
        result = fit_svi(model, data, guide=guide, steps=steps, lr=lr, seed=seed, progress=tick)
    summary = {"guide": guide, "steps": steps, "lr": lr, "seed": seed, "losses": [float(x) for x in result.losses]}
    if result.std is not None:
        summary["posterior_std"] = params_to_json(result.std)
        summary["posterior_median"] = params_to_json(result.median)
        # the guide's own scales, in NumPyro's unconstrained coordinates
        # NumPyro names the scales {site}_auto_scale, Pyro AutoNormal.scales.{site}
        summary["guide_scale"] = {k.removesuffix("_auto_scale").removeprefix("AutoNormal.scales."): np.asarray(v).tolist()
                                  for k, v in result.guide_params.items()
                                  if k.endswith("_auto_scale") or k.startswith("AutoNormal.scales.")}
    return result.params, summary, result, None


def _fit_amortized(model, data, options: AmortizedOptions, progress):
    """θ by EM on at most ``em_traces`` random traces; the network trained on every trace but
    the held-out ones, which measure it against the exact posterior at θ."""
    # torch and Pyro load only when an amortized fit runs
    from latentsel.inference.amortized import (
        amortized_posterior,
        check_scope,
        default_device,
        evaluate_amortized,
        fit_amortized,
    )

    check_scope(model, data)
    rng = np.random.default_rng(options.seed)
    n = data.n_traces
    em_rows = np.sort(rng.choice(n, size=min(n, options.em_traces), replace=False))
    params, em_summary, _, _ = _fit_em(model, data.take(em_rows), options.em, progress)
    order = rng.permutation(n)
    n_held = min(EVALUATION_TRACES, n // 10)
    held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
    device = default_device() if options.device is None else options.device
    with _bar(options.steps, f"amortized ({model}, {options.estimator}, {device})", "step", progress, "loss") as tick:
        result = fit_amortized(model, data.take(train), params, estimator=options.estimator, steps=options.steps,
                               batch=options.batch, lr=options.lr, seed=options.seed, device=device, progress=tick)
    evaluation = evaluate_amortized(result, data.take(held), params) if n_held else {}
    summary = {"em": {"traces": int(em_rows.size), **{k: em_summary[k] for k in ("iterations", "e_steps", "converged")}},
               "estimator": options.estimator, "steps": options.steps, "batch": result.batch, "lr": options.lr,
               "seed": options.seed, "device": device, "train_traces": int(train.size),
               "losses": [float(x) for x in result.losses], "evaluation": {"held_out_traces": int(n_held), **evaluation}}
    return params, summary, result, amortized_posterior(result, data)


def _fit_nuts(model, data, options: NUTSOptions, progress):
    result = fit_nuts(model, data, num_warmup=options.warmup, num_samples=options.samples, num_chains=options.chains,
                      seed=options.seed, progress_bar=progress)
    stds = params_from_sites(model, {name: v.std(axis=(0, 1)) for name, v in result.samples.items()})
    summary = {"warmup": options.warmup, "seed": options.seed, "chain_method": result.chain_method,
               "potential": result.potential, "nuts": summary_of(result), "posterior_std": params_to_json(stds),
               "samples_file": "samples.npz"}
    return result.params, summary, result, None


def write_fit(out: str | Path, traces: Sequence[Trace], fit: Fit, world: World) -> None:
    """Write ``out/fit.json``, ``out/posterior.jsonl`` and, for nuts, ``out/samples.npz`` (each
    atomically). ``samples.npz``: every global site as ``[chains, draws, ...]`` plus the
    sampler's ``diverging``, ``accept_prob``, ``num_steps``, ``potential_energy`` ``[chains, draws]``
    and ``step_size`` ``[chains]``."""
    out = Path(out)
    post = fit.posterior
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
    if fit.method == "nuts":
        mcmc = fit.result
        with atomic_open(out / "samples.npz", "wb") as f:
            np.savez(f, **mcmc.samples, diverging=mcmc.diverging, accept_prob=mcmc.accept_prob,
                     num_steps=mcmc.num_steps, potential_energy=mcmc.potential_energy, step_size=mcmc.step_size)
    with atomic_open(out / "fit.json") as f:
        json.dump(fit.record(), f, indent=1)
