"""Accuracy of policies on the evaluation splits, per depth, with Wilson 95% intervals.

A completion is correct when it is well formed and its final step equals the golden answer.
The accuracy *at depth t* is the fraction whose first ``t`` steps all equal the golden ones:
the prefix of a program is itself a depth-``t`` program run on the same input, so one split
gives the accuracy at every depth up to its own.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

from latentsel._io import atomic_open
from latentsel.policy import COMPETENT
from latentsel.traces import Trace, write_traces
from latentsel.traces.regimes import PROMPT_REGIMES, bigram_split, generate
from latentsel.world import World, default_world

__all__ = ["SPLITS", "COMPETENT", "wilson", "score", "evaluate", "markdown_table", "check_policy_name", "trace_path"]

SPLITS = ("eval-seen", "eval-unseen", "eval-ood")
"""Teacher-forced per-step accuracy on eval-seen at which a policy counts as competent (DESIGN §7)."""
_Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the bounds are exactly 0 (k = 0) and 1 (k = n); the subtraction would leave rounding error
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def _cell(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": [lo, hi]}


def score(traces: Sequence[Trace], golden: Sequence[Trace]) -> dict:
    """Accuracy of ``traces`` against the golden traces of the same prompts (matched by position).

    Returns ``{"depth", "n", "correct", "accuracy", "ci95", "malformed", "by_depth": [...]}``;
    ``by_depth[t - 1]`` is the cell of prefix accuracy at depth ``t``.
    """
    if len(traces) != len(golden):
        raise ValueError(f"{len(traces)} traces for {len(golden)} golden traces")
    depth = max((len(g.steps) for g in golden), default=0)
    prefix = [0] * depth
    counts = [0] * depth
    correct = malformed = 0
    for t, g in zip(traces, golden):
        if t.input != g.input or len(t.steps) != len(g.steps):
            raise ValueError(f"trace {t.id!r} does not answer the prompt {g.id!r}")
        bad = t.extra.get("malformed")
        malformed += bad is not None
        correct += bad is None and t.steps[-1] == g.steps[-1]
        ok = True
        for i, (s, ref) in enumerate(zip(t.steps, g.steps)):
            ok = ok and s == ref
            counts[i] += 1
            prefix[i] += ok
    out = _cell(correct, len(traces))
    out.update(depth=depth, malformed=malformed, by_depth=[dict(_cell(prefix[i], counts[i]), depth=i + 1)
                                                         for i in range(depth)])
    return out


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def check_policy_name(name: str) -> str:
    """A policy name becomes part of file names: letters, digits and ``_ . + -``, no path."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"policy name {name[:80]!r} must be 1-64 letters, digits or '_.+-', start with a "
                         f"letter or digit and hold no '..' (it names files under --out)")
    return name


def trace_path(out: str | os.PathLike, name: str, split: str) -> Path:
    """``out/traces/{name}.{split}.jsonl.gz``, where ``evaluate`` writes a policy's completions.

    ValueError for a name that is not a plain file-name part (:func:`check_policy_name`) and for a
    target that resolves outside ``out`` (a link under it pointing elsewhere): nothing is ever
    written outside ``--out``.
    """
    check_policy_name(name)
    out = Path(out)
    target = out / "traces" / f"{name}.{split}.jsonl.gz"
    resolved, root = target.resolve(), out.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"the trace file of policy {name!r} on {split}, {target}, resolves to {resolved}, "
                         f"outside --out {out}")
    return target


