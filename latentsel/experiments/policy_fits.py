"""Fitting the traces of trained policies (DESIGN §1, §6): where every step went, which emission
the traces call for, whether execution is modular, and how the policies differ.

For every corpus ``{policy}.eval-{split}.jsonl[.gz]`` (as ``latentsel protocol`` writes them):

1. **Failures first.** Every step of a malformed completion is classified
   (:mod:`latentsel.traces.failures`); a model is fitted to the read prefix of each completion
   only, never to a failed step taken for a hidden one.
2. **Emission.** One noise for every skill against a noise per executed skill, chosen by
   5-fold held-out predictive log-likelihood per trace (the richer one only when it wins by
   ≥ 2 standard errors).
3. **Attribution** (:mod:`latentsel.analysis.attribution`) under the modular fit with the chosen
   emission: every program step split into as intended (up to the modules it cannot be told
   from), inherited, routing / skill / both errors, off-module, stopped, unreadable, after an
   unreadable step.
4. **Model comparison** by PSIS-LOO (conjugate draws), stated only where its Pareto k allow.

Per policy, the **modularity test**: both models fitted to the eval-seen traces (seen bigrams)
predict the eval-unseen traces (held-out bigrams); and the entanglement ρ of the hierarchical
model (:mod:`latentsel.analysis.entanglement`), the correlation of executions within a bigram
context beyond the module's row, with its profile-likelihood interval on both splits pooled.
Across policies, **SFT against RL**: the share of steps executed as intended, by the kind of
skill bigram the step closes (seen, RL, held out), with a Bayesian-bootstrap interval of each
difference.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

import latentsel
from latentsel import plots
from latentsel._io import atomic_open
from latentsel.analysis import diagnostics
from latentsel.analysis.attribution import CATEGORIES, FITTED, INTENDED_MODULE, LABELS, Attribution, attribute
from latentsel.analysis.fitting import fit_traces
from latentsel.analysis.entanglement import entanglement
from latentsel.analysis.stepwise import StepParams, compare_heldout, fit_steps, heldout_loglik, step_joint
from latentsel.analysis.verdicts import compare_verdict, loo_verdict, mcmc_flags, ppc_flags
from latentsel.inference.collapsed import params_from_sites
from latentsel.inference.mcmc import fit_nuts
from latentsel.models.registry import MODELS
from latentsel.plots.report import write_section
from latentsel.traces import Trace, golden_trace, read_traces
from latentsel.traces.emission import build_data
from latentsel.traces.failures import completion_status, fitted_prefix, is_malformed
from latentsel.traces.regimes import bigram_split
from latentsel.world import World

__all__ = ["find_corpora", "Corpus", "prepare_corpus", "choose_emission", "fit_policy_corpora", "modularity_test",
           "policy_differences", "find_checkpoints", "fidelity_check", "summary_lines", "nuts_diagnostics",
           "FITTED_MODELS", "SPLITS"]

# the models compared on every corpus: those that read the program (a chain does not)
FITTED_MODELS = tuple(name for name, spec in MODELS.items() if spec.uses_program)

_CORPUS = re.compile(r"^(?P<policy>.+)\.eval-(?P<split>seen|unseen|ood)\.jsonl(\.gz)?$")
SPLITS = ("seen", "unseen", "ood")
_EXACT = ("intended", "inherited")  # the intended module's exact output (on a right or a wrong input)
_CONTEXTS = ("start", "seen", "rl", "held_out")
_MIN_BOOTSTRAP = 20  # traces a Bayesian bootstrap needs before its interval carries a verdict
_CONTEXT_LABELS = {"start": "first step", "seen": "SFT-seen bigram", "rl": "RL bigram", "held_out": "held-out bigram"}


def find_corpora(folder: str | Path, policies: Sequence[str] | None = None) -> dict[tuple[str, str], Path]:
    """``{(policy, split): path}`` of the evaluation corpora in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of policy corpora")
    found = {}
    for path in sorted(folder.iterdir()):
        m = _CORPUS.match(path.name)
        if m and (policies is None or m["policy"] in policies):
            found[(m["policy"], m["split"])] = path
    if not found:
        raise ValueError(f"{folder}: no corpora named POLICY.eval-(seen|unseen|ood).jsonl[.gz]"
                         + (f" for policies {', '.join(policies)}" if policies else ""))
    missing = sorted(set(policies or ()) - {p for p, _ in found})
    if missing:
        raise ValueError(f"{folder}: no corpora of policy {missing[0]!r}")
    return found


class Corpus(NamedTuple):
    """A policy corpus read for fitting.

    ``traces``: every trace as read; ``statuses``: their completion statuses; ``fitted``: the
    index of the trace behind every row of ``data``; ``prefixes``: those traces cut to their read
    prefix; ``data``: the prefixes' statistics (``None`` when no step of the corpus was read).
    """

    policy: str
    split: str
    path: Path
    traces: list
    statuses: list
    fitted: list
    prefixes: list
    data: object

    @property
    def name(self) -> str:
        return f"{self.policy}.{self.split}"

    @property
    def n_malformed(self) -> int:
        return sum(is_malformed(tr) for tr in self.traces)


def prepare_corpus(policy: str, split: str, path: Path, world: World, max_traces: int | None = None) -> Corpus:
    """Read a corpus, classify its failures and build the statistics of its read prefixes."""
    traces = read_traces(path, world=world)
    if max_traces is not None:
        traces = traces[:max_traces]
    if not traces:
        raise ValueError(f"{path}: no traces")
    if any(tr.program is None for tr in traces):
        raise ValueError(f"{path}: traces without a program; policy corpora state the program of every prompt")
    statuses = [completion_status(tr) for tr in traces]
    fitted, prefixes = [], []
    for i, (tr, st) in enumerate(zip(traces, statuses)):
        prefix = fitted_prefix(tr, st)
        if prefix is not None:
            fitted.append(i)
            prefixes.append(prefix)
    data = build_data(prefixes, world) if prefixes else None
    return Corpus(policy, split, Path(path), traces, statuses, fitted, prefixes, data)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, n]).permutation(n)
    return [np.sort(f) for f in np.array_split(order, min(k, n))]


