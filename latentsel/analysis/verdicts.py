"""What a comparison or a diagnostic lets one say, and nothing more (JAX-free).

Every conclusion the toolkit prints goes through one of these functions, so the CLI, the
report and the demo share one rule for each:

* a model comparison "prefers" a model only when the difference is at least twice its
  standard error (|Δ| ≥ 2·se) and, for PSIS-LOO, no trace of either model has a Pareto k above
  the threshold (each model's count is kept separately);
* MCMC results are flagged where R-hat > 1.01 or bulk ESS < 400;
* a posterior predictive check is flagged where the observed statistic falls outside the
  central 95% of its replicates.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Verdict", "compare_verdict", "loo_verdict", "mcmc_flags", "ppc_flags", "sbc_failed", "sbc_flags", "MAX_RHAT",
           "MIN_ESS", "SE_FACTOR"]

MAX_RHAT = 1.01
MIN_ESS = 400.0
SE_FACTOR = 2.0


class Verdict(dict):
    """A JSON-ready verdict: ``preferred`` (a name, or ``None``), ``text`` (one line) and
    ``reliable`` (bool: the diagnostics carry the comparison), plus the numbers behind it."""

    @property
    def text(self) -> str:
        return self["text"]


def compare_verdict(diff: float, se: float, a: str, b: str, *, what: str = "held-out log-likelihood per trace",
                    unit: str = "") -> Verdict:
    """``diff`` = a − b (higher is better) with standard error ``se``: prefer a or b only when
    |diff| ≥ 2·se."""
    if not (math.isfinite(diff) and math.isfinite(se)) or se < 0:
        return Verdict(preferred=None, reliable=False, diff=diff, se=se,
                       text=f"undecided: the {what} difference is not finite")
    if abs(diff) >= SE_FACTOR * se and diff != 0:
        win, lose = (a, b) if diff > 0 else (b, a)
        return Verdict(preferred=win, reliable=True, diff=diff, se=se,
                       text=f"{win} over {lose}: {what} {abs(diff):.3g}{unit} ± {se:.2g} (≥ {SE_FACTOR:g}·se)")
    return Verdict(preferred=None, reliable=True, diff=diff, se=se,
                   text=f"no preference: |Δ| = {abs(diff):.3g}{unit} < {SE_FACTOR:g}·se = {SE_FACTOR * se:.3g}")


def loo_verdict(records: Sequence[Mapping], *, threshold: float) -> Verdict:
    """PSIS-LOO of two or more models (the rows of
    :func:`latentsel.analysis.diagnostics.compare_records`, best first): a preference only when
    no model has a trace with Pareto k > ``threshold`` and the best leads the second by
    ≥ 2·dse. Each model's k count is kept (``bad_k``: model -> count)."""
    if len(records) < 2:
        raise ValueError(f"records: a comparison needs two models, got {len(records)}")
    bad = {str(r["model"]): int(r["n_bad_k"]) for r in records}
    best, second = records[0], records[1]
    diff, dse = second.get("elpd_diff"), second.get("dse")
    base = dict(bad_k=bad, elpd_diff=diff, dse=dse, threshold=threshold)
    if any(bad.values()):
        counts = ", ".join(f"{m} {n}" for m, n in bad.items())
        return Verdict(preferred=None, reliable=False, **base,
                       text=f"unreliable: traces with Pareto k > {threshold:g} ({counts})")
    if diff is None or dse is None:
        return Verdict(preferred=None, reliable=False, **base, text="undecided: elpd difference not finite")
    v = compare_verdict(float(diff), float(dse), str(best["model"]), str(second["model"]), what="elpd_loo")
    return Verdict(preferred=v["preferred"], reliable=True, **base, text=v["text"])


def mcmc_flags(r_hat: Sequence[float] | np.ndarray, ess_bulk: Sequence[float] | np.ndarray) -> list[str]:
    """The failed MCMC diagnostics, as lines (empty when R-hat ≤ 1.01 and bulk ESS ≥ 400 on
    every entry given)."""
    r_hat = np.asarray(r_hat, dtype=float)
    ess = np.asarray(ess_bulk, dtype=float)
    flags = []
    worst_r = float(np.max(r_hat)) if r_hat.size else float("nan")  # a NaN R-hat is a failure
    if not r_hat.size or not math.isfinite(worst_r) or worst_r > MAX_RHAT:
        n = int(np.sum(~(r_hat <= MAX_RHAT)))
        flags.append(f"NOT CONVERGED: R-hat up to {worst_r:.3f} > {MAX_RHAT} on {n} of {r_hat.size} entries")
    low = float(np.min(ess)) if ess.size else float("nan")
    if not ess.size or not math.isfinite(low) or low < MIN_ESS:
        n = int(np.sum(~(ess >= MIN_ESS)))
        flags.append(f"TOO FEW DRAWS: bulk ESS down to {low:.0f} < {MIN_ESS:.0f} on {n} of {ess.size} entries")
    return flags


def ppc_flags(observed: Mapping[str, float], replicated: Mapping[str, np.ndarray], *,
              level: float = 0.95) -> list[dict]:
    """Posterior predictive checks: for each statistic, the observed value against the central
    ``level`` interval of its replicates; ``failed`` where it falls outside. Returns one dict per
    statistic: ``{"statistic", "observed", "lower", "upper", "p", "failed"}`` (``p``: the
    two-sided posterior predictive p-value, min(2·P(rep ≤ obs), 2·P(rep ≥ obs), 1))."""
    out = []
    q = (1 - level) / 2
    for name, obs in observed.items():
        rep = np.asarray(replicated[name], dtype=float)
        rep = rep[np.isfinite(rep)]
        if not rep.size or not math.isfinite(float(obs)):
            out.append(dict(statistic=name, observed=float(obs), lower=None, upper=None, p=None, failed=True))
            continue
        lo, hi = np.quantile(rep, [q, 1 - q])
        p = float(min(1.0, 2 * np.mean(rep <= obs), 2 * np.mean(rep >= obs)))
        out.append(dict(statistic=name, observed=float(obs), lower=float(lo), upper=float(hi), p=p,
                        failed=bool(obs < lo or obs > hi)))
    return out


def sbc_failed(p_values: Sequence[float], *, alpha: float = 0.01) -> list[bool]:
    """Does each parameter's SBC rank histogram fail the uniformity test at family-wise level
    ``alpha`` (Bonferroni over the parameters tested; a NaN p-value fails)?"""
    p = np.asarray(p_values, dtype=float)
    cut = alpha / max(len(p), 1)
    return [not v >= cut for v in p]


def sbc_flags(parameters: Sequence[str], p_values: Sequence[float], *, alpha: float = 0.01) -> list[str]:
    """The failures of :func:`sbc_failed`, as lines; empty when every histogram passes."""
    cut = alpha / max(len(p_values), 1)
    return [f"SBC FAILED: {name} ranks are not uniform (p = {v:.2g} < {cut:.2g}, Bonferroni over "
            f"{len(p_values)})" for name, v, bad in zip(parameters, p_values, sbc_failed(p_values, alpha=alpha))
            if bad]
