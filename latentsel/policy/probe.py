"""Teacher-forced per-step accuracy: has a policy learned its modules?

Given the prompt and the golden steps before step t, the policy gets step t right when greedy
decoding reproduces it, terminator included (``<sep>``, or ``<eos>`` after the last step).
Greedy decoding reproduces a segment exactly when the arg-max next token equals the golden
token at every position of the segment, so one teacher-forced forward pass over the golden
completion scores every step of every prompt at once. The ``<eos>`` after the last step is the
*stop*: whether the policy ends where the program ends.

Measured per step position, per intended skill and per intended routing of the step, with
counts, so a table can say which modules are learned and which are not (DESIGN §7 calls a
policy *competent* at ≥ 90% on eval-seen).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from latentsel.policy import COMPETENT
from latentsel.policy.data import collate, sft_pairs
from latentsel.policy.sampling import autocast
from latentsel.policy.tokenizer import Tokenizer
from latentsel.traces import Trace

__all__ = ["teacher_forced", "COMPETENT"]

def _rate(hits: int, n: int) -> dict:
    return {"acc": hits / n if n else None, "n": n}


@torch.no_grad()
def teacher_forced(model, tok: Tokenizer, traces: Sequence[Trace], *, batch_size: int = 256) -> dict:
    """Teacher-forced accuracy of ``model`` on golden ``traces`` (fully observed, with programs).

    Returns ``{"step": {acc, n}, "by_position": {t: {acc, n}}, "by_skill": {name: ...},
    "by_route": {name: ...}, "stop": {acc, n}, "answer": {acc, n}}``: ``step`` over every step,
    ``by_position`` keyed 1..L, ``answer`` the traces whose every step is right (the final
    answer under teacher forcing), ``stop`` the ``<eos>`` after the last step.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pos, skill, route = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    stop = [0, 0]
    answer = [0, 0]
    pairs = sft_pairs(traces, tok)
    try:
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo: lo + batch_size]
            batch = collate(chunk, tok.pad, device)
            with autocast(device):
                logits = model(batch.inputs)
            right = (logits.argmax(-1) == batch.targets).cpu().numpy()
            for i, (prompt, completion) in enumerate(chunk):
                tr = traces[lo + i]
                # target index of completion token j is len(prompt) - 1 + j
                ok = right[i, len(prompt) - 1: len(prompt) - 1 + len(completion)]
                ends = [j for j, t in enumerate(completion) if t in (tok.sep, tok.eos)]
                start, all_ok = 0, True
                for t, end in enumerate(ends):
                    hit = bool(ok[start: end + 1].all())
                    all_ok &= hit
                    r_name, k_name = tr.program[t]
                    for table, key in ((pos, t + 1), (skill, k_name), (route, r_name)):
                        table[key][0] += hit
                        table[key][1] += 1
                    start = end + 1
                stop[0] += bool(ok[ends[-1]])
                stop[1] += 1
                answer[0] += all_ok
                answer[1] += 1
    finally:
        model.train(was_training)
    steps = np.array([v for v in pos.values()]).sum(axis=0) if pos else np.zeros(2, int)
    return {
        "step": _rate(int(steps[0]), int(steps[1])),
        "by_position": {str(k): _rate(*pos[k]) for k in sorted(pos)},
        "by_skill": {k: _rate(*skill[k]) for k in sorted(skill)},
        "by_route": {k: _rate(*route[k]) for k in sorted(route)},
        "stop": _rate(*stop),
        "answer": _rate(*answer),
    }
