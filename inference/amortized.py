"""Amortized variational inference: an inference network q(r_t, k_t, u_t | step) (DESIGN §5).

For corpora too large to enumerate repeatedly, a network maps the emission statistics of a
step to a distribution over its selections, trained by Pyro's ``SVI`` on the Pyro program
with the global parameters θ fixed (:func:`~latentsel.inference.pyro_enum.conditioned`).
Scope: the modular and entangled models on traces without hidden steps.

The exact posterior of a free step is

    log p(r, k, u | y) = log p(r | c) + log p(k | c) + [u = 0] (log(1 - o) + log p_on(y | r, k))
                         + [u = 1] (log o + log p_off(y)) + const,

so the network has the same shape: a learned logit of the executed routing given its
context (intended routing, and for ``entangled`` the previous one) plus one of the skill,
plus a head on the module's match statistics giving s_on (-inf where the lengths differ,
as p_on) and s_off. Then q(r, k) ∝ exp(route + skill + logaddexp(s_on, s_off)) and
q(u = 1 | r, k) = sigmoid(s_off - s_on): the exact posterior is one point of the family, and
q puts no mass where the model has none (the ELBO needs that).

Features are made per minibatch from the numpy arrays, so a corpus of 10^6 traces costs its
``int8`` match counts (~1 GB at depth 4 in the default world) and nothing more. The network
runs on ``device``; the Pyro sites run on the CPU, where the programs' tensors live.
Estimators: ``"tracegraph"`` (``TraceGraph_ELBO``: score-function gradients with decaying
average baselines) or ``"enum"`` (``TraceEnum_ELBO`` with the guide's sites enumerated in
parallel: the exact expectation over q, no sampling variance).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.ops.indexing import Vindex
from torch import nn

from latentsel.inference.pyro_enum import conditioned
from latentsel.models.data import HLSMData, execution_rows, log_p_off, log_p_on
from latentsel.models.registry import MODELS, model_spec

__all__ = ["StepFeatures", "Amortizer", "AmortizedResult", "AmortizedPosterior", "step_features", "make_guide",
           "fit_amortized", "amortized_posterior", "ESTIMATORS", "check_scope"]

ESTIMATORS = ("tracegraph", "enum")
N_FEATURES = 4
# an off-module logit whose q(u = 0) = sigmoid(-CERTAIN) underflows to exactly 0 in float32
# and float64: where the lengths differ p_on = 0, and the guide must not sample u = 0 there
CERTAIN = 1e4


def check_scope(model: str, data: HLSMData) -> None:
    if model_spec(model).chain:
        covered = " and ".join(name for name, spec in MODELS.items() if spec.uses_program)
        raise ValueError(f"amortized inference covers the {covered} models, not {model!r}")
    if data.blocks:
        raise ValueError("amortized inference covers traces without hidden steps; this corpus has hidden-step blocks")


class StepFeatures(NamedTuple):
    """What the network sees of B traces of T steps.

    module: float32[B, T, R, K, 4], per module: m / max(len, 1), the mismatches len - m
        (both 0 where the lengths differ), the indicator that the lengths differ, len;
    differ: bool[B, T, R, K]; route_ctx, skill_ctx: int64[B, T], the context of the executed
        routing / skill: c_t (modular) or c_{t-1} · R + c_t (entangled; c_0 = R, "start").
    """

    module: torch.Tensor
    differ: torch.Tensor
    route_ctx: torch.Tensor
    skill_ctx: torch.Tensor


def _context(model: str, intended: np.ndarray, n: int) -> np.ndarray:
    intended = intended.astype(np.int64)
    if not model_spec(model).context:
        return intended
    prev = np.concatenate([np.full_like(intended[:, :1], n), intended[:, :-1]], axis=1)
    return prev * n + intended


def step_features(model: str, batch: HLSMData, device="cpu") -> StepFeatures:
    """The features of every step of ``batch`` (a minibatch: ``data.take(index)``)."""
    match = torch.from_numpy(np.ascontiguousarray(batch.match)).to(device).float()
    length = torch.from_numpy(np.ascontiguousarray(batch.length)).to(device).float()[..., None, None]
    differ = match < 0
    length = length.expand_as(match)
    zero = torch.zeros_like(match)
    frac = torch.where(differ, zero, match / length.clamp(min=1.0))
    mismatch = torch.where(differ, zero, length - match)
    module = torch.stack([frac, mismatch, differ.float(), length], dim=-1)
    ctx = [torch.from_numpy(_context(model, np.asarray(c), n)).to(device)
           for c, n in ((batch.route_intended, batch.n_routes), (batch.skill_intended, batch.n_skills))]
    return StepFeatures(module, differ, *ctx)


class Amortizer(nn.Module):
    """q(r, k, u | step): ``forward(features) -> (log_q_rk [B, T, R, K], off_logit [B, T, R, K])``,
    log q(r, k) normalized over (r, k), and the logit of q(u = 1 | r, k) (``CERTAIN`` where the
    lengths differ)."""

    def __init__(self, model: str, n_routes: int, n_skills: int, hidden: int = 16):
        super().__init__()
        ctx_r, ctx_k = (((n_routes + 1) * n_routes, (n_skills + 1) * n_skills) if model_spec(model).context
                        else (n_routes, n_skills))
        self.route = nn.Embedding(ctx_r, n_routes)
        self.skill = nn.Embedding(ctx_k, n_skills)
        nn.init.zeros_(self.route.weight)
        nn.init.zeros_(self.skill.weight)
        # the exact s_on and s_off are linear in the counts; the small MLP takes up the rest
        self.linear = nn.Linear(N_FEATURES, 2)
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, f: StepFeatures):
        s = self.linear(f.module) + self.mlp(f.module)
        s_on, s_off = s[..., 0], s[..., 1]
        log_emit = torch.logaddexp(torch.where(f.differ, torch.full_like(s_on, -torch.inf), s_on), s_off)
        logits = self.route(f.route_ctx)[..., :, None] + self.skill(f.skill_ctx)[..., None, :] + log_emit
        log_q = logits - torch.logsumexp(logits.flatten(-2), -1)[..., None, None]
        off_logit = torch.where(f.differ, torch.full_like(s_on, CERTAIN), s_off - s_on)
        return log_q, off_logit


def make_guide(net: Amortizer, model: str, estimator: str = "tracegraph", device="cpu") -> Callable:
    """A Pyro guide with the model's local sites: ``route`` ~ q(r), ``skill`` ~ q(k | r),
    ``off`` ~ q(u | r, k) in the plates ``traces`` (dim -2) and ``steps`` (dim -1), masked by
    ``emit`` as the model is. ``"enum"`` marks them for parallel enumeration; ``"tracegraph"``
    gives them decaying-average baselines."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    infer = ({"enumerate": "parallel"} if estimator == "enum"
             else {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}})

    def guide(data: HLSMData, *args, **kwargs):
        pyro.module("amortizer", net)
        log_q, off_logit = (x.to("cpu", torch.float64) for x in net(step_features(model, data, device)))
        n, t = data.step_mask.shape
        log_qr = torch.logsumexp(log_q, -1)
        log_qk_r = log_q - log_qr[..., None]
        rows, cols = torch.arange(n)[:, None], torch.arange(t)[None, :]
        emit = torch.from_numpy(np.ascontiguousarray(data.emit))
        with pyro.plate("traces", n, dim=-2), pyro.plate("steps", t, dim=-1), pyro.poutine.mask(mask=emit):
            r = pyro.sample("route", dist.Categorical(logits=log_qr), infer=dict(infer))
            k = pyro.sample("skill", dist.Categorical(logits=Vindex(log_qk_r)[rows, cols, r]), infer=dict(infer))
            pyro.sample("off", dist.Bernoulli(logits=Vindex(off_logit)[rows, cols, r, k]), infer=dict(infer))

    return guide