def choose_emission(data, *, folds: int = 5, seed: int = 0) -> dict:
    """One noise against a noise per executed skill, by ``folds``-fold held-out predictive
    log-likelihood of each trace (modular rows). The per-skill emission is chosen only when it
    predicts better by at least 2 standard errors of the paired per-trace difference."""
    n = data.n_traces
    if n < 2:
        return {"chosen": "shared", "folds": 0, "verdict": f"undecided: {n} read trace(s), held out against nothing"}
    ll = {"shared": np.zeros(n), "per_skill": np.zeros(n)}
    for test in _folds(n, folds, seed):
        train = np.setdiff1d(np.arange(n), test)
        for noise in ll:
            fit = fit_steps(data.take(train), rows="modular", noise=noise)
            ll[noise][test] = heldout_loglik(data.take(test), fit.params)
    cmp = compare_heldout(ll["per_skill"], ll["shared"])
    verdict = compare_verdict(cmp["diff_mean"], cmp["diff_se"], "per-skill noise", "one noise",
                              what="held-out log-likelihood per trace")
    chosen = "per_skill" if verdict["preferred"] == "per-skill noise" else "shared"
    return {"chosen": chosen, "folds": min(folds, n), "loglik_shared": float(ll["shared"].mean()),
            "loglik_per_skill": float(ll["per_skill"].mean()), "diff": cmp["diff_mean"], "se": cmp["diff_se"],
            "verdict": verdict.text}


def _noise_text(p: StepParams) -> str:
    """The fitted noise: its value, or the range and median of the per-skill values."""
    noise = np.asarray(p.noise)
    if np.ptp(noise) == 0:
        return f"{noise[0]:.3f}"
    return f"{noise.min():.2f}–{noise.max():.2f} (median {np.median(noise):.2f})"


class CorpusFit(NamedTuple):
    corpus: Corpus
    emission: dict
    params: StepParams
    attribution: Attribution
    loo: dict


_DONE = "corpus.json"  # written last: the corpus's task is finished, with the key of its inputs


def _task_key(c: Corpus, world: World, **options) -> str:
    """A digest of what a corpus's fits depend on: the corpus file's bytes, the traces used, the
    world and the options. A finished task is reused only under the same key."""
    h = hashlib.sha256()
    with open(c.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps({"n": len(c.traces), "world": [world.alphabet, world.route_names, world.skill_names,
                                                        world.max_len], "version": latentsel.__version__,
                         **options}, sort_keys=True).encode())
    return h.hexdigest()


def _load_task(c: Corpus, where: Path, key: str) -> CorpusFit | None:
    """The finished fits of a corpus from an earlier run with the same key, or ``None``."""
    try:
        record = json.loads((where / _DONE).read_text(encoding="utf-8"))
        if record.get("key") != key:
            return None
        with np.load(where / "corpus.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    att = Attribution(arrays["mass"], arrays["depth"], arrays["ran_on"], tuple(tr.id for tr in c.traces),
                      arrays["confusions"], arrays["route_counts"], arrays["skill_counts"])
    params = (None if record["params"] is None else
              StepParams(*(arrays[f"p_{f}"] if f"p_{f}" in arrays else record["params"][f]
                           for f in StepParams._fields)))
    if att.mass.shape[0] != len(c.traces) or np.any(att.depth != [tr.depth for tr in c.traces]):
        return None
    return CorpusFit(c, record["emission"], params, att, record["loo"])


def _save_task(cf: CorpusFit, where: Path, key: str) -> None:
    att, p = cf.attribution, cf.params
    arrays = {"mass": att.mass, "depth": att.depth, "ran_on": att.ran_on, "confusions": att.confusions,
              "route_counts": att.route_counts, "skill_counts": att.skill_counts}
    scalars = None
    if p is not None:
        arrays.update({f"p_{f}": np.asarray(getattr(p, f)) for f in ("route_exec", "skill_exec", "route_ctx",
                                                                     "skill_ctx", "noise")})
        scalars = {"lam": float(p.lam), "off": float(p.off)}
    with atomic_open(where / "corpus.npz", "wb") as f:
        np.savez_compressed(f, **arrays)
    with atomic_open(where / _DONE) as f:
        json.dump({"key": key, "emission": cf.emission, "params": scalars, "loo": cf.loo}, f, indent=1)


