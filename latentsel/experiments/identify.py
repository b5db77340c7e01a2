"""Identifiability experiments (DESIGN §6): simulate from a known truth, fit, measure.

Each *task* is one (regime, truth, N, seed) of a design (:mod:`latentsel.experiments.designs`):
draw the regime's prompts, simulate N traces from the truth, fit every model by EM, and measure
the recovery of the executed selections and of the parameters.

**Truths.** The modular truth θ* (:func:`truth_params`): every execution row puts the regime's
``fidelity`` on the intended entry, most of the rest on two confusable modules (a seeded draw
per seed) and a floor of 0.02 on all others; noise 0.02, off_module 0.03. The entangled truth of
strength s (:func:`entangled_truth`): routings execute as in θ*; a skill executes as in θ* at
the first step and after an SFT-seen skill bigram, and in every other context (the RL and the
held-out bigrams) the intended skill's row is ``(1 - s) θ*[c] + s swap(θ*[c])``, ``swap``
exchanging the intended entry with that of the skill's most confusable one. s = 0 is θ*; s = 1
executes the confusable skill with the fidelity's probability.

**Posterior.** q(θ) = Dirichlet(prior + E[counts]) at the EM estimate
(:mod:`latentsel.inference.conjugate`). Where modules alias on the steps a row draws from
(:func:`row_classes`), only the total of an aliased class of entries is identified, so recovery
and uncertainty are measured on class totals (a Dirichlet's class total is Beta(α_S, α_0 - α_S)).
Where a task asks for it (``nuts_draws``), NUTS on the modular model checks q on those class
totals, with its own R-hat and bulk ESS.

Measures per (regime, truth, model, N, seed):

* ``map_accuracy``: steps whose MAP (routing, skill) is the executed one;
* ``class_accuracy``: steps whose MAP selection is right up to what the data can tell apart
  (at an observed step outside hidden-step blocks: the MAP module lies in the executed module's
  class of the distinguishability graph; at a block's steps: the MAP path gives every observed
  step of the block the executed path's emission); ``step_class_accuracy`` and
  ``block_class_accuracy``: the two parts; ``hidden_map_accuracy``: MAP accuracy on hidden steps;
* ``compound_gap`` (± ``compound_gap_se``, over ``compound_steps``): at the hidden steps of the
  positions a regime hides, the share whose MAP selection is right up to its class but not
  exactly (claim C3); ``compound_observed_gap``: the same at those positions in its varied,
  fully observed traces;
* ``truth_mass``: the mean posterior probability p(r_t = r*, k_t = k* | D, θ̂);
* ``param_error``: mean total-variation distance between E_q[row] and the true row over the
  rows the data reach; ``class_param_error`` (± ``class_param_error_se`` over rows): the same on
  class totals; ``class_coverage``: the share of reached rows' class totals whose true value lies
  in q's central 95% interval (``coverage``: the same per entry, which aliasing breaks;
  ``fidelity_coverage``: the same for each row's intended entry's class, its fidelity;
  ``route_log_z`` and ``skill_log_z`` ± se over rows: the mean of log(z + 0.1), z the distance
  of the true fidelity from q's mean in q's sds, over the routing and the skill rows, which falls as N grows when q
  contracts on the truth and rises when it contracts elsewhere). For a
  modular fit of an entangled truth the truth's faithful rows (those of the first step) are the
  reference;
* ``kl_reached`` / ``kl_unreached``: mean KL(q(row) ‖ prior(row)) over reached / unreached rows;
  ``kl_outside_max`` over the ``rows_outside`` rows outside the regime's declared program
  support that no step draws from, and ``rows_outside_reached``, those outside it the data reach
  all the same (a wrong declaration; claim C1);
* ``heldout_loglik``: the fit's mean log p(y | θ̂) on ``test_traces`` fresh traces of the same
  regime and truth (prompts of seed + 10⁶); ``heldout_diff`` ± ``heldout_diff_se``: entangled
  minus modular, per trace (claim C2).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from scipy.stats import beta as beta_dist

from latentsel.analysis.equivalence import block_equivalent, block_steps, module_classes, step_equivalent
from latentsel.analysis.posterior import log_evidence_from_data, posterior_from_data
from latentsel.experiments.designs import IDENTIFY_MODELS, NUTS_CHECK_MODELS, Regime, Truth, identify_regime, prompts_for
from latentsel.inference.conjugate import ConjugatePosterior, conjugate_posterior
from latentsel.inference.em import fit_em
from latentsel.inference.mcmc import fit_nuts
from latentsel.models.data import previous_intended
from latentsel.models.params import EntangledParams, ModularParams
from latentsel.models.registry import model_spec
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from latentsel.traces.regimes import PROMPT_REGIMES, bigram_split, generate, regime_programs
from latentsel.traces.simulate import simulate
from latentsel.world import World, default_world

__all__ = ["truth_params", "entangled_truth", "make_truth", "regime_traces", "run_task", "measure", "row_classes",
           "support_rows", "MODULAR_TRUTH"]

MODULAR_TRUTH = Truth("modular", "modular", 0.0)
TEST_SEED_OFFSET = 1_000_000


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


def entangled_truth(world: World, seed: int, fidelity: float, strength: float, contexts: str = "beyond-sft"
                    ) -> EntangledParams:
    """The entangled truth of ``strength`` (see the module docstring): θ* at the first step and
    (with ``contexts="beyond-sft"``) after SFT-seen skill bigrams, swapped toward each skill's
    most confusable one elsewhere (with ``contexts="all"``: at every step after the first)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    base = truth_params(world, seed, fidelity)
    r_n, k_n = world.n_routes, world.n_skills
    route = np.broadcast_to(base.route_exec, (r_n + 1, r_n, r_n)).copy()
    skill = np.broadcast_to(base.skill_exec, (k_n + 1, k_n, k_n)).copy()
    seen = bigram_split(k_n).seen if contexts == "beyond-sft" else np.zeros((k_n, k_n), bool)
    off_diag = base.skill_exec - np.diag(np.diag(base.skill_exec))
    partner = off_diag.argmax(-1)
    for c in range(k_n):
        row = base.skill_exec[c]
        swapped = row.copy()
        swapped[[c, partner[c]]] = row[[partner[c], c]]
        moved = (1 - strength) * row + strength * swapped
        skill[:k_n, c][~seen[:, c]] = moved
    return EntangledParams(route, skill, base.noise, base.off_module)


