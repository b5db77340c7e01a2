"""Identifiability experiments (DESIGN §6): simulate from known parameters, fit, measure.

Each *task* is one (regime, N, seed): draw prompts of the regime, simulate N traces from known
modular parameters θ*, fit every model by EM, and measure the recovery of the executed
selections and of the parameters. The regimes:

* ``sft``: programs from the SFT support (depth 3, seen skill bigrams only, every routing and
  skill), one near-faithful trace per prompt (fidelity 0.95);
* ``rl``: programs beyond that support (depth 3, RL bigrams), 4 traces per prompt with
  execution errors (fidelity 0.8);
* ``atomic``: depth 1, 4 traces per prompt (fidelity 0.8);
* ``compressed``: ``sft`` with step 2 hidden, so step 3 covers two modules.

θ*: every execution row puts ``fidelity`` on the intended entry, most of the rest on two
confusable modules (a seeded draw per seed) and a floor of 0.02 on all others;
noise 0.02, off_module 0.03. The entangled model's truth is θ* in every context.

The posterior of the parameters is the conjugate q(θ) = Dirichlet(prior + E[counts]) at the EM
estimate (:mod:`latentsel.inference.conjugate`); where N is small (and no step is hidden),
NUTS on the modular model checks it. Measures per (regime, model, N, seed):

* ``map_accuracy``: steps whose MAP (routing, skill) is the executed one;
* ``class_accuracy``: steps whose MAP selection is right up to what the data can tell apart.
  At an observed step outside the hidden-step blocks: the MAP module lies in the executed
  module's class of the distinguishability graph (:mod:`latentsel.analysis.equivalence`). At the steps of a
  block: the MAP path of modules through the block gives every observed step of it the same emission
  as the executed path (a compressed step is identified only up to such paths);
  ``step_class_accuracy``: observed steps outside blocks whose MAP module gives the step the
  same emission as the executed one; ``block_class_accuracy``: the block steps alone;
* ``hidden_map_accuracy``: MAP accuracy on the hidden steps;
* ``truth_mass``: the mean posterior probability p(r_t = r*, k_t = k* | D, θ̂);
* ``param_error``: the mean total-variation distance between E_q[row] and the true row over
  the execution rows the data reach (a row is reached when its intended module — and, for
  entangled, its context — occurs in the data);
* ``kl_reached`` / ``kl_unreached``: mean KL(q(row) ‖ prior(row)) over reached / unreached rows
  (``None`` where there are none).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from latentsel.analysis.equivalence import block_equivalent, block_steps, module_classes, step_equivalent
from latentsel.analysis.posterior import posterior_from_data
from latentsel.experiments.designs import IDENTIFY_MODELS, NUTS_CHECK_MODELS, identify_regime
from latentsel.inference.conjugate import conjugate_posterior
from latentsel.inference.em import fit_em
from latentsel.inference.mcmc import fit_nuts, summary
from latentsel.models.data import previous_intended
from latentsel.models.params import ModularParams
from latentsel.models.registry import model_spec
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from latentsel.traces.regimes import PROMPT_REGIMES, bigram_split, generate
from latentsel.traces.simulate import simulate
from latentsel.world import World, default_world

__all__ = ["truth_params", "regime_traces", "run_task", "measure"]


def truth_params(world: World, seed: int, fidelity: float, *, noise: float = 0.02, off_module: float = 0.03,
                 floor: float = 0.02) -> ModularParams:
    """The known modular parameters θ* of a seed: rows ``[R, R]`` and ``[K, K]`` (the
    confusable modules depend on the seed only, not on the fidelity)."""
    if not 0 < fidelity < 1 - floor:
        raise ValueError(f"fidelity must lie in (0, {1 - floor}), got {fidelity}")
    rng = np.random.default_rng([seed, 0x1D])

    def rows(n):
        m = np.full((n, n), floor / (n - 1))
        for c in range(n):
            others = rng.choice(np.delete(np.arange(n), c), size=2, replace=False)
            m[c, others] += (1 - fidelity - floor) * np.array([0.7, 0.3])
            m[c, c] = fidelity
        return m

    return ModularParams(rows(world.n_routes), rows(world.n_skills), noise, off_module)


def regime_traces(name: str, n_traces: int, seed: int, world: World, truth: ModularParams | None = None
                  ) -> tuple[list[Trace], ModularParams]:
    """``n_traces`` traces of a regime simulated from θ* (``truth``, default
    :func:`truth_params` at the regime's fidelity), and θ*."""
    spec = identify_regime(name)
    truth = truth_params(world, seed, spec.fidelity) if truth is None else truth
    n_prompts = -(-n_traces // spec.traces_per_prompt)
    # identify's SFT-like traces are depth 3 (the policy regime also draws depth 2)
    depths = (PROMPT_REGIMES[spec.source].depth,)
    prompts = generate(spec.source, n_prompts, seed, world=world, split=bigram_split(world.n_skills), depths=depths)
    repeated = [Trace(f"{name}-{i // spec.traces_per_prompt:06d}-{i % spec.traces_per_prompt}", p.input, p.program,
                      p.steps)
                for i, p in enumerate(q for q in prompts for _ in range(spec.traces_per_prompt))][:n_traces]
    traces = simulate(repeated, truth, "modular", world, seed=seed, hide=spec.hide,
                      source={"regime": name, "fidelity": spec.fidelity})
    return traces, truth


def _truth_arrays(traces: Sequence[Trace], world: World, t_max: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.zeros((len(traces), t_max), np.int64)
    k = np.zeros((len(traces), t_max), np.int64)
    for i, tr in enumerate(traces):
        if tr.truth is None:
            raise ValueError(f"trace {tr.id!r} has no truth; identifiability needs simulated traces")
        r[i, : tr.depth] = [world.route_index(x) for x in tr.truth.routes]
        k[i, : tr.depth] = [world.skill_index(x) for x in tr.truth.skills]
    return r, k


def reached_rows(model: str, data) -> tuple[np.ndarray, np.ndarray]:
    """bool masks over the routing and skill rows (``[R]``/``[K]``, or ``[R + 1, R]``/``[K + 1, K]``
    for entangled) that some step of ``data`` draws from."""
    mask = data.step_mask
    cr, ck = data.route_intended[mask], data.skill_intended[mask]
    if not model_spec(model).context:
        rr, rk = np.zeros(data.n_routes, bool), np.zeros(data.n_skills, bool)
        rr[cr], rk[ck] = True, True
        return rr, rk
    prev_r, prev_k = (np.asarray(a)[mask] for a in previous_intended(data))
    rr = np.zeros((data.n_routes + 1, data.n_routes), bool)
    rk = np.zeros((data.n_skills + 1, data.n_skills), bool)
    rr[prev_r, cr], rk[prev_k, ck] = True, True
    return rr, rk


def _mean_or_none(x: np.ndarray):
    return float(np.mean(x)) if x.size else None


def measure(model: str, data, post, q, truth: ModularParams, true_r: np.ndarray, true_k: np.ndarray,
            hidden: np.ndarray) -> dict:
    """The measures of one fit (see the module docstring). ``post``: the exact posterior at the
    estimate; ``q``: the conjugate posterior; ``true_r``/``true_k``: int[N, T] executed selections;
    ``hidden``: bool[N, T], the unobserved steps."""
    steps = data.step_mask
    map_r, map_k = np.maximum(np.asarray(post.map_route), 0), np.maximum(np.asarray(post.map_skill), 0)
    hit = (map_r == true_r) & (map_k == true_k)
    classes = module_classes(data)
    label = classes.label.reshape(data.n_routes, data.n_skills)
    observed = data.free & data.emit & steps
    in_block = block_steps(data) & steps
    right_block = block_equivalent(data, map_r, map_k, true_r, true_k)
    right_class = np.where(in_block, right_block, label[map_r, map_k] == label[true_r, true_k])
    equivalent = step_equivalent(data, map_r, map_k, true_r, true_k)
    n, t = np.indices(steps.shape)
    mass = np.asarray(post.joint_probs)[n, t, true_r, true_k]
    hidden = hidden & steps
    rr, rk = reached_rows(model, data)
    mean = q.mean()
    if not model_spec(model).context:
        true_rows = (truth.route_exec, truth.skill_exec)
    else:
        true_rows = tuple(np.broadcast_to(a, (a.shape[0] + 1, *a.shape)) for a in (truth.route_exec, truth.skill_exec))
    tv = [0.5 * np.abs(np.asarray(m) - tr).sum(-1) for m, tr in zip(mean[:2], true_rows)]
    kl_r, kl_k = q.kl_rows()
    reached = np.concatenate([rr.ravel(), rk.ravel()])
    kl = np.concatenate([kl_r.ravel(), kl_k.ravel()])
    return {
        "map_accuracy": float(hit[steps].mean()),
        "route_accuracy": float((map_r == true_r)[steps].mean()),
        "skill_accuracy": float((map_k == true_k)[steps].mean()),
        "class_accuracy": float(right_class[steps].mean()),
        "step_class_accuracy": _mean_or_none(equivalent[observed]),
        "block_class_accuracy": _mean_or_none(right_block[in_block]),
        "hidden_map_accuracy": _mean_or_none(hit[hidden]),
        "truth_mass": float(mass[steps].mean()),
        "param_error": _mean_or_none(np.concatenate([tv[0][rr], tv[1][rk]])),
        "noise_error": abs(float(mean.noise) - truth.noise),
        "off_error": abs(float(mean.off_module) - truth.off_module),
        "kl_reached": _mean_or_none(kl[reached]),
        "kl_unreached": _mean_or_none(kl[~reached]),
        "rows_reached": int(reached.sum()),
        "rows_unreached": int((~reached).sum()),
        "n_classes": classes.n_classes,
        "largest_class": int(classes.sizes.max()),
    }


def _nuts_check(data, q, rows, *, draws: int, seed: int) -> dict:
    """NUTS on the modular model against the conjugate q: the largest difference of posterior
    means and the median ratio of posterior sds over the reached rows' entries."""
    
    res = fit_nuts("modular", data, num_warmup=draws, num_samples=draws, num_chains=2, seed=seed)
    rr, rk = rows
    draws_r, draws_k = (res.samples[name] for name in model_spec("modular").sites[:2])
    mean_q, sd_q = q.mean(), q.sd()
    diff = np.concatenate([np.abs(draws_r.mean((0, 1)) - mean_q.route_exec)[rr].ravel(),
                           np.abs(draws_k.mean((0, 1)) - mean_q.skill_exec)[rk].ravel()])
    ratio = np.concatenate([(sd_q.route_exec / draws_r.std((0, 1)))[rr].ravel(),
                            (sd_q.skill_exec / draws_k.std((0, 1)))[rk].ravel()])
    sites = summary(res)["sites"].values()
    return {"nuts_max_abs_diff": float(diff.max()), "nuts_sd_ratio": float(np.median(ratio)),
            "nuts_r_hat": max(s["r_hat_max"] for s in sites), "nuts_divergences": int(res.diverging.sum())}


def run_task(regime_name: str, n_traces: int, seed: int, *, models: Sequence[str] = IDENTIFY_MODELS, nuts_max: int = 0,
             nuts_draws: int = 150, world: World | None = None) -> list[dict]:
    """One (regime, N, seed) task: a record per model (the identify.json schema plus extra
    measures, the NUTS cross-check where it ran and the timings)."""
    world = world or default_world()
    traces, truth = regime_traces(regime_name, n_traces, seed, world)
    # the modular and entangled models read the same emission statistics: build them once
    data = build_data(traces, world)
    true_r, true_k = _truth_arrays(traces, world, data.step_mask.shape[1])
    hidden = np.zeros(data.step_mask.shape, bool)
    for i, tr in enumerate(traces):
        hidden[i, : tr.depth] = [y is None for y in tr.steps]
    records = []
    for model in models:
        t0 = time.perf_counter()
        em = fit_em(model, data, max_iter=300)
        post = posterior_from_data(data, em.params, model)
        q = conjugate_posterior(model, em.params, data)
        record = {"regime": regime_name, "model": model, "n_traces": n_traces, "seed": seed,
                  **measure(model, data, post, q, truth, true_r, true_k, hidden),
                  "em_iterations": len(em.objective) - 1, "fit_seconds": time.perf_counter() - t0,
                  "nuts_max_abs_diff": None, "nuts_sd_ratio": None, "nuts_r_hat": None, "nuts_divergences": None}
        # NUTS through the hidden-step blocks costs about 1.5 s a draw at N = 100, so the
        # cross-check runs on the fully observed regimes only
        if model in NUTS_CHECK_MODELS and n_traces <= nuts_max and not identify_regime(regime_name).hide:
            record.update(_nuts_check(data, q, reached_rows(model, data), draws=nuts_draws, seed=seed))
        records.append(record)
    return records