class AmortizedResult(NamedTuple):
    """The result of :func:`fit_amortized`.

    net: the trained :class:`Amortizer` (on ``device``); state: its ``state_dict`` on the CPU;
    losses: float64[steps], the negative ELBO per trace of each minibatch (tracegraph: a
        one-sample estimate; enum: exact under q) plus the constant of the fixed θ;
    model, estimator, batch, device: as given.
    """

    net: Amortizer
    state: dict
    losses: np.ndarray
    model: str
    estimator: str
    batch: int
    device: str


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fit_amortized(model: str, data: HLSMData, params, *, estimator: str = "tracegraph", steps: int = 2000,
                  batch: int = 256, lr: float = 0.02, hidden: int = 16, seed: int = 0, device: str | None = None,
                  progress: Callable | None = None, progress_every: int = 50) -> AmortizedResult:
    """Train q on minibatches of ``batch`` traces of ``data`` (drawn without replacement
    within a step by ``numpy.random.default_rng(seed)``) by Adam on the negative ELBO of the
    program ``model`` at ``params``. ``progress(step, loss)`` is called every
    ``progress_every`` steps and at the end. The torch RNG is forked: the caller's is left as it was."""
    check_scope(model, data)
    device = default_device() if device is None else device
    rng = np.random.default_rng(seed)
    program = conditioned(model, params)
    elbo = TraceEnum_ELBO(max_plate_nesting=2) if estimator == "enum" else TraceGraph_ELBO(max_plate_nesting=2)
    losses = np.empty(steps)
    forked = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=forked), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        net = Amortizer(model, data.n_routes, data.n_skills, hidden).to(device)
        svi = SVI(program, make_guide(net, model, estimator, device), pyro.optim.Adam({"lr": lr}), elbo)
        size = min(batch, data.n_traces)
        for i in range(steps):
            part = data.take(np.sort(rng.choice(data.n_traces, size=size, replace=False)))
            losses[i] = svi.step(part) / size
            if progress is not None and ((i + 1) % progress_every == 0 or i + 1 == steps):
                progress(i + 1, losses[i])
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return AmortizedResult(net, state, losses, model, estimator, size, device)