def make_truth(truth: Truth, world: World, seed: int, fidelity: float):
    """The parameters of ``truth`` at ``fidelity`` and the model that simulates from them."""
    if truth.kind == "modular":
        return truth_params(world, seed, fidelity), "modular"
    return entangled_truth(world, seed, fidelity, truth.strength, truth.contexts), "entangled"


def _regime(regime: Regime | str) -> Regime:
    return identify_regime(regime) if isinstance(regime, str) else regime


def regime_traces(regime: Regime | str, n_traces: int, seed: int, world: World, truth=None, *,
                  truth_spec: Truth = MODULAR_TRUTH) -> tuple[list[Trace], object]:
    """``n_traces`` traces of a regime and the parameters they were simulated from: ``truth``
    (modular parameters, e.g. a prior draw) or else ``truth_spec`` at the regime's fidelity.
    Each prompt gives ``traces_per_prompt`` traces with the regime's hidden steps, then
    ``varied`` traces with every step observed."""
    spec = _regime(regime)
    if truth is None:
        truth, model = make_truth(truth_spec, world, seed, spec.fidelity)
    else:
        model = "modular" if isinstance(truth, ModularParams) else "entangled"
    per = spec.per_prompt
    # identify's SFT-like traces are of the source's deepest programs (sft also draws depth 2)
    depths = (PROMPT_REGIMES[spec.source].depth,)
    prompts = generate(spec.source, prompts_for(spec, n_traces), seed, world=world,
                       split=bigram_split(world.n_skills), depths=depths)
    repeated = [Trace(f"{spec.name}-{i // per:06d}-{i % per}", p.input, p.program, p.steps)
                for i, p in enumerate(q for q in prompts for _ in range(per))][:n_traces]
    first = [tr for i, tr in enumerate(repeated) if i % per < spec.traces_per_prompt]
    rest = [tr for i, tr in enumerate(repeated) if i % per >= spec.traces_per_prompt]
    source = {"regime": spec.name, "fidelity": spec.fidelity}
    sim = {tr.id: tr for tr in simulate(first, truth, model, world, seed=seed, hide=spec.hide, source=source)}
    if rest:
        sim.update((tr.id, tr) for tr in simulate(rest, truth, model, world, seed=seed + 7_777_777,
                                                  source={**source, "varied": True}))
    return [sim[tr.id] for tr in repeated], truth


