"""One number for how entangled execution is: the correlation of executions within a bigram context.

The hierarchical model between the modular and the entangled one: every context row is drawn
around its module's row,

    route_ctx[c_{t-1}^r, c_t^r] ~ Dirichlet(κ · route_exec[c_t^r]),
    skill_ctx[c_{t-1}^k, c_t^k] ~ Dirichlet(κ · skill_exec[c_t^k]),

with one concentration κ for both. ρ = 1 / (1 + κ) is the correlation of two executions in the
same context beyond what the module's row explains (the Dirichlet-multinomial's intra-class
correlation): ρ = 0 is the modular model (every context executes its module's row), ρ → 1 the
entangled one (every context its own row). ρ is estimated by empirical Bayes: the context rows
are integrated out analytically given the executions, the executions are the expected counts of
an E-step at the context rows' posterior means, and the two alternate to a fixed point. Its
interval is the profile-likelihood interval of the Dirichlet-multinomial marginal at the final
counts. **Approximate**: the expected counts are treated as observed, so the interval ignores the
uncertainty of which module ran (small where steps are identified, as on policy traces whose
outputs name their skill; wide aliasing makes it too narrow).

One κ serves every context, so ρ measures entanglement spread over the contexts. A few contexts
that execute something else entirely, among many modular ones, move it little: with the skill
swapped in 90% of every held-out bigram's executions, 300 seen-bigram + 300 held-out-bigram
simulated traces put ρ's lower end at 0.004 (and 400 + 400 other draws at 0.025), away from 0,
but 1,000 + 300 give [0, 0.0023]: the modular contexts' counts outweigh the few swapped ones'.
Read a ρ interval that holds 0 as "no entanglement spread across contexts", and look at the
held-out comparison for entanglement in a few.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import gammaln, xlogy
from scipy.stats import chi2

from latentsel.analysis.stepwise import StepParams, step_joint
from latentsel.models.data import HLSMData

__all__ = ["context_counts", "dm_loglik", "entanglement"]

_LOG_KAPPA = (-4.0, 14.0)  # the range of log κ searched; e^14 stands for the modular limit


def context_counts(data: HLSMData, on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected on-module executions per context: ``([R + 1, R, R], [K + 1, K, K])``, indexed
    (previous intended module or start, intended, executed), from ``on: [N, T, R, K]``."""
    r_n, k_n = on.shape[-2:]
    n, t = np.nonzero(data.step_mask)
    prev_r = np.where(t > 0, data.route_intended[n, np.maximum(t - 1, 0)], r_n)
    prev_k = np.where(t > 0, data.skill_intended[n, np.maximum(t - 1, 0)], k_n)
    routes = np.zeros((r_n + 1, r_n, r_n))
    skills = np.zeros((k_n + 1, k_n, k_n))
    np.add.at(routes, (prev_r, data.route_intended[n, t]), on[n, t].sum(-1))
    np.add.at(skills, (prev_k, data.skill_intended[n, t]), on[n, t].sum(-2))
    return routes, skills


def dm_loglik(counts: np.ndarray, rows: np.ndarray, kappa: float) -> float:
    """Σ over contexts of log DirMult(counts[p, c] | κ · rows[c]) (without the multinomial
    coefficient, which does not depend on κ); ``kappa = inf`` gives the multinomial limit."""
    n_pc = counts.sum(-1)
    if np.isinf(kappa):
        return float(np.sum(xlogy(counts, np.broadcast_to(rows, counts.shape))))
    a = kappa * np.broadcast_to(rows, counts.shape)
    used = n_pc > 0
    per = (gammaln(kappa) - gammaln(kappa + n_pc)
           + np.sum(np.where(counts > 0, gammaln(a + counts) - gammaln(np.where(a > 0, a, 1.0)), 0.0), -1))
    return float(np.sum(np.where(used, per, 0.0)))


def _objective(counts, exec_rows):
    def f(log_kappa):
        k = np.exp(log_kappa)
        return sum(dm_loglik(c, r, k) for c, r in zip(counts, exec_rows))
    return f


def entanglement(data: HLSMData, params: StepParams, *, level: float = 0.95, max_iter: int = 30,
                 tol: float = 1e-3) -> dict:
    """ρ (and κ) of the hierarchical model around the modular fit ``params`` (its modular rows,
    noise and off-module rate are kept), with its ``level`` profile-likelihood interval.

    Returns dict(rho, rho_lower, rho_upper, converged, kappa, iterations, loglik_modular,
    loglik_best, log_kappa_grid, profile) — ``profile`` the Dirichlet-multinomial log marginal on
    the grid; ``converged``: the fixed point settled within ``max_iter`` alternations.
    """
    exec_rows = (np.asarray(params.route_exec), np.asarray(params.skill_exec))
    f = None
    log_kappa, it, done = _LOG_KAPPA[1], 0, False
    counts = context_counts(data, step_joint(data, params).on)
    for it in range(1, max_iter + 1):
        f = _objective(counts, exec_rows)
        best = minimize_scalar(lambda x: -f(x), bounds=_LOG_KAPPA, method="bounded", options={"xatol": 1e-4})
        new = float(best.x)
        k = np.exp(new)
        ctx = [(k * r[None] + c) / (k + c.sum(-1, keepdims=True)) for c, r in zip(counts, exec_rows)]
        p = params._replace(route_ctx=ctx[0], skill_ctx=ctx[1], lam=1.0)
        counts = context_counts(data, step_joint(data, p).on)
        done = abs(new - log_kappa) < tol
        log_kappa = new
        if done:
            break
    f = _objective(counts, exec_rows)
    top = f(log_kappa)
    limit = sum(dm_loglik(c, r, np.inf) for c, r in zip(counts, exec_rows))
    cut = chi2(1).ppf(level) / 2
    if limit >= top:  # the modular limit is at least as good
        log_kappa, top = np.inf, limit
    grid = np.linspace(*_LOG_KAPPA, 73)
    profile = np.array([f(x) for x in grid])

    def crossing(lo, hi):
        """The log κ in [lo, hi] where the profile crosses top - cut (f(lo) above, f(hi) below)."""
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) >= top - cut else (lo, mid)
        return (lo + hi) / 2

    lo_grid = _LOG_KAPPA[0]
    low_end = lo_grid if f(lo_grid) >= top - cut else crossing(log_kappa if np.isfinite(log_kappa) else
                                                                _LOG_KAPPA[1], lo_grid)
    # the upper end of κ (the lower end of ρ): unbounded when the modular limit is inside
    if limit >= top - cut:
        high_end = np.inf
    else:
        high_end = crossing(log_kappa, _LOG_KAPPA[1])
    rho = lambda lk: 0.0 if np.isinf(lk) else 1.0 / (1.0 + np.exp(lk))  # noqa: E731
    # an end at the search's lower bound of κ is not a measured end: ρ's interval reaches 1
    upper = 1.0 if low_end <= _LOG_KAPPA[0] else rho(low_end)
    return {"rho": rho(log_kappa), "rho_lower": rho(high_end), "rho_upper": upper, "converged": bool(done),
            "kappa": float(np.exp(log_kappa)), "iterations": it, "loglik_modular": float(limit),
            "loglik_best": float(top), "log_kappa_grid": grid.tolist(), "profile": profile.tolist()}