def evaluate(policies: dict[str, str | os.PathLike], out: str | os.PathLike, *, n: int = 1000, seed: int = 1,
             split_seed: int = 0, splits: Sequence[str] = SPLITS, device: str | None = None,
             batch_size: int = 256, temperature: float = 0.0, save_traces: bool = False,
             title: str | None = None, progress: bool = True, world: World | None = None) -> dict:
    """Score every checkpoint of ``policies`` (name -> path) on ``n`` prompts of every split.

    Writes ``out/eval.json`` and ``out/eval.md`` (and, with ``save_traces``, the completions as
    ``out/traces/{policy}.{split}.jsonl.gz``); returns the JSON record.
    """
    # torch loads when policies are scored, not when the tables are read or printed
    from latentsel.policy.checkpoint import load_policy
    from latentsel.policy.distributed import pick_device
    from latentsel.policy.probe import teacher_forced
    from latentsel.policy.sampling import sample_traces

    world = world or default_world()
    for name in policies:
        check_policy_name(name)
    for s in splits:
        if s not in PROMPT_REGIMES:
            raise ValueError(f"unknown split {str(s)[:80]!r}; choose from {', '.join(PROMPT_REGIMES)}")
    if save_traces:  # refused before any policy runs; checked again as each file is written
        for name in policies:
            for s in splits:
                trace_path(out, name, s)
    split = bigram_split(world.n_skills, split_seed)
    prompts = {s: generate(s, n, seed, world=world, split=split) for s in splits}
    dev = pick_device(device)
    out = Path(out)
    record = {"device": dev.type, "n_per_split": n, "seed": seed, "split_seed": split_seed,
              "decoding": "greedy" if temperature == 0 else f"temperature {temperature}",
              "title": title, "policies": {}}
    # teacher-forced per-step accuracy on eval-seen: has the policy learned its modules?
    seen = prompts.get("eval-seen") or generate("eval-seen", n, seed, world=world, split=split)
    for name, path in policies.items():
        model, tok, ckpt = load_policy(path, dev, world=world)
        entry = {"checkpoint": str(path), "trained_steps": ckpt["step"], "splits": {},
                 "teacher_forced": teacher_forced(model, tok, seen, batch_size=batch_size)}
        for s in splits:
            traces = sample_traces(model, tok, prompts[s], policy=name, checkpoint=str(path), seed=seed,
                                   temperature=temperature, batch_size=batch_size, progress=progress)
            entry["splits"][s] = score(traces, prompts[s])
            if save_traces:
                write_traces(trace_path(out, name, s), traces, world=world)
        record["policies"][name] = entry
    with atomic_open(out / "eval.json", "w") as f:
        json.dump(record, f, indent=1)
    with atomic_open(out / "eval.md", "w") as f:
        f.write(markdown_table(record))
    return record


def _pct(cell: dict) -> str:
    if cell["accuracy"] is None:
        return "n/a"
    lo, hi = cell["ci95"]
    return f"{100 * cell['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_table(record: dict) -> str:
    """The paper-shaped table (policy x split, final-answer accuracy), then accuracy by depth."""
    policies = record["policies"]
    splits = list(next(iter(policies.values()))["splits"]) if policies else []
    title = record.get("title") or "Compositional generalization"
    under = [name for name, e in policies.items()
             if e.get("teacher_forced") and e["teacher_forced"]["step"]["acc"] < COMPETENT]
    if under:
        title += f" (under-trained: {', '.join(under)} below {COMPETENT:.0%} teacher-forced per-step accuracy)"
    lines = [f"# {title}", "",
             f"Exact-match accuracy of the final answer, {record['decoding']} decoding, {record['n_per_split']} "
             f"prompts per split, device {record['device']}; 95% Wilson intervals in brackets.", ""]

    def header(cols):
        lines.append("| policy | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))

    header([f"{s} (depth {policies[next(iter(policies))]['splits'][s]['depth']})" for s in splits] if policies else [])
    for name, entry in policies.items():
        lines.append(f"| {name} | " + " | ".join(_pct(entry["splits"][s]) for s in splits) + " |")
    probes = {name: e["teacher_forced"] for name, e in policies.items() if e.get("teacher_forced")}
    if probes:
        positions = sorted({t for p in probes.values() for t in p["by_position"]}, key=int)
        lines += ["", "## Teacher-forced accuracy on eval-seen (golden earlier steps given)", "",
                  f"A step is right when greedy decoding reproduces it and its terminator; a policy is "
                  f"competent at {COMPETENT:.0%} per step.", ""]
        header(["per step"] + [f"step {t}" for t in positions] + ["stop", "all steps"])
        for name, p in probes.items():
            cells = [p["step"]] + [p["by_position"].get(t, {"acc": None}) for t in positions] + [p["stop"], p["answer"]]
            lines.append(f"| {name} | " + " | ".join("n/a" if c["acc"] is None else f"{100 * c['acc']:.1f}%"
                                                      for c in cells) + " |")
        for key, what in (("by_skill", "skill"), ("by_route", "routing")):
            names = sorted({k for p in probes.values() for k in p[key]})
            lines += ["", f"### Teacher-forced per-step accuracy by intended {what} (eval-seen)", "",
                      f"| {what} | " + " | ".join(probes) + " |", "|---|" + "---|" * len(probes)]
            for k in names:
                cells = [p[key].get(k, {"acc": None, "n": 0}) for p in probes.values()]
                lines.append(f"| {k} | " + " | ".join("n/a" if c["acc"] is None else f"{100 * c['acc']:.1f}% ({c['n']})"
                                                      for c in cells) + " |")
    for s in splits:
        depth = max(entry["splits"][s]["depth"] for entry in policies.values())
        lines += ["", f"## {s}: accuracy at depth t (first t steps all correct)", ""]
        header([f"t = {t}" for t in range(1, depth + 1)] + ["malformed"])
        for name, entry in policies.items():
            cell = entry["splits"][s]
            lines.append(f"| {name} | " + " | ".join(_pct(c) for c in cell["by_depth"]) + f" | {cell['malformed']} |")
    return "\n".join(lines) + "\n"