class AmortizedPosterior(NamedTuple):
    """The network's posterior of every step (numpy; entries past a trace's depth are
    meaningless, MAP -1 there).

    route_probs: float64[N, T, R], q(r_t); skill_probs: float64[N, T, K], q(k_t);
    p_off: float64[N, T], q(u_t = 1); map_route, map_skill: int[N, T], the argmax of q(r_t, k_t);
    joint_probs: float64[N, T, R, K], q(r_t, k_t), or None when not asked for.
    """

    route_probs: np.ndarray
    skill_probs: np.ndarray
    p_off: np.ndarray
    map_route: np.ndarray
    map_skill: np.ndarray
    joint_probs: np.ndarray | None


def _net(net_or_result):
    return net_or_result.net if isinstance(net_or_result, AmortizedResult) else net_or_result


def _batches(data: HLSMData, batch: int):
    for lo in range(0, data.n_traces, batch):
        yield slice(lo, min(lo + batch, data.n_traces)), data.take(slice(lo, lo + batch))


def _log_q(net: Amortizer, model: str, part: HLSMData):
    """log q(r, k, u) of the steps of ``part``: float64[B, T, R, K, 2] (last axis u = 0, 1)."""
    device = next(net.parameters()).device
    log_q, off_logit = (x.to("cpu", torch.float64) for x in net(step_features(model, part, device)))
    return torch.stack([log_q + nn.functional.logsigmoid(-off_logit), log_q + nn.functional.logsigmoid(off_logit)], -1)


