"""A fitted corpus as a labelled value (:class:`Fit`) and its files.

A :class:`Fit` holds the estimate, every step's posterior (:class:`StepPosterior`), the world
whose names label them, and the uncertainty of the estimate: the NUTS draws for ``nuts``, the
conjugate posterior at the estimate otherwise. :meth:`Fit.save` writes ``fit.json``,
``posterior.jsonl`` (and ``samples.npz`` for nuts) as a set; :func:`load_fit` reads them back,
every number exact.

``fit.json`` (schema 2) holds the DESIGN §8 keys (``model``, ``method``, ``params``,
``log_evidence``) and ``schema``, ``backend``, ``n_traces``, ``options``, ``world`` (its
alphabet, ``max_len`` and the routing and skill names the arrays are indexed by),
``conjugate`` (the Dirichlet and Beta concentrations of q(θ), when there are no draws), ``files``
(the size and SHA-256 of ``posterior.jsonl`` and ``samples.npz``: :func:`load_fit` refuses a
folder whose files are not these, as a killed run leaves it) and what the method reports
(iterations, losses, NUTS diagnostics, ...). ``posterior.jsonl``: one object
per trace, ``{"id", "log_evidence", "steps": [{"map_route", "map_skill", "p_off", "route_probs",
"skill_probs"}]}``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from latentsel._io import atomic_open, digest, discard, locked_folder
from latentsel.analysis.options import METHODS, EMOptions, FitOptions
from latentsel.inference.conjugate import ConjugatePosterior
from latentsel.models.registry import model_spec, params_class, validate_params
from latentsel.world import World, default_world

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Fit", "StepPosterior", "load_fit", "read_params", "params_to_json", "SCHEMA"]

SCHEMA = 2


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


class StepPosterior(NamedTuple):
    """Every step's posterior, labelled (N traces, T = the longest depth; entries past a
    trace's depth are 0, and -1 for the MAP).

    Attributes:
        log_evidence: [N], log p(D_n | θ̂).
        route_probs: [N, T, R], p(r_t = r | D, θ̂); skill_probs: [N, T, K].
        p_off: [N, T], p(u_t = 1 | D, θ̂).
        map_route, map_skill: [N, T], the MAP selections (indices into the names).
        depth: [N], the steps of each trace.
        trace_ids: the N trace ids; route_names, skill_names: the world's names.
    """

    log_evidence: np.ndarray
    route_probs: np.ndarray
    skill_probs: np.ndarray
    p_off: np.ndarray
    map_route: np.ndarray
    map_skill: np.ndarray
    depth: np.ndarray
    trace_ids: tuple
    route_names: tuple
    skill_names: tuple

    @classmethod
    def of(cls, post, log_evidence, trace_ids: Sequence[str], depth: Sequence[int], world: World) -> "StepPosterior":
        """Label the marginals of an exact (or amortized) posterior; ``log_evidence``: [N], exact.
        Entries past a trace's depth are set to 0 (-1 for the MAP), whatever the source put there."""
        depth = np.asarray(depth, dtype=np.int64)
        arrays = [np.array(getattr(post, name)) for name in cls._fields[1:6]]
        past = np.arange(arrays[0].shape[1])[None, :] >= depth[:, None]  # [N, T]
        for a, fill in zip(arrays, (0.0, 0.0, 0.0, -1, -1)):
            a[past] = fill
        return cls(np.asarray(log_evidence), *arrays, depth, tuple(str(i) for i in trace_ids),
                   tuple(world.route_names), tuple(world.skill_names))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: ``trace_id``, ``step`` (1-based), ``map_route``, ``map_skill``, their
        posterior probabilities ``p_map_route`` / ``p_map_skill``, and ``p_off``."""
        n, t = np.nonzero(np.arange(self.route_probs.shape[1])[None, :] < self.depth[:, None])
        r, k = self.map_route[n, t], self.map_skill[n, t]
        import pandas as pd  # tables alone need pandas: not every command pays its import
        return pd.DataFrame({
            "trace_id": np.asarray(self.trace_ids, dtype=object)[n], "step": t + 1,
            "map_route": np.asarray(self.route_names, dtype=object)[r],
            "map_skill": np.asarray(self.skill_names, dtype=object)[k],
            "p_map_route": self.route_probs[n, t, r], "p_map_skill": self.skill_probs[n, t, k], "p_off": self.p_off[n, t],
        })


class Fit(NamedTuple):
    """A corpus fitted by one method.

    Attributes:
        model: the model's name.
        options: the method's options (:mod:`latentsel.analysis.options`); ``options.method``
            and ``options.backend`` name the method and the backend.
        params: the estimate θ̂, the model's parameter NamedTuple (the posterior mean for nuts).
        posterior: every step's posterior, a :class:`StepPosterior`: exact at θ̂, or the
            inference network's for ``amortized``; ``None`` for a streamed or sharded fit
            (:func:`~latentsel.analysis.fitting.fit_corpus`).
        log_evidence: Σ_n log p(D_n | θ̂), exact.
        n_traces: the number of traces fitted.
        summary: what the method reports, JSON-ready (iterations, losses, NUTS diagnostics, ...).
        world: the world whose routing and skill names label the arrays.
        draws: nuts: the posterior draws, the parameter NamedTuple with fields
            ``[chains, draws, ...]``; else ``None``.
        conjugate: without draws, the conjugate posterior q(θ) at θ̂
            (:func:`~latentsel.inference.conjugate.conjugate_posterior`), the intervals of
            :meth:`execution_table`; else ``None``.
        result: the method's own result (EM, SVI, MCMC or amortized), ``None`` once loaded.
    """

    model: str
    options: FitOptions
    params: tuple
    posterior: StepPosterior
    log_evidence: float
    n_traces: int
    summary: dict
    world: World
    draws: tuple | None = None
    conjugate: ConjugatePosterior | None = None
    result: object = None

    @property
    def method(self) -> str:
        return self.options.method

    def record(self) -> dict:
        """The ``fit.json`` object."""
        world = self.world
        rec = {"schema": SCHEMA, "model": self.model, "method": self.method, "backend": self.options.backend,
               "params": params_to_json(self.params), "log_evidence": self.log_evidence, "n_traces": self.n_traces,
               "options": _options_json(self.options),
               "world": {"alphabet": world.alphabet, "max_len": world.max_len, "routes": world.route_names,
                         "skills": world.skill_names}}
        if self.conjugate is not None:
            rec["conjugate"] = _conjugate_json(self.conjugate)
        return {**rec, **self.summary}

    def execution_table(self, level: float = 0.9) -> pd.DataFrame:
        """Intended → executed, labelled: one row per entry of the routing and skill arrays.

        Columns: ``kind`` (``"route"`` / ``"skill"``), the row's labels (``intended`` and
        ``executed``; the entangled model adds ``context``, the previous step's intended module or
        ``"start"``; the grammar chain has ``previous`` and ``executed``), ``prob`` (θ̂'s entry),
        ``sd`` and a central ``level`` interval ``lower``/``upper``: the NUTS draws' quantiles, or
        the marginal Beta of the conjugate posterior at θ̂. The conjugate intervals are exact when
        every step's module is identified; where modules alias they are too narrow (the data
        cannot tell the aliased entries apart, see ``latentsel identify``).
        """
        import pandas as pd  # tables alone need pandas: not every command pays its import
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        spec = model_spec(self.model)
        lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
        frames = []
        for kind, names, field in (("route", self.world.route_names, 0), ("skill", self.world.skill_names, 1)):
            prob = np.asarray(self.params[field])
            if self.draws is not None:
                d = np.asarray(self.draws[field]).reshape(-1, *prob.shape)
                sd, lower, upper = d.std(0), np.quantile(d, lo_q, axis=0), np.quantile(d, hi_q, axis=0)
            elif self.conjugate is not None:
                a = np.asarray(self.conjugate[1 + field], dtype=np.float64)
                a0 = a.sum(-1, keepdims=True)
                m = a / a0
                sd = np.sqrt(m * (1 - m) / (a0 + 1))
                from scipy.stats import beta as beta_dist  # scipy.stats takes a second to import: only here

                lower, upper = beta_dist.ppf(lo_q, a, a0 - a), beta_dist.ppf(hi_q, a, a0 - a)
            else:
                sd = lower = upper = np.full(prob.shape, np.nan)
            labels = {"context": list(names) + ["start"], "previous": list(names) + ["start"],
                      "intended": list(names), "executed": list(names)}
            index = np.indices(prob.shape).reshape(prob.ndim, -1)
            frame = {"kind": kind}
            for dim, axis in zip(spec.row_dims, index):
                frame[dim] = np.asarray(labels[dim], dtype=object)[axis]
            frame.update(prob=prob.ravel(), sd=sd.ravel(), lower=lower.ravel(), upper=upper.ravel())
            frames.append(pd.DataFrame(frame))
        return pd.concat(frames, ignore_index=True)

    def to_inference_data(self, traces, *, chains: int = 2, draws: int = 200, seed: int = 0):
        """ArviZ InferenceData of the fit on its ``traces`` (named dims ``intended_route``,
        ``executed_route``, …, ``trace_id``): the NUTS draws, or ``chains x draws`` draws of
        the conjugate posterior."""
        # ArviZ loads only when asked for: the one module that talks to it
        from latentsel.analysis import diagnostics
        from latentsel.traces.emission import build_data

        data = build_data(traces, self.world, model=self.model)
        ids = [tr.id for tr in traces]
        if self.draws is not None:
            return diagnostics.to_inference_data(self.model, data, self.draws, self.world, trace_ids=ids)
        return diagnostics.from_conjugate(self.model, data, self.params, self.world, trace_ids=ids, chains=chains,
                                          draws=draws, seed=seed)

    def save(self, out: str | os.PathLike, *, lock: bool = True) -> Path:
        """Write ``out/posterior.jsonl``, with draws ``out/samples.npz``, and ``out/fit.json``
        last, as a set: each atomically, under :func:`~latentsel._io.locked_folder` (a second
        writer of ``out`` fails at once), and ``fit.json`` records the size and SHA-256 of the
        others (``files``), so that :func:`load_fit` refuses a posterior or draws that are not
        its own (a run killed between the files). ``lock=False``: the caller holds the folder's
        lock already (``latentsel fit`` takes it before fitting). Returns ``out``."""
        out = Path(out)
        post, world = self.posterior, self.world
        lines = []
        if post is not None:
            # Python lists once (tolist), not a float() per number; json.dumps escapes every id
            # (line separators, lone surrogates) and writes -inf as the reader reads it
            routes, skills = world.route_names, world.skill_names
            map_route, map_skill, p_off = post.map_route.tolist(), post.map_skill.tolist(), post.p_off.tolist()
            route_probs, skill_probs = post.route_probs.tolist(), post.skill_probs.tolist()
            evidence, depth = post.log_evidence.tolist(), post.depth.tolist()
            for i, tid in enumerate(post.trace_ids):
                steps = [{"map_route": routes[map_route[i][t]], "map_skill": skills[map_skill[i][t]],
                          "p_off": p_off[i][t], "route_probs": route_probs[i][t], "skill_probs": skill_probs[i][t]}
                         for t in range(int(depth[i]))]
                lines.append(json.dumps({"id": tid, "log_evidence": evidence[i], "steps": steps}) + "\n")
        # a streamed or sharded fit has no per-step posterior (fit_corpus)
        files = {} if post is None else {"posterior.jsonl": "".join(lines).encode("utf-8")}
        if self.draws is not None:
            extra = {}
            if self.result is not None and hasattr(self.result, "diverging"):
                r = self.result
                extra = dict(diverging=r.diverging, accept_prob=r.accept_prob, num_steps=r.num_steps,
                             potential_energy=r.potential_energy, step_size=r.step_size)
            buf = io.BytesIO()
            np.savez(buf, **dict(zip(self.draws._fields, map(np.asarray, self.draws))), **extra)
            files["samples.npz"] = buf.getvalue()
        with locked_folder(out) if lock else contextlib.nullcontext():
            for name, data in files.items():
                with atomic_open(out / name, "wb") as f:
                    f.write(data)
            if post is None:
                discard(out / "posterior.jsonl")  # a previous fit's posterior is not this fit's
            if self.draws is None:
                discard(out / "samples.npz")  # a previous fit's draws (and killed writes of them) are not this fit's
            with atomic_open(out / "fit.json") as f:
                json.dump({**self.record(), "files": {name: digest(data) for name, data in files.items()}}, f,
                          indent=1)
        return out


_Q_FIELDS = ("route", "skill", "noise", "off_module")


def _conjugate_json(q: ConjugatePosterior) -> dict:
    out = {k: np.asarray(getattr(q, k)).tolist() for k in _Q_FIELDS}
    if q.prior is not None:
        out["prior"] = _conjugate_json(q.prior)
    return out


def _conjugate_from_json(model: str, c: dict) -> ConjugatePosterior:
    prior = _conjugate_from_json(model, c["prior"]) if "prior" in c else None
    return ConjugatePosterior(model, *(np.asarray(c[k], dtype=np.float64) for k in _Q_FIELDS), prior)


def _options_json(options) -> dict:
    return {name: (_options_json(v) if isinstance(v, tuple) and hasattr(v, "_fields") else v)
            for name, v in options._asdict().items()}


_RECORD_KEYS = {"schema", "model", "method", "backend", "params", "log_evidence", "n_traces", "options", "world",
                "conjugate", "files"}


def load_fit(path: str | os.PathLike, world: World | None = None) -> Fit:
    """The :class:`Fit` that :meth:`Fit.save` (or ``latentsel fit``) wrote to ``path``, every
    number as it was. ``world``: the world it was fitted in (default: the default world); its
    names must be the ones ``fit.json`` lists. ``ValueError`` when ``posterior.jsonl`` or
    ``samples.npz`` is not the one ``fit.json`` was written with (another run's, or a run killed
    between the files)."""
    path = Path(path)
    world = default_world() if world is None else world
    fit_json = path / "fit.json"
    try:
        rec = json.loads(fit_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{fit_json}: no such file (a folder written by `latentsel fit` or Fit.save)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{fit_json}: not a JSON file ({e})") from None
    if rec.get("schema") != SCHEMA:
        raise ValueError(f"{fit_json}: schema {rec.get('schema')!r}, this version reads schema {SCHEMA}; "
                         "fit the traces again to write one")
    names = rec["world"]
    if (names["routes"], names["skills"]) != (world.route_names, world.skill_names):
        raise ValueError(f"{fit_json}: fitted in a world with other routing or skill names than the one given; "
                         "pass the world it was fitted in (world=...)")
    model, method = rec["model"], rec["method"]
    params = read_params(fit_json, model, world)
    opts = dict(rec["options"])
    if "em" in opts:
        opts["em"] = EMOptions(**opts["em"])
    options = METHODS[method](**opts)
    draws = conjugate = None
    if method == "nuts":
        try:
            with np.load(io.BytesIO(_member(path, rec, "samples.npz"))) as z:
                draws = params.__class__(*(z[name] for name in params._fields))
        except KeyError as e:
            raise ValueError(f"{path / 'samples.npz'}: the draws of this nuts fit are missing ({e})") from None
    if "conjugate" in rec:
        conjugate = _conjugate_from_json(model, rec["conjugate"])
    posterior = (None if "posterior.jsonl" not in rec.get("files", {"posterior.jsonl": None})
                 else _read_posterior(_member(path, rec, "posterior.jsonl"), world))
    summary = {k: v for k, v in rec.items() if k not in _RECORD_KEYS}
    return Fit(model, options, params, posterior, rec["log_evidence"], rec["n_traces"], summary, world, draws,
               conjugate)


def _member(path: Path, rec: dict, name: str) -> bytes:
    """The content of ``path/name``, one of the set that ``fit.json`` (``rec``) lists: a file whose
    size or SHA-256 is not the listed one was not written with this fit.json. A fit.json without
    ``files`` (an earlier version's) is taken at its word."""
    try:
        data = (path / name).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: {name} is missing beside fit.json: the run was killed, or the file removed"
                         ) from None
    if "files" in rec and rec["files"].get(name) != digest(data):
        raise ValueError(f"{path}: {name} does not belong to fit.json: written by another run, or the run was killed")
    return data


def _read_posterior(data: bytes, world: World) -> StepPosterior:
    route_of = {name: i for i, name in enumerate(world.route_names)}
    skill_of = {name: i for i, name in enumerate(world.skill_names)}
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    n, t_max = len(rows), max((len(r["steps"]) for r in rows), default=0)
    r_n, k_n = world.n_routes, world.n_skills
    route_probs, skill_probs = np.zeros((n, t_max, r_n)), np.zeros((n, t_max, k_n))
    p_off, map_route, map_skill = np.zeros((n, t_max)), np.full((n, t_max), -1), np.full((n, t_max), -1)
    for i, row in enumerate(rows):
        for t, step in enumerate(row["steps"]):
            route_probs[i, t], skill_probs[i, t] = step["route_probs"], step["skill_probs"]
            p_off[i, t] = step["p_off"]
            map_route[i, t], map_skill[i, t] = route_of[step["map_route"]], skill_of[step["map_skill"]]
    return StepPosterior(np.array([r["log_evidence"] for r in rows], dtype=np.float64), route_probs, skill_probs,
                         p_off, map_route, map_skill, np.array([len(r["steps"]) for r in rows], dtype=np.int64),
                         tuple(r["id"] for r in rows), tuple(world.route_names), tuple(world.skill_names))
