"""Verdicts on the identifiability claims C1-C4 (DESIGN §6) from the records of a design.

Each verdict is ``"supported"``, ``"refuted"`` or ``"undecided at this N"``, with the measure it
rests on, its interval (± 2 standard errors, seeds pooled) and the N at which it is decided.
A verdict is only as strong as its numbers: where the interval does not decide, it says so.

* **C1** rows outside the data's declared program support stay at the prior at every N:
  the largest KL(q(row) ‖ prior(row)) over those rows that no step reaches, at every N.
  Supported when it is 0 (to 1e-9) at every N; refuted when any moved; undecided when the
  design has no such row, or when its data reach rows outside the support it declares (a wrong
  declaration, not evidence). For the conjugate posterior a row without steps gets no counts,
  so C1 holds by construction there; a posterior that shares strength across rows could fail.
* **C2** with an entangled truth, the modular and entangled fits become separable as N grows,
  sooner with varied (RL-style) data than with golden (SFT-style) traces: the held-out
  log-likelihood per trace, entangled minus modular (Δ ± se). A regime *separates* from the
  smallest N at and above which Δ ≥ 2 se at every N. Supported when the varied regime separates
  and the golden one does not, or later; refuted when the golden regime separates first (a
  small-N Δ below 0 is the entangled model's variance, not evidence against the claim).
* **C3** compressed compound steps are identified only up to their class (pairs of modules
  through the hidden step) until varied data separate them: the share of hidden compound steps
  whose MAP selection is right up to its class but not exactly (``compound_gap``), in the
  compressed regime and in the one that adds varied traces of the same prompts.
  Supported when that share is above 0 under ``compressed`` and lower under the separated
  regime (each by 2 se); refuted when the varied data leave it higher, or change it by less
  than 0.01 with the whole interval inside ±0.01; undecided otherwise.
* **C4** inside the support the posterior contracts on the truth as N grows: the class-level
  parameter error on reached rows, and the mean log distance of each row's true fidelity from
  the posterior mean in posterior sds (routing and skill rows apart), at the smallest and the
  largest N. A posterior that
  contracts on the truth shrinks the error, and the distance in sds does not grow (a prior's
  pull fades as 1/N, the sd as 1/sqrt(N)); one that contracts elsewhere leaves the truth ever
  more sds away. Supported for a regime when the error falls by 2 se and the distance does not
  rise by 2 se; refuted when the error rises or the distance rises by 2 se. (Coverage of a fixed
  truth by 95% intervals is not the criterion: a posterior under a prior far from the truth is
  correct and still misses it at moderate N; it is reported beside.)
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np

__all__ = ["SUPPORTED", "REFUTED", "UNDECIDED", "claim_verdicts", "claim_label", "verdict_c1", "verdict_c2", "verdict_c3",
           "verdict_c4", "pooled"]

SUPPORTED, REFUTED, UNDECIDED = "supported", "refuted", "undecided at this N"
KL_TOL = 1e-9
C3_MARGIN = 0.01


def pooled(records: Sequence[Mapping], value: str, se: str | None = None) -> dict:
    """``{N: (mean, se, n_seeds)}`` of ``value`` over seeds: the mean of the seeds' values and
    its standard error, the larger of the within-fit one (with a per-record ``se`` field,
    sqrt(Σ se²) / n) and the seeds' sd / sqrt(n) (each seed redraws the truth and the data);
    None for one seed without an ``se`` field."""
    groups = defaultdict(list)
    for r in records:
        if r.get(value) is not None:
            groups[r["n_traces"]].append(r)
    out = {}
    for n, rs in sorted(groups.items()):
        v = np.array([r[value] for r in rs], float)
        between = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
        if se is not None and all(r.get(se) is not None for r in rs):
            within = math.sqrt(sum(r[se] ** 2 for r in rs)) / len(rs)
            # each seed redraws the truth and the data: the spread between seeds counts too
            s = within if between is None else max(within, between)
        else:
            s = between
        out[n] = (float(v.mean()), s, len(rs))
    return out


def _select(records, *, truth=None, regime=None, model=None, truths=None, regimes=None):
    return [r for r in records if (truth is None or r["truth"] == truth) and (regime is None or r["regime"] == regime)
            and (model is None or r["model"] == model) and (truths is None or r["truth"] in truths)
            and (regimes is None or r["regime"] in regimes)]


def _verdict(claim: str, verdict: str, text: str, *, measure: str, value=None, interval=None, n=None,
             details=None) -> dict:
    return {"claim": claim, "verdict": verdict, "text": text, "measure": measure, "value": value,
            "interval": interval, "n": n, "details": details or {}}


def _fmt(mean, se) -> str:
    return f"{mean:+.3f} ± {2 * se:.3f}" if se is not None else f"{mean:+.3f} (one seed, no interval)"


def verdict_c1(records: Sequence[Mapping], spec: Mapping | None = None) -> dict:
    spec = spec or {}
    rs = _select(records, truths=spec.get("truths"), regimes=spec.get("regimes"))
    measure = "largest KL(q(row) || prior(row)) over rows outside the declared program support that no step reaches"
    wrong = [r for r in rs if r.get("rows_outside_reached")]
    if wrong:
        w = max(wrong, key=lambda r: r["rows_outside_reached"])
        return _verdict("C1", UNDECIDED, f"the declared support is wrong: the data of {w['regime']} reach "
                                         f"{w['rows_outside_reached']} rows outside it ({w['model']} fit, "
                                         f"N = {w['n_traces']}); declare the support the data follow",
                        measure=measure, n=w["n_traces"], details={"regime": w["regime"],
                                                                   "rows_outside_reached": w["rows_outside_reached"]})
    rs = [r for r in rs if r.get("rows_outside")]
    if not rs:
        return _verdict("C1", UNDECIDED, "no row lies outside a regime's declared support in this design",
                        measure=measure)
    worst = max(rs, key=lambda r: r["kl_outside_max"])
    sizes = sorted({r["n_traces"] for r in rs})
    kl = worst["kl_outside_max"]
    n_rows = max(r["rows_outside"] for r in rs)
    if kl > KL_TOL:
        return _verdict("C1", REFUTED, f"rows outside the support that no step reaches moved from the prior: KL up "
                                       f"to {kl:.3g} ({worst['regime']}, {worst['truth']} truth, {worst['model']} "
                                       f"fit, N = {worst['n_traces']})", measure=measure, value=kl,
                        n=worst["n_traces"], details={"regime": worst["regime"]})
    return _verdict("C1", SUPPORTED, f"every row outside the declared support (up to {n_rows} per fit, "
                                     f"{len(rs)} fits) stayed at the prior at every N ({', '.join(map(str, sizes))}): "
                                     f"largest KL {kl:.1g}. For the conjugate posterior this holds by construction "
                                     "(no step, no count); what the design checks is that its data stay inside the "
                                     "support it declares", measure=measure, value=kl, n=sizes[-1])


def _separates(series: dict) -> int | None:
    """The smallest N from which Δ ≥ 2 se at every larger N (None if never)."""
    sizes = sorted(series)
    ok = [series[n][1] is not None and series[n][0] >= 2 * series[n][1] and series[n][0] > 0 for n in sizes]
    first = None
    for n, good in zip(sizes, ok):
        if good and first is None:
            first = n
        elif not good:
            first = None
    return first


def verdict_c2(records: Sequence[Mapping], spec: Mapping) -> dict:
    measure = "held-out log-likelihood per trace, entangled minus modular fit (entangled truth)"
    truth, golden, varied = spec.get("truth"), spec.get("golden"), spec.get("varied")
    rs = [r for r in _select(records, truth=truth, model="entangled") if r.get("heldout_diff") is not None]
    series = {name: pooled(_select(rs, regime=name), "heldout_diff", "heldout_diff_se")
              for name in dict.fromkeys(r["regime"] for r in rs)}
    if not series.get(golden) or not series.get(varied):
        return _verdict("C2", UNDECIDED, f"not measured: the design has no held-out comparison of {golden!r} and "
                                         f"{varied!r} under the {truth!r} truth", measure=measure)
    # both regimes are judged on the sizes both were measured at
    common = set(series[golden]) & set(series[varied])
    if not common:
        return _verdict("C2", UNDECIDED, f"not measured: {golden!r} and {varied!r} share no N", measure=measure)
    series = {name: {n: v for n, v in s_.items() if n in common} for name, s_ in series.items()}
    series = {name: s_ for name, s_ in series.items() if s_}
    sep = {name: _separates(s) for name, s in series.items()}
    n_max = max(series[varied])
    mean, se, _ = series[varied][n_max]
    g_max = max(series[golden])
    g_mean, g_se, _ = series[golden][g_max]
    details = {name: {"separates_at": sep[name],
                      "by_n": {str(n): {"diff": m, "se": s, "seeds": k} for n, (m, s, k) in sorted(s_.items())}}
               for name, s_ in series.items()}
    others = ", ".join(f"{name} from N = {sep[name]}" if sep[name] else f"{name} never"
                       for name in series if name not in (golden, varied))
    tail = (f"; varied {varied} Δ = {_fmt(mean, se)} at N = {n_max}, golden {golden} Δ = {_fmt(g_mean, g_se)} at "
            f"N = {g_max}" + (f"; one factor at a time: {others}" if others else ""))
    interval = None if se is None else [mean - 2 * se, mean + 2 * se]
    if sep[golden] is not None and (sep[varied] is None or sep[golden] < sep[varied]):
        return _verdict("C2", REFUTED, f"golden data separate the fits first (N = {sep[golden]}; varied: "
                                       f"{sep[varied] or 'never'})" + tail, measure=measure, value=mean,
                        interval=interval, n=sep[golden], details=details)
    if sep[varied] is not None and (sep[golden] is None or sep[varied] < sep[golden]):
        return _verdict("C2", SUPPORTED, f"varied data separate the fits from N = {sep[varied]}, golden data "
                                         + (f"from N = {sep[golden]}" if sep[golden] else "at no N of the design")
                        + tail, measure=measure, value=mean, interval=interval, n=sep[varied], details=details)
    return _verdict("C2", UNDECIDED, "neither regime separates the fits first at the design's N" + tail,
                    measure=measure, value=mean, interval=interval, n=n_max, details=details)


def verdict_c3(records: Sequence[Mapping], spec: Mapping) -> dict:
    measure = "share of hidden compound steps right only up to their class (MAP, modular fit)"
    truth, compressed, separated = spec.get("truth"), spec.get("compressed"), spec.get("separated")
    a = pooled(_select(records, truth=truth, regime=compressed, model="modular"), "compound_gap", "compound_gap_se")
    b = pooled(_select(records, truth=truth, regime=separated, model="modular"), "compound_gap", "compound_gap_se")
    common = sorted(set(a) & set(b))
    if not common:
        return _verdict("C3", UNDECIDED, f"not measured: {compressed!r} and {separated!r} share no N with compound "
                                         "steps in this design", measure=measure)
    n = common[-1]
    (ga, sa, _), (gb, sb, _) = a[n], b[n]
    details = {"by_n": {str(k): {"compressed": a[k][0], "compressed_se": a[k][1], "separated": b[k][0],
                                 "separated_se": b[k][1]} for k in common}}
    text = f"{compressed}: {_fmt(ga, sa)}, {separated}: {_fmt(gb, sb)} at N = {n}"
    if sa is None or sb is None:
        return _verdict("C3", UNDECIDED, "no standard error (one compound step or fewer): " + text, measure=measure,
                        value=ga - gb, n=n, details=details)
    sd = math.hypot(sa, sb)
    diff = ga - gb
    interval = [diff - 2 * sd, diff + 2 * sd]
    if ga >= 2 * sa and diff >= 2 * sd:
        return _verdict("C3", SUPPORTED, "varied data separate compound steps the hidden step left to their class: "
                        + text, measure=measure, value=diff, interval=interval, n=n, details=details)
    if -diff >= 2 * sd or (abs(diff) + 2 * sd < C3_MARGIN):
        why = ("varied data leave more compound steps unresolved" if -diff >= 2 * sd
               else f"varied data change the share by less than {C3_MARGIN}")
        return _verdict("C3", REFUTED, f"{why}: " + text, measure=measure, value=diff, interval=interval, n=n,
                        details=details)
    return _verdict("C3", UNDECIDED, "the difference is within its interval: " + text, measure=measure, value=diff,
                    interval=interval, n=n, details=details)


def verdict_c4(records: Sequence[Mapping], spec: Mapping) -> dict:
    measure = ("class-level parameter error on reached rows, and the true fidelity's distance from the posterior "
               "mean in posterior sds (mean log), smallest vs largest N")
    truth = spec.get("truth")
    rs = _select(records, truth=truth, model="modular", regimes=spec.get("regimes"))
    per, verdicts = {}, []
    for name in dict.fromkeys(r["regime"] for r in rs):
        err = pooled(_select(rs, regime=name), "class_param_error", "class_param_error_se")
        if len(err) < 2:
            continue
        lo, hi = min(err), max(err)
        (e0, s0, _), (e1, s1, _) = err[lo], err[hi]
        if s0 is None or s1 is None:  # no standard error, no verdict
            per[name] = {"verdict": UNDECIDED, "n_min": lo, "n_max": hi, "error_min": e0, "error_max": e1,
                         "drop": e0 - e1, "drop_se": float("nan"), "recede": {}, "away": []}
            verdicts.append(UNDECIDED)
            continue
        drop, sd = e0 - e1, math.hypot(s0, s1)
        recedes = {}
        for part in ("route", "skill"):  # each family of rows apart: one may contract elsewhere
            z = pooled(_select(rs, regime=name), f"{part}_log_z", f"{part}_log_z_se")
            if lo in z and hi in z:
                (z0, t0, _), (z1, t1, _) = z[lo], z[hi]
                if t0 is not None and t1 is not None:
                    recedes[part] = (z1 - z0, math.hypot(t0, t1))
        away = [p for p, (r, s_) in recedes.items() if s_ and r >= 2 * s_]
        if -drop >= 2 * sd or away:
            v = REFUTED
        elif drop >= 2 * sd:
            v = SUPPORTED
        else:
            v = UNDECIDED
        per[name] = {"verdict": v, "n_min": lo, "n_max": hi, "error_min": e0, "error_max": e1, "drop": drop,
                     "drop_se": sd, "recede": {p: {"log_ratio": r, "se": s_} for p, (r, s_) in recedes.items()},
                     "away": away}
        verdicts.append(v)
    if not per:
        return _verdict("C4", UNDECIDED, "not measured: no regime has two sizes under this truth", measure=measure)
    def distance(d):
        return ", ".join(f"{p} ×{math.exp(x['log_ratio']):.2f}" for p, x in d["recede"].items())

    text = "; ".join(f"{k}: error {d['error_min']:.3f} → {d['error_max']:.3f} (N {d['n_min']} → {d['n_max']}, drop "
                     f"{d['drop']:+.3f} ± {2 * d['drop_se']:.3f}), truth's distance in posterior sds {distance(d)}"
                     + (f", receding on the {' and '.join(d['away'])} rows" if d["away"] else "")
                     + f" ({d['verdict']})" for k, d in per.items())
    overall = REFUTED if REFUTED in verdicts else SUPPORTED if all(v == SUPPORTED for v in verdicts) else UNDECIDED
    worst = min(per.values(), key=lambda d: d["drop"])
    return _verdict("C4", overall, text, measure=measure, value=worst["drop"],
                    interval=[worst["drop"] - 2 * worst["drop_se"], worst["drop"] + 2 * worst["drop_se"]],
                    n=max(d["n_max"] for d in per.values()), details=per)


def claim_verdicts(records: Sequence[Mapping], claims: Mapping[str, Mapping | Sequence[Mapping]]) -> list[dict]:
    """The verdict of every claim the design names (``{"C1": spec or [spec, ...], ...}``), in
    claim order, one per spec; each verdict's ``"spec"`` is the spec it tested."""
    fns = {"C1": verdict_c1, "C2": verdict_c2, "C3": verdict_c3, "C4": verdict_c4}
    out = []
    for c in sorted(claims):
        specs = claims[c] if isinstance(claims[c], (list, tuple)) else [claims[c]]
        for spec in specs:
            out.append({**fns[c](records, spec), "spec": dict(spec), "label": claim_label(c, spec)})
    return out


def claim_label(claim: str, spec: Mapping) -> str:
    """A claim and what it was tested on, e.g. ``"C3 (compressed vs compressed+rl)"``."""
    if claim == "C2":
        return f"C2 ({spec.get('golden')} vs {spec.get('varied')}, {spec.get('truth')} truth)"
    if claim == "C3":
        return f"C3 ({spec.get('compressed')} vs {spec.get('separated')})"
    if claim == "C4" and spec.get("regimes"):
        return f"C4 ({', '.join(spec['regimes'])}, {spec.get('truth')} truth)"
    return claim