def amortized_posterior(net_or_result, data: HLSMData, model: str | None = None, *, batch: int = 4096,
                        joint: bool = False) -> AmortizedPosterior:
    """q's marginals, off-module probabilities and MAP for every step of ``data``, computed
    ``batch`` traces at a time. ``model`` defaults to the result's."""
    net = _net(net_or_result)
    model = net_or_result.model if model is None else model
    check_scope(model, data)
    n, t = data.step_mask.shape
    r_n, k_n = data.n_routes, data.n_skills
    out = AmortizedPosterior(np.zeros((n, t, r_n)), np.zeros((n, t, k_n)), np.zeros((n, t)),
                             np.full((n, t), -1), np.full((n, t), -1), np.zeros((n, t, r_n, k_n)) if joint else None)
    with torch.no_grad():
        for rows, part in _batches(data, batch):
            q = _log_q(net, model, part).exp()
            q_rk = q.sum(-1)
            flat = q_rk.flatten(-2).argmax(-1).numpy()
            mask = np.asarray(part.step_mask)
            out.route_probs[rows], out.skill_probs[rows] = q_rk.sum(-1).numpy(), q_rk.sum(-2).numpy()
            out.p_off[rows] = q[..., 1].sum((-2, -1)).numpy()
            out.map_route[rows], out.map_skill[rows] = np.where(mask, flat // k_n, -1), np.where(mask, flat % k_n, -1)
            if joint:
                out.joint_probs[rows] = q_rk.numpy()
    return out


def exact_log_joint(model: str, params, part: HLSMData) -> torch.Tensor:
    """The exact log p(r_t, k_t, u_t | y_t, θ) of every free step (DESIGN §4, normalized per
    step): float64[B, T, R, K, 2], -inf for u = 0 where the lengths differ."""
    with jax.enable_x64(True):  # the model's own rows and emission terms (models.data)
        route_p, skill_p, noise, off = (jnp.asarray(p, jnp.float64) for p in params)
        rows_r, rows_k = execution_rows(model, route_p, skill_p, part)
        log_on = jnp.log1p(-off) + log_p_on(part, noise)
        log_off = jnp.log(off) + log_p_off(jnp.asarray(part.length), part.n_chars, part.max_len)
        log_p = (jnp.log(rows_r)[..., :, None, None] + jnp.log(rows_k)[..., None, :, None]
                 + jnp.stack([log_on, jnp.broadcast_to(log_off[..., None, None], log_on.shape)], -1))
        log_p = log_p - jax.nn.logsumexp(log_p.reshape(log_p.shape[:2] + (-1,)), -1)[..., None, None, None]
        return torch.from_numpy(np.array(log_p))


def _kl(log_a, log_b):
    """Σ a (log a - log b) over the last axis, 0 log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def evaluate_amortized(net_or_result, data: HLSMData, params, model: str | None = None, *,
                       batch: int = 4096) -> dict:
    """q against the exact posterior over the observed steps of ``data``.

    Returns ``kl_exact_q`` and ``kl_q_exact``, the mean KL(p ‖ q) and KL(q ‖ p) per step over
    the joint (r, k, u) in nats. Both are finite: p is 0 only at u = 0 where the lengths
    differ (for θ with positive rows), and q is exactly 0 there too (``CERTAIN``); a θ with a
    zero entry makes KL(q ‖ p) infinite wherever q keeps mass the exact posterior has not,
    while KL(p ‖ q) stays finite. ``map_agreement``: the fraction of steps whose q-MAP
    (r, k) is an exact MAP (ties, such as the aliased routings at t = 1, count as agreement);
    ``map_label_agreement``: the fraction equal to the exact MAP's first-index tie-break (the
    exact ``map_route`` / ``map_skill``); ``p_exact_of_q_map``: the mean exact probability of
    q's MAP; ``p_exact_of_exact_map``: the same for the exact MAP, its ceiling; ``n_steps``."""
    net = _net(net_or_result)
    model = net_or_result.model if model is None else model
    check_scope(model, data)
    sums = dict.fromkeys(("kl_exact_q", "kl_q_exact", "map_agreement", "map_label_agreement", "p_exact_of_q_map",
                          "p_exact_of_exact_map"), 0.0)
    n_steps = 0
    with torch.no_grad():
        for _, part in _batches(data, batch):
            log_q, log_p = _log_q(net, model, part), exact_log_joint(model, params, part)
            mask = torch.from_numpy(np.asarray(part.emit))
            flat_q, flat_p = log_q.flatten(-3), log_p.flatten(-3)
            p_rk = log_p.exp().sum(-1).flatten(-2)
            q_map = log_q.exp().sum(-1).flatten(-2).argmax(-1, keepdim=True)
            p_of_q, p_max = p_rk.gather(-1, q_map)[..., 0], p_rk.max(-1).values
            per_step = {"kl_exact_q": _kl(flat_p, flat_q), "kl_q_exact": _kl(flat_q, flat_p),
                        "map_agreement": (p_of_q >= p_max * (1 - 1e-9)).double(),
                        "map_label_agreement": (q_map[..., 0] == p_rk.argmax(-1)).double(),
                        "p_exact_of_q_map": p_of_q, "p_exact_of_exact_map": p_max}
            for name, v in per_step.items():
                sums[name] += float(v[mask].sum())
            n_steps += int(mask.sum())
    return {**{k: v / max(n_steps, 1) for k, v in sums.items()}, "n_steps": n_steps}