def _fit_corpus(c: Corpus, world: World, where: Path, *, draws: int, seed: int, folds: int,
                resume: bool = True) -> tuple[CorpusFit, bool]:
    """Emission choice, attribution and PSIS-LOO of one corpus; writes ``where/``. With
    ``resume``, a corpus whose fits an earlier run finished under the same inputs and options is
    read back instead of refitted. Returns the fits and whether they were read back."""
    key = _task_key(c, world, draws=draws, seed=seed, folds=folds)
    if resume and (done := _load_task(c, where, key)) is not None:
        return done, True
    (where / _DONE).unlink(missing_ok=True)  # this task is not finished until written again
    if c.data is None:  # nothing read: the attribution is the failures alone
        att = attribute(c.traces, world, c.statuses, [], None, None, None)
        cf = CorpusFit(c, {"chosen": None, "verdict": "no step was read"}, None, att,
                       {"verdict": {"preferred": None, "text": "no step was read"}, "compare": []})
        _save_task(cf, where, key)
        return cf, False
    emission = choose_emission(c.data, folds=folds, seed=seed)
    fit = fit_steps(c.data, rows="modular", noise=emission["chosen"])
    joint = step_joint(c.data, fit.params)
    att = attribute(c.traces, world, c.statuses, c.fitted, c.data, joint.on, joint.off)
    idatas, ids = {}, [tr.id for tr in c.prefixes]
    for model in FITTED_MODELS:
        pfit = fit_traces(c.prefixes, world, model, "em", progress=False, data=c.data)
        pfit.save(where / model)
        idatas[model] = diagnostics.from_conjugate(model, c.data, pfit.params, world, trace_ids=ids, chains=2,
                                                   draws=draws, seed=seed)
    records = diagnostics.compare_records(diagnostics.compare(idatas))
    verdict = loo_verdict(records, threshold=diagnostics.BAD_KHAT)
    loo = {"corpus": str(c.path), "traces_fitted": len(c.prefixes), "compare": records, "verdict": dict(verdict)}
    diagnostics.save(idatas["modular"], where / "idata.nc")
    with atomic_open(where / "loo.json") as f:
        json.dump(loo, f, indent=1)
    with atomic_open(where / "attribution.jsonl") as f:
        for i, tr in enumerate(c.traces):
            f.write(json.dumps({"id": tr.id, "status": list(c.statuses[i].steps), "ran_on": c.statuses[i].ran_on,
                                "mass": np.round(att.mass[i, : tr.depth], 6).tolist()}) + "\n")
    cf = CorpusFit(c, emission, fit.params, att, loo)
    _save_task(cf, where, key)
    return cf, False


def modularity_test(seen: Corpus, unseen: Corpus, world: World, noise: str = "shared", *,
                    entangle: bool = True) -> dict:
    """Fit the modular and the entangled rows to ``seen``'s read prefixes, predict ``unseen``'s
    (per-trace predictive log-likelihood, paired difference with its standard error); and the
    entanglement ρ of the hierarchical model (:mod:`latentsel.analysis.entanglement`) on both
    pooled, with its 95% profile-likelihood interval."""
    out = {"train": seen.name, "test": unseen.name, "noise": noise, "n_train": len(seen.prefixes),
           "n_test": len(unseen.prefixes)}
    fits = {rows: fit_steps(seen.data, rows=rows, noise=noise) for rows in ("modular", "entangled")}
    ll = {rows: heldout_loglik(unseen.data, f.params) for rows, f in fits.items()}
    cmp = compare_heldout(ll["modular"], ll["entangled"])
    v = compare_verdict(cmp["diff_mean"], cmp["diff_se"], "modular", "entangled",
                        what="held-out log-likelihood per trace")
    # what "modular wins" shows: the entangled fit has never seen a held-out bigram, so its rows
    # there are the prior's; modular winning rejects "nothing transfers", not entanglement
    reading = {"modular": "the modules' rows from seen bigrams transfer to held-out bigrams better than "
                          "uninformed context rows",
               "entangled": "held-out bigrams are executed unlike the modules' rows from seen bigrams: "
                            "less like them than uninformed context rows"}.get(v["preferred"], "")
    out.update(loglik_modular=float(ll["modular"].mean()), loglik_entangled=float(ll["entangled"].mean()),
               diff=cmp["diff_mean"], se=cmp["diff_se"], preferred=v["preferred"],
               verdict=v.text + (f" ({reading})" if reading else ""),
               converged=bool(all(f.converged for f in fits.values())))
    if entangle:
        pooled = build_data(seen.prefixes + unseen.prefixes, world)
        ent = entanglement(pooled, fit_steps(pooled, rows="modular", noise=noise).params)
        out.update(rho=ent["rho"], rho_lower=ent["rho_lower"], rho_upper=ent["rho_upper"],
                   rho_gain=ent["loglik_best"] - ent["loglik_modular"], rho_converged=ent["converged"])
    return out


def _contexts(c: Corpus, world: World, split_seed: int) -> np.ndarray:
    """int[N, T]: the kind of skill bigram each program step closes (index into ``_CONTEXTS``)."""
    labels = bigram_split(world.n_skills, split_seed).labels  # 0 seen, 1 RL, 2 held out
    out = np.full((len(c.traces), max(tr.depth for tr in c.traces)), -1)
    for i, tr in enumerate(c.traces):
        ks = [world.skill_index(k) for _, k in tr.program]
        out[i, 0] = 0
        for t in range(1, len(ks)):
            out[i, t] = 1 + int(labels[ks[t - 1], ks[t]])
    return out


