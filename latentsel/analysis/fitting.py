"""Fitting a corpus: :func:`fit` (traces or a trace file, a method's name and its options) and
:func:`fit_traces` (an options NamedTuple), both returning a :class:`~latentsel.analysis.results.Fit`.

Methods: ``em`` (the MAP in softmax coordinates), ``svi`` (AutoDelta: the same point by
stochastic optimization; AutoNormal: a variational posterior, its mean as the estimate) and
``nuts`` (posterior draws; the estimate is the posterior mean) on the NumPyro backend; ``svi``
and ``amortized`` on the Pyro backend. A fit's posterior is the exact posterior of every step at
the point estimate, except for ``amortized``: θ by EM on a random subset of traces, then an
inference network trained on the rest of the corpus gives every step's posterior (its accuracy
against the exact posterior, measured on held-out traces, is in the summary as ``evaluation``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from latentsel.analysis.options import (
    AmortizedOptions,
    EMOptions,
    FitOptions,
    NUTSOptions,
    SVIOptions,
    did_you_mean,
    fit_options,
)
from latentsel.analysis.posterior import posterior_from_data
from latentsel.analysis.results import Fit, StepPosterior, params_to_json
from latentsel.inference.conjugate import ConjugatePosterior, conjugate_posterior, prior_concentrations
from latentsel.inference.em import fit_em
from latentsel.models.data import HLSMData
from latentsel.models.registry import model_spec
from latentsel.traces import Trace, read_traces
from latentsel.traces.emission import build_data
from latentsel.traces.failures import read_prefixes
from latentsel.world import World, default_world

__all__ = ["fit", "fit_traces", "fit_corpus"]



def fit(traces: Sequence[Trace] | str | os.PathLike, model: str = "modular", method: str = "em", *,
        world: World | None = None, progress: bool = True, **options) -> Fit:
    """Fit the HLSM to ``traces`` (a list of :class:`~latentsel.traces.Trace` or a trace file):
    ``model`` one of :data:`~latentsel.models.registry.MODELS`, ``method`` one of
    :data:`~latentsel.analysis.options.METHODS` (``em``, ``svi``, ``nuts``, ``amortized``),
    ``options`` the method's (e.g. ``max_iter=200`` for em, ``chains=4`` for nuts). ``world``:
    the world the traces live in (default: the default world).

    Returns a :class:`~latentsel.analysis.results.Fit`: ``fit.params`` (the model's parameter
    NamedTuple), ``fit.posterior`` (every step's, labelled), ``fit.execution_table()``,
    ``fit.to_inference_data(traces)``, ``fit.save(dir)``.
    """
    cls = type(fit_options(method))
    unknown = sorted(set(options) - set(cls._fields))
    if unknown:
        raise TypeError(f"method {method} takes no option {unknown[0]!r}{did_you_mean(unknown[0], cls._fields)}; "
                        f"its options: {', '.join(cls._fields)}")
    world = default_world() if world is None else world
    if isinstance(traces, (str, os.PathLike)):
        traces = read_traces(traces, world=world)
    return fit_traces(traces, world, model, cls(**options), progress=progress)


def fit_traces(traces: Sequence[Trace], world: World, model: str = "modular", options: str | FitOptions = "em", *,
               data: HLSMData | None = None, progress: bool = True) -> Fit:
    """Fit a corpus by the method of ``options`` (a method name for its defaults, or an
    options NamedTuple such as ``NUTSOptions(chains=4)``). ``data``: the corpus's
    :func:`~latentsel.traces.emission.build_data`, when the caller has it already (of the same
    traces as fitted: a malformed completion, its ``malformed`` field set, is fitted on its read
    prefix only and left out when not even its first step was read; see
    :func:`latentsel.traces.failures.read_prefixes`)."""
    options = fit_options(options)
    model_spec(model)
    # a malformed completion's unread steps are failures, not hidden steps: fit its read prefix
    traces, _, left_out = read_prefixes(traces)
    if not traces and left_out:
        raise ValueError(f"traces: no step of any trace was read ({left_out} malformed completions); nothing to fit")
    empty = [tr.id for tr in traces if tr.depth == 0]
    if empty:  # a trace file cannot hold one; a Trace built in Python can
        raise ValueError(f"traces: {len(empty)} have no steps (the first: {empty[0]!r}); there is nothing to fit in them")
    data = build_data(traces, world, model=model) if data is None else data
    fitter = {"em": _fit_em, "svi": _fit_svi, "nuts": _fit_nuts, "amortized": _fit_amortized}[options.method]
    params, summary, result, posterior = fitter(model, data, options, progress)
    exact = posterior_from_data(data, params, model, joint=False)
    draws = None
    if options.method == "nuts":
        # numpyro is imported by the NUTS and SVI fits alone: half a second of every other command
        from latentsel.inference.collapsed import params_from_sites
        draws = params_from_sites(model, result.samples)
    conjugate = None if draws is not None else conjugate_posterior(model, params, data)
    steps = StepPosterior.of(exact if posterior is None else posterior, exact.log_evidence, [tr.id for tr in traces],
                             [tr.depth for tr in traces], world)
    return Fit(model, options, params, steps, float(exact.log_evidence.sum()), len(traces), summary, world, draws,
               conjugate, result)


def fit_corpus(corpus, world: World, model: str = "modular", options: str | EMOptions | SVIOptions = "em", *,
               batch: int = 256, progress: bool = True) -> Fit:
    """EM on a corpus that sums its own E-step: a
    :class:`~latentsel.analysis.streaming.StreamedCorpus` (trace files read in bounded chunks)
    or a :class:`~latentsel.analysis.sharded.ShardedCorpus` (on a Dask or Ray cluster). A
    streamed corpus can also be fitted by SVI on minibatches of ``batch`` traces
    (:func:`~latentsel.inference.svi.fit_svi_batches`, NumPyro backend).

    The :class:`~latentsel.analysis.results.Fit` has θ̂, the exact log evidence at θ̂ and the
    conjugate posterior q(θ) from the E-step at θ̂, but no per-step posterior
    (``fit.posterior`` is ``None``): for millions of traces that is a file the size of the corpus.
    Score any traces of interest with ``latentsel.fit(traces, ...)`` or
    :func:`~latentsel.analysis.posterior.posterior_from_data` at ``fit.params``."""
    options = fit_options(options)
    model_spec(model)
    if options.method == "svi":
        params, summary, result = _fit_svi_minibatches(model, corpus, options, batch, progress)
        stats = corpus.counts(model, params)  # one E-step at θ̂: its evidence and q(θ)
        log_evidence = float(stats.log_evidence)
    elif options.method == "em":
        params, summary, result, _ = _fit_em(model, corpus, options, progress)
        stats = result.stats  # the E-step at the fitted θ
        log_evidence = float(result.log_evidence)
    else:
        raise ValueError(f"a streamed or sharded corpus is fitted by em (or svi when streamed), not {options.method}")
    prior = prior_concentrations(model, corpus.n_routes, corpus.n_skills)
    conjugate = ConjugatePosterior(model, prior.route + np.asarray(stats.route_counts, float),
                                   prior.skill + np.asarray(stats.skill_counts, float),
                                   prior.noise + np.asarray(stats.noise_counts, float),
                                   prior.off_module + np.asarray(stats.off_counts, float), prior)
    summary = {**summary, "corpus": _corpus_summary(corpus)}
    return Fit(model, options, params, None, log_evidence, int(corpus.n_traces), summary, world,
               None, conjugate, result)


def _fit_svi_minibatches(model, corpus, options: SVIOptions, batch: int, progress):
    if not hasattr(corpus, "minibatches"):
        raise ValueError("a sharded corpus is fitted by em; SVI on minibatches reads a streamed corpus")
    if options.backend != "numpyro":
        raise ValueError(f"SVI on minibatches runs on the numpyro backend, not {options.backend}")
    corpus.check_model(model)  # before the steps, not after them
    # NumPyro's SVI machinery loads only for an SVI fit
    from latentsel.inference.svi import fit_svi_batches

    desc = f"SVI ({model}, {options.guide}, minibatches of {batch})"
    with _bar(options.steps, desc, "step", progress, "loss") as tick:
        result = fit_svi_batches(model, corpus.minibatches(batch, options.seed), corpus.n_traces, corpus.n_routes,
                                 corpus.n_skills, corpus.n_chars, corpus.max_len, guide=options.guide,
                                 steps=options.steps, lr=options.lr, seed=options.seed, progress=tick)
    return result.params, {**_svi_summary(options, result), "batch": batch}, result


def _corpus_summary(corpus) -> dict:
    out = {"files": [str(p) for p in corpus.paths], "traces": int(corpus.n_traces)}
    shards = getattr(corpus, "shards", None)
    if shards is not None:
        out.update(kind="sharded", backend=corpus.backend,
                   shards=[{k: v for k, v in s.items() if k != "skipped"} | {"skipped": len(s["skipped"])}
                           for s in shards])
    else:
        out.update(kind="streamed", steps=int(corpus.n_steps), parts=int(corpus.n_parts),
                   max_depth=int(corpus.max_depth_seen))
    return out


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
        bar.total = bar.n  # a run that stopped early (EM converged) ends at what it ran
        bar.close()


def _fit_em(model, data, options: EMOptions, progress):
    with _bar(options.max_iter, f"EM ({model}, at most {options.max_iter} iterations)", "it", progress,
              "objective") as tick:
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
    return result.params, _svi_summary(options, result), result, None


def _svi_summary(options: SVIOptions, result) -> dict:
    summary = {"guide": options.guide, "steps": options.steps, "lr": options.lr, "seed": options.seed,
               "losses": [float(x) for x in result.losses]}
    if result.std is not None:
        summary["posterior_std"] = params_to_json(result.std)
        summary["posterior_median"] = params_to_json(result.median)
        # the guide's own scales, in NumPyro's unconstrained coordinates
        # NumPyro names the scales {site}_auto_scale, Pyro AutoNormal.scales.{site}
        summary["guide_scale"] = {k.removesuffix("_auto_scale").removeprefix("AutoNormal.scales."): np.asarray(v).tolist()
                                  for k, v in result.guide_params.items()
                                  if k.endswith("_auto_scale") or k.startswith("AutoNormal.scales.")}
    return summary


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
    n_held = options.held_out(n)
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
    # numpyro is imported by the NUTS and SVI fits alone: half a second of every other command
    from latentsel.inference.collapsed import params_from_sites
    from latentsel.inference.mcmc import fit_nuts
    from latentsel.inference.mcmc import summary as summary_of
    result = fit_nuts(model, data, num_warmup=options.warmup, num_samples=options.samples, num_chains=options.chains,
                      seed=options.seed, progress_bar=progress)
    stds = params_from_sites(model, {name: v.std(axis=(0, 1)) for name, v in result.samples.items()})
    summary = {"warmup": options.warmup, "seed": options.seed, "chain_method": result.chain_method,
               "potential": result.potential, "nuts": summary_of(result), "posterior_std": params_to_json(stds),
               "samples_file": "samples.npz"}
    return result.params, summary, result, None
