"""Simulation from the HLSM at given parameters: traces with ``truth``.

For each prompt (input and intended program) and step t: draw the executed routing and
skill from the model's rows, the off-module flag from ``off_module``; an on-module step
is the module's output with each character replaced, with probability ``noise``, by a
uniformly drawn *other* character; an off-module step has a length uniform on
0..MAX_LEN and uniform characters. The history is teacher-forced (``h_t = y_t``).

Hidden steps (``hide``) follow the model's definition exactly: a hidden step is on-module
and noise-free, and its history entry, for every later step, is the executed module's output.
They are checked against every prompt first (:func:`hidden_steps`): a step beyond a prompt's
depth, or hidden steps a fit could not read back, are an error, never a file ``fit`` refuses.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from latentsel.models.registry import model_spec, validate_params
from latentsel.traces import Trace, Truth
from latentsel.traces.format import echo, hidden_run_error
from latentsel.world import World

__all__ = ["simulate", "hidden_steps"]


def hidden_steps(hide: Sequence[int], prompts: Sequence[Trace], name: str = "hide") -> frozenset[int]:
    """The 0-based steps of the 1-based ``hide``, checked against every prompt.

    Raises ValueError naming ``name`` (the argument, e.g. ``--hide``) and the first prompt for
    which a step is 0, beyond the prompt's depth, or one of a run of hidden steps the trace
    reader and ``fit`` refuse (:func:`~latentsel.traces.format.hidden_run_error`).
    """
    hidden = frozenset(int(t) - 1 for t in hide)
    if any(t < 0 for t in hidden):
        raise ValueError(f"{name}: steps are numbered from 1, got {sorted(hide)}")
    if not hidden:
        return hidden
    for p in prompts:
        beyond = [t + 1 for t in sorted(hidden) if t >= p.depth]
        if beyond:
            raise ValueError(f"{name} {beyond[0]}: trace {echo(p.id)} has {p.depth} steps")
        reason = hidden_run_error([None if t in hidden else "" for t in range(p.depth)])
        if reason is not None:
            raise ValueError(f"{name} {' '.join(str(t + 1) for t in sorted(hidden))}: trace {echo(p.id)}: {reason}")
    return hidden


def simulate(prompts: Sequence[Trace], params, model: str, world: World, seed: int = 0,
             source: dict | None = None, hide: Sequence[int] = ()) -> list[Trace]:
    """One simulated trace per prompt (``prompts`` need ``input`` and, except for ``grammar``,
    ``program``; a grammar prompt's depth is its number of steps). ``hide``: 1-based steps
    to leave unobserved, each within every prompt's depth (:func:`hidden_steps`)."""
    params = validate_params(params, model, world.n_routes, world.n_skills)
    spec = model_spec(model)
    hidden = hidden_steps(hide, prompts)
    rng = np.random.default_rng(seed)
    r_n, k_n, a_n = world.n_routes, world.n_skills, world.n_chars
    out = []
    for p in prompts:
        if spec.uses_program and p.program is None:
            raise ValueError(f"prompt {p.id!r} states no program; the {model} model needs one")
        prog = [(world.route_index(r), world.skill_index(k)) for r, k in p.program] if p.program else None
        history, steps, routes, skills, offs = [p.input], [], [], [], []
        prev_r, prev_k = r_n, k_n
        for t in range(p.depth):
            route_p, skill_p = params[0], params[1]
            if spec.chain:
                pr, pk = route_p[prev_r], skill_p[prev_k]
            elif spec.context:
                cr, ck = prog[t]
                xr, xk = (r_n, k_n) if t == 0 else prog[t - 1]
                pr, pk = route_p[xr, cr], skill_p[xk, ck]
            else:
                pr, pk = route_p[prog[t][0]], skill_p[prog[t][1]]
            r, k = int(rng.choice(r_n, p=pr)), int(rng.choice(k_n, p=pk))
            off = bool(rng.random() < params.off_module) and t not in hidden
            if t in hidden:
                y = world.apply(r, k, history)
            elif off:
                y = "".join(world.alphabet[c] for c in rng.integers(a_n, size=rng.integers(world.max_len + 1)))
            else:
                codes = [world.char_index(c) for c in world.apply(r, k, history)]
                flip = rng.random(len(codes)) < params.noise
                shift = rng.integers(1, a_n, size=len(codes))
                y = "".join(world.alphabet[(c + s) % a_n if f else c] for c, f, s in zip(codes, flip, shift))
            steps.append(None if t in hidden else y)
            history.append(y)
            routes.append(world.routes[r].name)
            skills.append(world.skills[k].name)
            offs.append(off)
            prev_r, prev_k = r, k
        src = {"kind": "simulated", "model": model, "seed": seed, **(source or {})}
        out.append(Trace(p.id, p.input, p.program, steps, None, src, Truth(tuple(routes), tuple(skills), tuple(offs))))
    return out