def policy_differences(fits: dict, world: World, *, base: str, split_seed: int = 0, draws: int = 4000,
                       seed: int = 0) -> list[dict]:
    """The share of program steps executed as intended (the intended module ran, on a right or
    a wrong input), per policy and kind of skill bigram closed by the step, pooled over splits;
    and every other policy's difference from ``base`` with a 95% interval from a Bayesian
    bootstrap over traces (Dirichlet(1) weights; the attribution itself at each fit's θ̂)."""
    rng = np.random.default_rng(seed)
    cols = [CATEGORIES.index(c) for c in INTENDED_MODULE]
    per: dict = {}
    for (policy, _), cf in fits.items():
        ctx = _contexts(cf.corpus, world, split_seed)
        ok = cf.attribution.mass[..., cols].sum(-1)
        step = cf.attribution.mass.sum(-1) > 0
        for k, name in enumerate(_CONTEXTS):
            sel = (ctx == k) & step
            a, n = (ok * sel).sum(1), sel.sum(1).astype(float)
            keep = n > 0
            per.setdefault((policy, name), []).append((a[keep], n[keep]))
    draws_of = {}
    for key, parts in per.items():
        a = np.concatenate([p[0] for p in parts])
        n = np.concatenate([p[1] for p in parts])
        if not n.size:
            continue
        d = np.concatenate([(w @ a) / (w @ n) for w in (rng.dirichlet(np.ones(n.size), size=m)
                                                         for m in np.diff(np.r_[0:draws:500, draws]))])
        draws_of[key] = (float(a.sum() / n.sum()), d, int(n.sum()), int(n.size))
    rows = []
    for policy in sorted({p for p, _ in draws_of}):
        for name in _CONTEXTS:
            if (policy, name) not in draws_of:
                continue
            share, d, n, n_traces = draws_of[(policy, name)]
            row = {"policy": policy, "context": name, "steps": n, "as_intended": share,
                   "lower": float(np.quantile(d, 0.025)), "upper": float(np.quantile(d, 0.975))}
            if policy != base and (base, name) in draws_of:
                b_share, b_d, _, b_traces = draws_of[(base, name)]
                diff = d - b_d
                lo, hi = np.quantile(diff, [0.025, 0.975])
                verdict = ("no difference: the 95% interval holds 0" if lo <= 0 <= hi else
                           f"{policy} {'above' if lo > 0 else 'below'} {base}")
                if min(n_traces, b_traces) < _MIN_BOOTSTRAP:
                    verdict = f"undecided: fewer than {_MIN_BOOTSTRAP} traces with such steps"
                row.update(base=base, diff=share - b_share, diff_lower=float(lo), diff_upper=float(hi), verdict=verdict)
            rows.append(row)
    return rows


