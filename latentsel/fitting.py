"""Fitting a trace file and writing the results (DESIGN §8): ``fit.json`` and ``posterior.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from latentsel._io import atomic_open
from latentsel.api import exact
from latentsel.emission import build_data
from latentsel.inference.em import fit_em
from latentsel.models.params import params_class, validate_params
from latentsel.traces import Trace
from latentsel.world import World

__all__ = ["fit_traces", "write_fit", "read_params", "params_to_json"]

METHODS = ("em",)


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


def fit_traces(traces: Sequence[Trace], world: World, model: str = "modular", method: str = "em",
               *, max_iter: int = 500, tol: float = 1e-8, progress: bool = True) -> dict:
    """Fit a corpus; returns a dict with the fitted params, the exact posterior and the fit record."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    params_class(model)
    data = build_data(traces, world, model=model)
    bar = tqdm(total=max_iter, desc=f"EM ({model})", unit="it", disable=not progress, leave=False)

    def tick(it, j):
        bar.update(1)
        bar.set_postfix(objective=f"{j:.6g}")

    try:
        result = fit_em(model, data, max_iter=max_iter, tol=tol, progress=tick)
    finally:
        bar.close()
    post = exact(data, result.params, model)
    record = {
        "model": model,
        "method": method,
        "params": params_to_json(result.params),
        "log_evidence": float(post.log_evidence.sum()),
        "n_traces": len(traces),
        "iterations": len(result.objective),
        "converged": bool(result.converged),
        "objective": [float(j) for j in result.objective],
    }
    return {"params": result.params, "posterior": post, "record": record}


def write_fit(out: str | Path, traces: Sequence[Trace], fit: dict, world: World) -> None:
    """Write ``out/fit.json`` and ``out/posterior.jsonl`` (each atomically)."""
    out = Path(out)
    post = fit["posterior"]
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
    with atomic_open(out / "fit.json") as f:
        json.dump(fit["record"], f, indent=1)