def _truth_arrays(traces: Sequence[Trace], world: World, t_max: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.zeros((len(traces), t_max), np.int64)
    k = np.zeros((len(traces), t_max), np.int64)
    for i, tr in enumerate(traces):
        if tr.truth is None:
            raise ValueError(f"trace {tr.id!r} has no truth; identifiability needs simulated traces")
        r[i, : tr.depth] = [world.route_index(x) for x in tr.truth.routes]
        k[i, : tr.depth] = [world.skill_index(x) for x in tr.truth.skills]
    return r, k


def _row_index(model: str, data, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The routing and skill row (flat index into ``[R]``/``[K]``, or ``[R + 1, R]``/``[K + 1, K]``)
    each step of ``mask`` draws from."""
    cr, ck = data.route_intended[mask], data.skill_intended[mask]
    if not model_spec(model).context:
        return cr, ck
    prev_r, prev_k = (np.asarray(a)[mask] for a in previous_intended(data))
    return prev_r * data.n_routes + cr, prev_k * data.n_skills + ck


def reached_rows(model: str, data) -> tuple[np.ndarray, np.ndarray]:
    """bool masks over the routing and skill rows (``[R]``/``[K]``, or ``[R + 1, R]``/``[K + 1, K]``
    for entangled) that some step of ``data`` draws from."""
    ir, ik = _row_index(model, data, data.step_mask)
    shape_r, shape_k = _row_shapes(model, data)
    rr, rk = np.zeros(int(np.prod(shape_r)), bool), np.zeros(int(np.prod(shape_k)), bool)
    rr[ir], rk[ik] = True, True
    return rr.reshape(shape_r), rk.reshape(shape_k)


def _row_shapes(model: str, data) -> tuple[tuple, tuple]:
    if model_spec(model).context:
        return (data.n_routes + 1, data.n_routes), (data.n_skills + 1, data.n_skills)
    return (data.n_routes,), (data.n_skills,)


def support_rows(model: str, regime: Regime, world: World) -> tuple[np.ndarray, np.ndarray]:
    """bool masks (shaped as :func:`reached_rows`) of the rows the regime's declared program
    support can reach: routings are uniform at every step; skills follow the support's programs."""
    name = regime.declared_support
    depths = PROMPT_REGIMES[name].depths
    split = bigram_split(world.n_skills)
    r_n, k_n = world.n_routes, world.n_skills
    programs = [regime_programs(name, split, d) for d in depths]
    if not model_spec(model).context:
        rk = np.zeros(k_n, bool)
        for p in programs:
            rk[np.unique(p)] = True
        return np.ones(r_n, bool), rk
    rr = np.zeros((r_n + 1, r_n), bool)
    rr[r_n] = True
    if max(depths) > 1:
        rr[:r_n] = True
    rk = np.zeros((k_n + 1, k_n), bool)
    for p in programs:
        rk[k_n, p[:, 0]] = True
        for t in range(1, p.shape[1]):
            rk[p[:, t - 1], p[:, t]] = True
    return rr, rk


def row_classes(model: str, data) -> tuple[np.ndarray, np.ndarray]:
    """The aliasing classes of every row's entries: int labels shaped like the rows (``[R, R]``
    and ``[K, K]`` for modular; ``[R + 1, R, R]`` and ``[K + 1, K, K]`` for entangled), equal for
    two executed routings (skills) that give every free observed step drawing from the row the
    same emission whatever the skill (routing). Only a class's total is identified from those
    steps. Classes are numbered from each row's first entry; an unreached row has singletons."""
    steps = data.free & data.emit & data.step_mask
    match = data.match[steps]  # [S, R, K]
    ir, ik = _row_index(model, data, steps)
    shape_r, shape_k = _row_shapes(model, data)
    out = []
    for index, shape, per_column in ((ir, shape_r, match), (ik, shape_k, np.swapaxes(match, 1, 2))):
        n_cols = per_column.shape[1]
        labels = np.tile(np.arange(n_cols), (int(np.prod(shape)), 1))
        order = np.argsort(index, kind="stable")
        bounds = np.flatnonzero(np.diff(index[order])) + 1
        for group in np.split(order, bounds):
            if not group.size:
                continue
            sig = np.ascontiguousarray(np.swapaxes(per_column[group], 0, 1).reshape(n_cols, -1))
            _, first, inverse = np.unique(sig, axis=0, return_index=True, return_inverse=True)
            labels[index[group[0]]] = first[inverse.reshape(-1)]
        out.append(labels.reshape(*shape, n_cols))
    return out[0], out[1]


def _class_totals(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sum ``values[..., j]`` over each row's classes: shaped like ``values`` (``[..., *rows, n]``,
    ``labels`` ``[*rows, n]``), the class total at every class's first entry (the label
    :func:`row_classes` gives it) and 0 elsewhere."""
    onehot = (labels[..., :, None] == np.arange(labels.shape[-1])).astype(float)  # [*rows, n, n]
    return np.einsum("...j,...jc->...c", values, onehot)


def _class_quantities(labels: np.ndarray, reached: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) indices of the class totals worth reporting: in reached rows, one per class
    of a row that has more than one class (a row's total is 1 whatever the data)."""
    flat_labels = labels.reshape(-1, labels.shape[-1])
    rows, cols = [], []
    for i, (lab, hit) in enumerate(zip(flat_labels, reached.reshape(-1))):
        firsts = np.unique(lab)
        if hit and firsts.size > 1:
            rows += [i] * firsts.size
            cols += list(firsts)
    return np.asarray(rows, int), np.asarray(cols, int)


def _class_measures(q: ConjugatePosterior, truth_rows: Sequence[np.ndarray], classes: Sequence[np.ndarray],
                    reached: Sequence[np.ndarray]) -> dict:
    """Class-level error, its se over rows, and coverage of the truth by q's 95% intervals."""
    errors, cover, cover_entry, cover_fid, z_fid = [], [], [], [], []
    for conc, true, lab, hit in zip((q.route, q.skill), truth_rows, classes, reached):
        a0 = conc.sum(-1, keepdims=True)
        a_cls, t_cls = _class_totals(conc, lab), _class_totals(np.broadcast_to(true, conc.shape), lab)
        err = 0.5 * np.abs(a_cls / a0 - t_cls).sum(-1)
        several = lab.max(-1) > 0  # a row that is one class has error 0 whatever the data
        errors.append(err[hit & several])
        rows, cols = _class_quantities(lab, hit)
        a = a_cls.reshape(-1, conc.shape[-1])[rows, cols]
        b = a0.reshape(-1)[rows] - a
        t = t_cls.reshape(-1, conc.shape[-1])[rows, cols]
        lo, hi = beta_dist.ppf(0.025, a, b), beta_dist.ppf(0.975, a, b)
        cover.append((t >= lo) & (t <= hi))
        ae, be = conc[hit], a0[hit] - conc[hit]
        te = np.broadcast_to(true, conc.shape)[hit]
        cover_entry.append(((te >= beta_dist.ppf(0.025, ae, be)) & (te <= beta_dist.ppf(0.975, ae, be))).ravel())
        # the intended entry's class in every reached row: the execution fidelity
        n_cols = conc.shape[-1]
        flat_lab = lab.reshape(-1, n_cols)
        rows_hit = np.flatnonzero(hit.reshape(-1))
        col = flat_lab[rows_hit, rows_hit % n_cols]
        a = a_cls.reshape(-1, n_cols)[rows_hit, col]
        b = a0.reshape(-1)[rows_hit] - a
        t = t_cls.reshape(-1, n_cols)[rows_hit, col]
        # a row whose steps alias every entry with the intended one (steps no module explains)
        # says nothing about its fidelity: its class total is 1 whatever the data
        informative = b > 1e-9 * a0.reshape(-1)[rows_hit]
        a, b, t = a[informative], b[informative], t[informative]
        cover_fid.append((t >= beta_dist.ppf(0.025, a, b)) & (t <= beta_dist.ppf(0.975, a, b)))
        m = a / (a + b)
        z_fid.append(np.abs(m - t) / np.sqrt(m * (1 - m) / (a + b + 1)))
    err = np.concatenate(errors)
    cov, cov_e, cov_f = np.concatenate(cover), np.concatenate(cover_entry), np.concatenate(cover_fid)
    log_z = [np.log(z + 0.1) for z in z_fid]  # + 0.1 sd: a truth at the mean is no outlier
    return {"class_param_error": _mean_or_none(err),
            "class_param_error_se": float(err.std(ddof=1) / np.sqrt(err.size)) if err.size > 1 else None,
            "class_coverage": _mean_or_none(cov.astype(float)), "class_quantities": int(cov.size),
            "coverage": _mean_or_none(cov_e.astype(float)), "fidelity_coverage": _mean_or_none(cov_f.astype(float)),
            **{f"{part}_log_z": _mean_or_none(z) for part, z in zip(("route", "skill"), log_z)},
            **{f"{part}_log_z_se": float(z.std(ddof=1) / np.sqrt(z.size)) if z.size > 1 else None
               for part, z in zip(("route", "skill"), log_z)}}


def _mean_or_none(x: np.ndarray):
    return float(np.mean(x)) if x.size else None


def _truth_rows(model: str, truth) -> tuple[np.ndarray, np.ndarray]:
    """The rows a fit of ``model`` is compared with: the truth's, broadcast over contexts for an
    entangled fit of a modular truth; for a modular fit of an entangled truth, its first-step
    (faithful) rows."""
    if isinstance(truth, ModularParams):
        rows = (truth.route_exec, truth.skill_exec)
        if model_spec(model).context:
            return tuple(np.broadcast_to(a, (a.shape[0] + 1, *a.shape)) for a in rows)
        return rows
    if model_spec(model).context:
        return truth.route_exec_ctx, truth.skill_exec_ctx
    return truth.route_exec_ctx[-1], truth.skill_exec_ctx[-1]


def measure(model: str, data, post, q, truth, true_r: np.ndarray, true_k: np.ndarray, hidden: np.ndarray, *,
            compound: np.ndarray | None = None, support: tuple | None = None) -> dict:
    """The measures of one fit (see the module docstring). ``post``: the exact posterior at the
    estimate; ``q``: the conjugate posterior; ``truth``: the parameters simulated from;
    ``true_r``/``true_k``: int[N, T] executed selections; ``hidden``: bool[N, T], the unobserved
    steps; ``compound``: bool[N, T], the steps at the regime's hidden positions; ``support``: the
    masks of :func:`support_rows`."""
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
    true_rows = _truth_rows(model, truth)
    tv = [0.5 * np.abs(np.asarray(m) - tr).sum(-1) for m, tr in zip(mean[:2], true_rows)]
    kl_r, kl_k = q.kl_rows()
    reached = np.concatenate([rr.ravel(), rk.ravel()])
    kl = np.concatenate([kl_r.ravel(), kl_k.ravel()])
    out = {
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
        **_class_measures(q, true_rows, row_classes(model, data), (rr, rk)),
    }
    right = np.where(in_block, right_block, equivalent | hit)
    for name, where in (("compound", hidden), ("compound_observed", ~hidden)):
        c = (compound if compound is not None else np.zeros_like(steps)) & steps & where
        gap = (right & ~hit)[c].astype(float)
        out.update({f"{name}_gap": _mean_or_none(gap),
                    f"{name}_gap_se": float(gap.std(ddof=1) / np.sqrt(gap.size)) if gap.size > 1 else None,
                    f"{name}_steps": int(gap.size)})
    if support is not None:
        outside = ~np.concatenate([support[0].ravel(), support[1].ravel()])
        away = outside & ~reached
        out.update(rows_outside=int(away.sum()), kl_outside_max=float(kl[away].max()) if away.any() else None,
                   rows_outside_reached=int((outside & reached).sum()))
    return out


def _rank_diagnostics(samples: dict) -> dict:
    """Rank-normalized split R-hat and bulk ESS (ArviZ) of every quantity: ``{site: (r_hat,
    ess)}`` from ``[chains, draws, Q]`` arrays."""
    import arviz as az  # ArviZ loads only where NUTS runs

    out = {}
    for name, x in samples.items():
        ds = az.convert_to_dataset({"x": np.asarray(x)})
        out[name] = (np.asarray(az.rhat(ds)["x"]), np.asarray(az.ess(ds, method="bulk")["x"]))
    return out


def _nuts_check(data, q: ConjugatePosterior, classes, rows, *, draws: int, seed: int) -> dict:
    """NUTS on the modular model against the conjugate q on the class totals of the reached
    rows (:func:`_class_quantities`): the largest difference of posterior means, the range of
    the ratio of posterior sds, and NUTS's own worst rank-normalized R-hat and bulk ESS on them."""
    t0 = time.perf_counter()
    res = fit_nuts("modular", data, num_warmup=draws, num_samples=draws, num_chains=2, seed=seed)
    diffs, ratios, derived = [], [], {}
    for i, (site, conc, lab, hit) in enumerate(zip(model_spec("modular").sites[:2], (q.route, q.skill), classes, rows)):
        r_idx, c_idx = _class_quantities(lab, hit)
        if not r_idx.size:
            continue
        s = np.asarray(res.samples[site])  # [chains, draws, n, n]
        flat = _class_totals(s, lab).reshape(*s.shape[:2], -1, s.shape[-1])
        x = flat[:, :, r_idx, c_idx]  # [chains, draws, Q]
        a = _class_totals(conc, lab).reshape(-1, conc.shape[-1])[r_idx, c_idx]
        a0 = conc.sum(-1).reshape(-1)[r_idx]
        m = a / a0
        sd_q = np.sqrt(m * (1 - m) / (a0 + 1))
        diffs.append(np.abs(x.mean((0, 1)) - m))
        ratios.append(sd_q / x.std((0, 1)))
        derived[site] = x
    if not derived:  # no reached row has two classes: nothing for NUTS to check
        return dict(_NO_NUTS)
    r_hat, ess = zip(*_rank_diagnostics(derived).values())
    diff, ratio = np.concatenate(diffs), np.concatenate(ratios)
    r_hat, ess = np.concatenate([np.ravel(v) for v in r_hat]), np.concatenate([np.ravel(v) for v in ess])
    out = {"nuts_max_abs_diff": float(diff.max()), "nuts_sd_ratio": float(np.median(ratio)),
           "nuts_sd_ratio_min": float(ratio.min()), "nuts_sd_ratio_max": float(ratio.max()),
           "nuts_r_hat": float(np.nanmax(r_hat)), "nuts_ess_bulk": float(np.nanmin(ess)),
           "nuts_divergences": int(res.diverging.sum()), "nuts_quantities": int(diff.size),
           "nuts_seconds": time.perf_counter() - t0}
    out["nuts_converged"] = bool(out["nuts_r_hat"] <= 1.01 and out["nuts_ess_bulk"] >= 400
                                 and out["nuts_divergences"] == 0)
    return out


_NO_NUTS = {"nuts_max_abs_diff": None, "nuts_sd_ratio": None, "nuts_sd_ratio_min": None, "nuts_sd_ratio_max": None,
            "nuts_r_hat": None, "nuts_ess_bulk": None, "nuts_divergences": None, "nuts_quantities": None,
            "nuts_seconds": None, "nuts_converged": None}


def run_task(regime: Regime | str, n_traces: int, seed: int, *, truth: Truth = MODULAR_TRUTH,
             models: Sequence[str] = IDENTIFY_MODELS, nuts_draws: int = 0, test_traces: int = 0,
             world: World | None = None) -> list[dict]:
    """One (regime, truth, N, seed) task: a record per model (the measures of
    :func:`measure`, the held-out comparison, the NUTS check where ``nuts_draws`` > 0 and the
    regime hides no step, and the timings)."""
    world = world or default_world()
    spec = _regime(regime)
    traces, params = regime_traces(spec, n_traces, seed, world, truth_spec=truth)
    # the modular and entangled models read the same emission statistics: build them once
    data = build_data(traces, world)
    true_r, true_k = _truth_arrays(traces, world, data.step_mask.shape[1])
    hidden = np.zeros(data.step_mask.shape, bool)
    for i, tr in enumerate(traces):
        hidden[i, : tr.depth] = [y is None for y in tr.steps]
    compound = np.zeros(data.step_mask.shape, bool)
    compound[:, [h - 1 for h in spec.hide if h <= compound.shape[1]]] = True
    test = None
    if test_traces and len(set(models)) > 1:  # the held-out comparison needs both fits
        # fresh prompts and executions, the same truth
        test_set, _ = regime_traces(spec, test_traces, seed + TEST_SEED_OFFSET, world, truth=params)
        test = build_data(test_set, world)
    records, heldout = [], {}
    for model in models:
        t0 = time.perf_counter()
        em = fit_em(model, data, max_iter=300)
        post = posterior_from_data(data, em.params, model)
        q = conjugate_posterior(model, em.params, data)
        record = {"regime": spec.name, "truth": truth.name, "truth_kind": truth.kind, "strength": truth.strength,
                  "model": model, "n_traces": n_traces, "seed": seed,
                  **measure(model, data, post, q, params, true_r, true_k, hidden, compound=compound,
                            support=support_rows(model, spec, world)),
                  "em_iterations": len(em.objective) - 1, "fit_seconds": time.perf_counter() - t0, **_NO_NUTS}
        if test is not None:
            heldout[model] = log_evidence_from_data(test, em.params, model)
            record["heldout_loglik"] = float(heldout[model].mean())
        if nuts_draws and model in NUTS_CHECK_MODELS and not spec.hide:
            record.update(_nuts_check(data, q, row_classes(model, data), reached_rows(model, data), draws=nuts_draws,
                                      seed=seed))
        records.append(record)
    diff = heldout["entangled"] - heldout["modular"] if len(heldout) == 2 else None
    for record in records:
        record["test_traces"] = test_traces
        record["heldout_diff"] = None if diff is None else float(diff.mean())
        record["heldout_diff_se"] = None if diff is None else float(diff.std(ddof=1) / np.sqrt(diff.size))
    return records