def find_checkpoints(folder: str | Path, policies: Sequence[str]) -> dict[str, Path]:
    """``{policy: checkpoint}`` for the policies with a ``POLICY.pt`` or ``POLICY.pt.gz`` in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of policy checkpoints")
    found = {}
    for policy in policies:
        for name in (f"{policy}.pt", f"{policy}.pt.gz"):
            if (folder / name).is_file():
                found[policy] = folder / name
    return found


def fidelity_check(fits: dict, checkpoints: dict[str, Path], world: World, *, split: str = "seen") -> list[dict]:
    """The HLSM's per-skill fidelity against the policy's own teacher-forced accuracy.

    For every policy with a checkpoint: its teacher-forced accuracy per intended skill on the
    golden traces of its ``split`` corpus's prompts (the exact step given golden earlier steps),
    beside the fit's share of those steps that are the intended module's exact output (on the
    policy's own earlier steps: ``exact``), the share where the intended module ran at all
    (``as_intended``, near misses included) and that skill's fitted noise. Teacher forcing and
    the policy's own history differ, so agreement is a check of the fit's reading of the traces,
    not an identity: the rows give both and the correlation of ``exact`` with the teacher-forced
    accuracy across skills.
    """
    from latentsel.policy.checkpoint import load_policy  # torch loads only when checkpoints are given
    from latentsel.policy.probe import teacher_forced  # torch, as above

    rows = []
    exact_cols = [CATEGORIES.index(c) for c in _EXACT]
    module_cols = [CATEGORIES.index(c) for c in INTENDED_MODULE]
    for policy, path in sorted(checkpoints.items()):
        cf = fits.get((policy, split))
        if cf is None or cf.params is None:
            continue
        model, tok, _ = load_policy(path, "cpu", world=world)
        golden = [golden_trace(tr.id, tr.input, tr.program, world, {}) for tr in cf.corpus.traces]
        tf = teacher_forced(model, tok, golden)["by_skill"]
        exact = cf.attribution.mass[..., exact_cols].sum(-1)
        module = cf.attribution.mass[..., module_cols].sum(-1)
        step = cf.attribution.mass.sum(-1) > 0
        skill = np.full(exact.shape, -1)
        for i, tr in enumerate(cf.corpus.traces):
            skill[i, : tr.depth] = [world.skill_index(k) for _, k in tr.program]
        for k, name in enumerate(world.skill_names):
            sel = (skill == k) & step
            if not sel.any() or name not in tf:
                continue
            rows.append({"policy": policy, "skill": name, "steps": int(sel.sum()),
                         "teacher_forced": tf[name]["acc"], "exact": float(exact[sel].mean()),
                         "as_intended": float(module[sel].mean()), "noise": float(cf.params.noise[k])})
    for policy in {r["policy"] for r in rows}:
        mine = [r for r in rows if r["policy"] == policy]
        a = np.array([r["teacher_forced"] for r in mine])
        b = np.array([r["exact"] for r in mine])
        corr = float(np.corrcoef(a, b)[0, 1]) if len(mine) > 2 and a.std() > 0 and b.std() > 0 else None
        for r in mine:
            r["correlation"] = corr
    return rows


def _examples(cf: CorpusFit, world: World, n: int = 2) -> list[list]:
    """``n`` traces of a corpus with their per-step attribution: the read trace that is most in
    error, and a malformed one if there is one."""
    att, c = cf.attribution, cf.corpus
    err = 1 - att.mass[..., [CATEGORIES.index(k) for k in INTENDED_MODULE]].sum(-1).sum(1) / np.maximum(att.depth, 1)
    picks = []
    ok = [i for i, st in enumerate(c.statuses) if st.reason is None]
    if ok:
        picks.append(max(ok, key=lambda i: (err[i], -i)))
    bad = [i for i, st in enumerate(c.statuses) if st.reason is not None]
    if bad:
        picks.append(bad[0])
    rows = []
    for i in picks[:n]:
        tr = c.traces[i]
        golden = world.run(tr.program, tr.input)
        cells = []
        for t in range(tr.depth):
            m = att.mass[i, t]
            j = int(m.argmax())
            y = "∅" if tr.steps[t] is None else tr.steps[t]
            cells.append(f"{t + 1}: {y} (golden {golden[t]}) → {LABELS[CATEGORIES[j]]} {m[j]:.2f}")
        rows.append([c.name, tr.id, tr.input, " ".join(f"{r}/{k}" for r, k in tr.program), " | ".join(cells),
                     c.statuses[i].reason or ""])
    return rows


def fit_policy_corpora(corpora: dict[tuple[str, str], Path], out: str | Path, world: World, *, draws: int = 50,
                       max_traces: int | None = None, seed: int = 0, folds: int = 5, split_seed: int = 0,
                       entangle: bool = True, checkpoints: dict[str, Path] | None = None, resume: bool = True,
                       progress: bool = True) -> dict:
    """Fit every corpus and write ``out/``: per corpus ``POLICY.SPLIT/{modular,entangled}/fit.json``,
    ``loo.json``, ``attribution.jsonl``, ``idata.nc``; ``attribution.json``, ``modularity.json``,
    ``differences.json``, figures and a report section. ``draws``: conjugate draws per chain (2
    chains) for PSIS-LOO. With ``resume``, a corpus whose fits an earlier run into ``out``
    finished (its ``corpus.json``, written last) under the same corpus bytes, world and options is
    read back, not refitted; the result is the same as an uninterrupted run's. Returns
    ``{"attribution", "by_step", "emission", "loo", "modularity", "differences", "fidelity",
    "warnings", "resumed"}``."""
    out = Path(out)
    fits: dict[tuple[str, str], CorpusFit] = {}
    warnings: list[str] = []
    resumed = 0
    for (policy, split), path in tqdm(sorted(corpora.items(), key=lambda kv: (kv[0][0], SPLITS.index(kv[0][1]))),
                                      desc="policy corpora", unit="corpus", disable=not progress):
        c = prepare_corpus(policy, split, path, world, max_traces)
        if c.n_malformed:
            share = c.n_malformed / len(c.traces)
            warnings.append(f"{c.name}: {c.n_malformed} of {len(c.traces)} completions malformed ({share:.1%}); "
                            f"their failed steps are counted as failures, not fitted"
                            + ("; NO step was read" if c.data is None else ""))
        fits[(policy, split)], again = _fit_corpus(c, world, out / c.name, draws=draws, seed=seed, folds=folds,
                                                   resume=resume)
        resumed += again
    attr_rows, step_rows, emission_rows, loo_rows = [], [], [], []
    for (policy, split), cf in fits.items():
        rates = cf.attribution.rates()
        attr_rows.append({"policy": policy, "split": split, "traces": len(cf.corpus.traces),
                          "steps": cf.attribution.n_steps, "malformed": cf.corpus.n_malformed, **rates,
                          "noise": None if cf.params is None else _noise_text(cf.params),
                          "emission": cf.emission["chosen"],
                          "off_module_rate": None if cf.params is None else float(cf.params.off)})
        for t, shares in enumerate(cf.attribution.by_step()):
            step_rows.append({"policy": policy, "split": split, "step": t + 1,
                              **{c: float(v) for c, v in zip(CATEGORIES, shares)}})
        emission_rows.append({"policy": policy, "split": split, **cf.emission})
        by = {r["model"]: r for r in cf.loo["compare"]}
        loo_rows.append({"policy": policy, "split": split, "traces_fitted": len(cf.corpus.prefixes),
                         **{f"elpd_{m}": by[m]["elpd_loo"] for m in by}, **{f"p_loo_{m}": by[m]["p_loo"] for m in by},
                         **{f"bad_k_{m}": by[m]["n_bad_k"] for m in by},
                         "elpd_diff": cf.loo["compare"][1]["elpd_diff"] if by else None,
                         "dse": cf.loo["compare"][1]["dse"] if by else None,
                         "preferred": cf.loo["verdict"]["preferred"], "verdict": cf.loo["verdict"]["text"]})
    modularity = []
    for policy in sorted({p for p, _ in fits}):
        seen, unseen = fits.get((policy, "seen")), fits.get((policy, "unseen"))
        if seen is None or unseen is None:
            continue
        if min(len(seen.corpus.prefixes), len(unseen.corpus.prefixes)) < 2:
            warnings.append(f"{policy}: no modularity test: fewer than 2 read traces in eval-seen or eval-unseen")
            continue
        res = modularity_test(seen.corpus, unseen.corpus, world, noise=seen.emission["chosen"],
                              entangle=entangle)
        modularity.append({"policy": policy, **res})
    policies = sorted({p for p, _ in fits})
    base = "sft" if "sft" in policies else policies[0]
    for (policy, split), cf in fits.items():
        if split == "seen" and np.any(_contexts(cf.corpus, world, split_seed) > 1):
            warnings.append(f"{cf.corpus.name}: its programs close bigrams the split of --split-seed {split_seed} "
                            "does not call seen; the bigram contexts below use another split than the policies'")
    differences = policy_differences(fits, world, base=base, split_seed=split_seed, seed=seed) if fits else []
    fidelity = fidelity_check(fits, checkpoints, world) if checkpoints else []
    result = {"attribution": attr_rows, "by_step": step_rows, "emission": emission_rows, "loo": loo_rows,
              "modularity": modularity, "differences": differences, "fidelity": fidelity, "warnings": warnings,
              "resumed": resumed}
    _write_outputs(out, fits, world, result)
    return result


def _write_outputs(out: Path, fits: dict, world: World, result: dict) -> None:
    with atomic_open(out / "attribution.json") as f:
        json.dump({"categories": {c: LABELS[c] for c in CATEGORIES}, "rows": result["attribution"],
                   "by_step": result["by_step"], "emission": result["emission"], "warnings": result["warnings"]},
                  f, indent=1)
    with atomic_open(out / "modularity.json") as f:
        json.dump({"modularity": result["modularity"], "loo": result["loo"]}, f, indent=1)
    with atomic_open(out / "differences.json") as f:
        json.dump({"rows": result["differences"], "fidelity": result["fidelity"]}, f, indent=1)
    figures = []

    def figure(fig, name, caption):
        plots.save_figure(fig, out / "figures" / name)
        figures.append({"file": f"figures/{name}", "caption": caption})

    figure(plots.attribution_bars(result["attribution"], LABELS), "attribution.png",
           "Where every program step went, per policy and split: the modular fit's shares (as intended up to the "
           "modules a step cannot tell apart, inherited, routing, skill or both errors, off-module), then the "
           "failures no fit sees (stopped early, unreadable steps and the steps after them). The white number is "
           "the share executed as intended.")
    figure(plots.attribution_by_step(result["by_step"], LABELS), "attribution_by_step.png",
           "The same shares by step position within the program.")
    for policy in sorted({p for p, _ in fits}):
        mine = {s: cf.attribution for (p, s), cf in fits.items() if p == policy and cf.params is not None}
        if not mine:
            continue
        figure(plots.execution_by_step({s: a.skill_counts for s, a in mine.items()}, world.skill_names,
                                       what="skill", title=f"{policy}: executed skill given the intended one"),
               f"skills_{_slug(policy)}.png",
               f"{policy}: p(executed skill | intended skill) per split and step, from the modular fit's on-module "
               "posterior (label level: skills a step cannot tell apart share its mass).")
        figure(plots.execution_by_step({s: a.route_counts for s, a in mine.items()}, world.route_names,
                                       what="routing", title=f"{policy}: executed routing given the intended one"),
               f"routes_{_slug(policy)}.png",
               f"{policy}: p(executed routing | intended routing) per split and step (label level: at step 1 "
               "prev, input, skip, longest and shortest all read the input, so their split there is the prior's).")
    if result["fidelity"]:
        figure(plots.fidelity_scatter(result["fidelity"]), "fidelity.png",
               "Per skill: the share of eval-seen steps the fit reads as the intended module's exact output, "
               "against the policy's teacher-forced accuracy on the same prompts' golden traces (dashed: equal).")
    pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
    tables = [
        {"caption": "Where every program step went, under the modular fit (% of program steps; the failures it "
                    "cannot see are in the next table). Noise: the fitted emission noise (one value, or the range of "
                    "the per-skill values)",
         "columns": ["policy", "split", "steps", *[LABELS[c] for c in FITTED], "noise"],
         "rows": [[r["policy"], r["split"], r["steps"], *[pct(r[c]) for c in FITTED], r["noise"]]
                  for r in result["attribution"]]},
        {"caption": "The failures no fit sees (% of program steps; ran on: % of traces) and the off-module rate",
         "columns": ["policy", "split", "traces", "malformed", *[LABELS[c] for c in CATEGORIES if c not in FITTED],
                     "ran on", "off-module rate"],
         "rows": [[r["policy"], r["split"], r["traces"], r["malformed"],
                   *[pct(r[c]) for c in CATEGORIES if c not in FITTED], pct(r["ran_on"]), r["off_module_rate"]]
                  for r in result["attribution"]]},
        {"caption": "Emission: one noise against a noise per executed skill, by k-fold held-out log-likelihood per "
                    "trace (modular rows); the richer emission is chosen only when it wins by 2 standard errors",
         "columns": ["policy", "split", "one noise", "per-skill noise", "difference", "se", "chosen"],
         "rows": [[r["policy"], r["split"], r.get("loglik_shared"), r.get("loglik_per_skill"), r.get("diff"),
                   r.get("se"), r["chosen"]] for r in result["emission"]]},
        {"caption": "Modularity: both models fitted to the eval-seen traces (SFT-seen bigrams) predict the eval-unseen "
                    "traces (held-out bigrams); log-likelihood per held-out trace. ρ: the entanglement of the "
                    "hierarchical model fitted to both splits (0 = modular), with its approximate 95% "
                    "profile-likelihood interval",
         "columns": ["policy", "train", "test", "modular", "entangled", "difference", "se", "verdict", "ρ",
                     "ρ interval"],
         "rows": [[r["policy"], r["n_train"], r["n_test"], r["loglik_modular"], r["loglik_entangled"], r["diff"],
                   r["se"], r["verdict"], r.get("rho"),
                   None if "rho" not in r else f"[{r['rho_lower']:.4f}, {r['rho_upper']:.4f}]"]
                  for r in result["modularity"]]},
        {"caption": f"PSIS-LOO of the two models on each corpus (conjugate draws): a preference is stated only when no "
                    f"trace of either model has Pareto k > {diagnostics.BAD_KHAT} and |Δelpd| ≥ 2·dse",
         "columns": ["policy", "split", "traces", "elpd modular", "elpd entangled", "p_loo entangled",
                     "k > 0.7 modular", "k > 0.7 entangled", "verdict"],
         "rows": [[r["policy"], r["split"], r["traces_fitted"], r.get("elpd_modular"), r.get("elpd_entangled"),
                   r.get("p_loo_entangled"), r.get("bad_k_modular"), r.get("bad_k_entangled"), r["verdict"]]
                  for r in result["loo"]]},
        {"caption": "Steps where the intended module ran (exactly, with near misses or on a wrong input), by the "
                    "skill bigram the step closes, "
                    "pooled over splits; the difference from the base policy with a 95% Bayesian-bootstrap interval "
                    "over traces",
         "columns": ["policy", "context", "steps", "as intended", "95% interval", "difference", "95% interval",
                     "verdict"],
         "rows": [[r["policy"], _CONTEXT_LABELS[r["context"]], r["steps"], r["as_intended"],
                   f"[{r['lower']:.3f}, {r['upper']:.3f}]", r.get("diff"),
                   None if "diff" not in r else f"[{r['diff_lower']:.3f}, {r['diff_upper']:.3f}]",
                   r.get("verdict", "(base)")] for r in result["differences"]]},
        {"caption": "The fit's fidelity against the policy's own teacher-forced accuracy on the golden traces of "
                    "its eval-seen prompts (where a checkpoint was given), over all steps; the correlation across "
                    "skills is of the exact share with the teacher-forced accuracy (per skill in the figure)",
         "columns": ["policy", "steps", "teacher-forced", "exact (fit)", "intended module (fit)", "correlation"],
         "rows": _fidelity_rows(result["fidelity"])},
        {"caption": "The largest intended → executed confusions (expected on-module steps, modules not equivalent "
                    "to the intended one at that step)",
         "columns": ["corpus", "intended", "executed", "expected steps", "share of the corpus's steps"],
         "rows": [[cf.corpus.name, a, b, v, v / max(cf.attribution.n_steps, 1)]
                  for cf in fits.values() for a, b, v in cf.attribution.top_confusions(world, 3)]},
        {"caption": "Example traces with their attribution (per step: the output, the golden output, the most likely "
                    "category and its posterior mass; ∅ = not read)",
         "columns": ["corpus", "id", "input", "program", "steps", "malformed"],
         "rows": [row for cf in fits.values() for row in _examples(cf, world)]},
    ]
    text = ["Evaluation traces of the trained policies. Every program step is accounted for: the fitted modular "
            "model splits the steps it can read into the categories of the first table (a routing that computes "
            "the same output as the intended one at that step is not an error: no data could say which ran), and "
            "the failures it cannot read are counted from the completions themselves."]
    text += [f"Warning: {w}" for w in result["warnings"]]
    text += [f"Modularity, {r['policy']}: {r['verdict']}" + (f"; ρ = {r['rho']:.4f} [{r['rho_lower']:.4f}, "
                                                              f"{r['rho_upper']:.4f}]" if "rho" in r else "")
             for r in result["modularity"]]
    write_section(out, "Policy traces: where every step went, and is execution modular?", order=30, text=text,
                  figures=figures, tables=tables,
                  files=[name for name in ("attribution.json", "modularity.json", "differences.json")
                         if (out / name).is_file()])


def _fidelity_rows(rows: list[dict]) -> list[list]:
    out = []
    for policy in sorted({r["policy"] for r in rows}):
        mine = [r for r in rows if r["policy"] == policy]
        n = sum(r["steps"] for r in mine)
        out.append([policy, n, *(sum(r[k] * r["steps"] for r in mine) / n for k in ("teacher_forced", "exact",
                                                                                   "as_intended")),
                    mine[0]["correlation"]])
    return out


def _ppc_statistics(idata) -> tuple[dict, dict]:
    """The statistics :func:`latentsel.analysis.diagnostics.plot_ppc` draws, as ``(observed,
    replicated)``: step correctness at every depth and the frequency of every error type."""
    pp, obs = idata.posterior_predictive, idata.observed_data
    name = "step_correct" if "step_correct" in pp else "step_explained"
    observed, replicated = {}, {}
    rep = pp[name].values.reshape(-1, pp[name].shape[-1])
    for j, t in enumerate(pp[name]["depth"].values):
        key = f"{name.replace('_', ' ')} at depth {int(t)}"
        observed[key], replicated[key] = float(obs[name].values[j]), rep[:, j]
    types = [str(t) for t in pp["error_type"]["step_type"].values]
    rep = pp["error_type"].values.reshape(-1, len(types))
    for j, t in enumerate(types):
        key = f"share of {t} steps"
        observed[key], replicated[key] = float(obs["error_type"].values[j]), rep[:, j]
    return observed, replicated


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def summary_lines(result: dict) -> list[str]:
    """The per-corpus attribution, the emission choice, the LOO verdicts, the modularity test and
    the policy differences of :func:`fit_policy_corpora`, as lines of text."""
    lines = [f"{'corpus':<24} {'steps':>6} " + " ".join(f"{c[:9]:>9}" for c in CATEGORIES) + f" {'ran_on':>7}  noise"]
    for r in result["attribution"]:
        lines.append(f"{r['policy'] + '.' + r['split']:<24} {r['steps']:>6} "
                     + " ".join(f"{r[c]:>9.3f}" for c in CATEGORIES) + f" {r['ran_on']:>7.3f}  "
                     + ("—" if r["noise"] is None else f"{r['noise']} ({r['emission']})"))
    lines += [f"emission {r['policy']}.{r['split']}: {r['verdict']} -> {r['chosen']}" for r in result["emission"]]
    lines += [f"PSIS-LOO {r['policy']}.{r['split']}: {r['verdict']}" for r in result["loo"]]
    for r in result["modularity"]:
        rho = (f"; entanglement rho = {r['rho']:.4f} [{r['rho_lower']:.4f}, {r['rho_upper']:.4f}]"
               + ("" if r["rho_converged"] else " (NOT CONVERGED: its fixed point did not settle)") if "rho" in r
               else "")
        lines.append(f"modularity {r['policy']} ({r['train']} -> {r['test']}): modular {r['loglik_modular']:.2f}, "
                     f"entangled {r['loglik_entangled']:.2f} per held-out trace; {r['verdict']}{rho}")
    lines += [f"as intended, {_CONTEXT_LABELS[r['context']]}: {r['policy']} - {r['base']} = {r['diff']:+.3f} "
              f"[{r['diff_lower']:+.3f}, {r['diff_upper']:+.3f}]: {r['verdict']}"
              for r in result["differences"] if "diff" in r]
    for policy, _, tf, exact, module, corr in _fidelity_rows(result.get("fidelity", [])):
        lines.append(f"fidelity {policy} (eval-seen): teacher-forced {tf:.3f} per step; the fit's exact {exact:.3f}, "
                     f"intended module {module:.3f}; correlation across skills (exact) "
                     + ("n/a" if corr is None else f"{corr:.2f}"))
    return lines


def nuts_diagnostics(traces: Sequence[Trace], world: World, out: str | Path, *, label: str, n_traces: int = 300,
                     warmup: int = 150, samples: int = 150, replicates: int = 20, seed: int = 0,
                     progress: bool = True) -> dict:
    """NUTS on the read prefixes of the first ``n_traces`` traces under the modular model (2
    chains), with the full ArviZ diagnostics: ``out/idata.nc`` (posterior, sample_stats, marginal
    log_likelihood, posterior_predictive, observed_data), R-hat/ESS summary, trace, rank, PPC and
    Pareto-k plots. Failed diagnostics are flagged (``flags``), never left for the reader to find."""
    out = Path(out)
    traces = [p for p in (fitted_prefix(tr) for tr in list(traces)[:n_traces]) if p is not None]
    if not traces:
        raise ValueError(f"{label}: no step of its first {n_traces} traces was read; nothing for NUTS to fit")
    data = build_data(traces, world)
    res = fit_nuts("modular", data, num_warmup=warmup, num_samples=samples, num_chains=2, seed=seed,
                   progress_bar=progress)
    draws = params_from_sites("modular", res.samples)
    ppc = diagnostics.posterior_predictive(traces, world, "modular", draws, n_replicates=replicates, seed=seed,
                                           progress_bar=progress, data=data)
    idata = diagnostics.from_nuts("modular", data, res, world, trace_ids=[tr.id for tr in traces],
                                  posterior_predictive=ppc, progress_bar=progress)
    diagnostics.save(idata, out / "idata.nc")
    var_names, coords = diagnostics.default_selection(idata)
    table = diagnostics.summary(idata, var_names, coords=coords)
    worst = diagnostics.summary(idata)
    figs = []
    for name, fn, caption in (
            ("trace.png", lambda p: diagnostics.plot_trace(idata, path=p),
             "Trace plots of noise, off_module and the best-informed diagonal execution entries (2 chains)."),
            ("rank.png", lambda p: diagnostics.plot_rank(idata, path=p),
             "Rank plots of the same entries: well-mixed chains give flat histograms."),
            ("ppc.png", lambda p: diagnostics.plot_ppc(idata, path=p),
             "Posterior predictive check: step correctness by depth and the frequencies of error types in "
             "corpora replicated at posterior draws, against the observed corpus."),
            ("khat.png", lambda p: diagnostics.plot_khat(idata, path=p),
             f"Pareto k of PSIS-LOO per trace (k > {diagnostics.BAD_KHAT}: that trace's leave-one-out estimate is "
             "unreliable).")):
        fn(out / "figures" / name)
        figs.append({"file": f"figures/{name}", "caption": caption})
    rows = [[str(idx)] + [float(v) for v in table.loc[idx, ["mean", "sd", "ess_bulk", "ess_tail", "r_hat"]]]
            for idx in table.index]
    flags = mcmc_flags(worst["r_hat"].to_numpy(), worst["ess_bulk"].to_numpy())
    checks = ppc_flags(*_ppc_statistics(idata))
    flags += [f"PPC FAILED: observed {c['statistic']} {c['observed']:.3f} outside the replicates' 95% interval "
              f"[{c['lower']:.3f}, {c['upper']:.3f}] (p = {c['p']:.3f})" if c["lower"] is not None else
              f"PPC FAILED: {c['statistic']}: no finite observed value or replicate to compare"
              for c in checks if c["failed"]]
    if int(res.diverging.sum()):
        flags.append(f"DIVERGENCES: {int(res.diverging.sum())} divergent transitions; the draws may be biased")
    result = {"max_r_hat": float(worst["r_hat"].max()), "min_ess_bulk": float(worst["ess_bulk"].min()),
              "divergences": int(res.diverging.sum()), "n_traces": len(traces), "draws": 2 * samples,
              "flags": flags, "ppc": checks}
    text = [f"NUTS over the global parameters of the modular model, the selections summed out, on the read prefixes "
            f"of the first {len(traces)} traces of {label}: 2 chains of {warmup} warm-up and {samples} kept draws. "
            f"Over all {len(worst)} parameter entries the worst R-hat is {result['max_r_hat']:.3f} and the smallest "
            f"bulk ESS {result['min_ess_bulk']:.0f}; {result['divergences']} divergent transitions."]
    text += flags or ["Every entry has R-hat ≤ 1.01 and bulk ESS ≥ 400, and every predictive check passes."]
    write_section(out, f"Posterior diagnostics (NUTS, {label})", order=40, text=text, figures=figs,
                  tables=[{"caption": "Summary of the plotted entries", "columns": ["entry", "mean", "sd",
                                                                                  "ess_bulk", "ess_tail", "r_hat"],
                           "rows": rows},
                          {"caption": "Posterior predictive checks (central 95% of the replicates)",
                           "columns": ["statistic", "observed", "2.5%", "97.5%", "p", "failed"],
                           "rows": [[c["statistic"], c["observed"], c["lower"], c["upper"], c["p"], c["failed"]]
                                    for c in checks]}])
    with atomic_open(out / "nuts.json") as f:
        json.dump(result, f, indent=1)
    return result
