"""Batched sampling with a key/value cache, and generated completions as trace records.

Prompts of different lengths are left-padded; a pad position attends only to itself (so no
softmax row is empty), real positions attend to the real positions before them, and every
row's positions count from its own first real token, so a prompt completes the same way
alone or in any batch.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from latentsel.policy.model import GPT, KVCache
from latentsel.policy.tokenizer import Tokenizer
from latentsel.traces import Trace

__all__ = ["generate", "sample_traces", "completion_traces", "autocast", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, rank, ...), stable across processes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slower than fp32 here)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, width - len(p):] = True
    return idx.to(device), valid.to(device)


def _mask(valid_keys: torch.Tensor, n_query: int) -> torch.Tensor:
    """``[B, 1, n_query, T]``: causal over the last ``n_query`` keys, real keys only, plus the diagonal."""
    t = valid_keys.shape[1]
    q = torch.arange(t - n_query, t, device=valid_keys.device)[:, None]
    k = torch.arange(t, device=valid_keys.device)[None, :]
    return ((k <= q)[None] & valid_keys[:, None, :] | (k == q)[None])[:, None]


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]], budgets: Sequence[int], *, eos: int, pad: int,
             temperature: float = 0.0, generator: torch.Generator | None = None, use_cache: bool = True
             ) -> list[list[int]]:
    """Complete every prompt: greedy at ``temperature == 0``, else sampled from softmax(logits / T).

    Args:
        prompts: token ids, one list per row (any lengths).
        budgets: most tokens to generate per row; a row stops at ``eos`` or its budget.
        generator: the random stream for sampling (on the model's device).
        use_cache: ``False`` recomputes every position at every step (the reference the
            cached path is tested against).

    Returns:
        The generated tokens per row, ending with ``eos`` when the row produced one.
    """
    device = next(model.parameters()).device
    idx, valid = _left_pad(prompts, pad, device)
    b, width = idx.shape
    budget = torch.as_tensor(list(budgets), device=device)
    n_new = int(budget.max())
    lengths = valid.sum(1)
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    out = torch.full((b, n_new), pad, dtype=torch.long, device=device)
    done = budget <= 0
    cache = KVCache(model.config, width + n_new) if use_cache else None
    layout = model.config.layout
    seg = {"slots": model.slot_positions, "segment": model.segment_positions}.get(layout, lambda _: None)(idx)
    seg_now = seg[:, -1] if layout == "segment" else None
    logits = model(idx, pos, _mask(valid, width), cache, seg)[:, -1]
    for j in range(n_new):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, pad, tok)
        out[:, j] = tok
        done = done | (tok == eos) | (budget <= j + 1)
        if bool(done.all()):
            break
        keys = torch.cat([valid, torch.ones((b, j + 1), dtype=torch.bool, device=device)], 1)
        if use_cache:
            step_seg = None
            if layout == "slots":
                # a step's slot and offset depend on the whole completion so far
                step_seg = model.slot_positions(torch.cat([idx, out[:, : j + 1]], 1))[:, -1:]
            elif seg_now is not None:
                seg_now = torch.where(torch.isin(tok, model.seg_tokens), 0, seg_now + 1)
                step_seg = seg_now.clamp(max=model.config.block_size - 1)[:, None]
            logits = model(tok[:, None], (lengths + j)[:, None], _mask(keys, 1), cache, step_seg)[:, -1]
        else:
            seq = torch.cat([idx, out[:, : j + 1]], 1)
            seq_pos = torch.cat([pos, lengths[:, None] + torch.arange(j + 1, device=device)], 1)
            logits = model(seq, seq_pos, _mask(keys, keys.shape[1]))[:, -1]
    rows = out.tolist()
    completions = []
    for row, n in zip(rows, budget.tolist()):
        row = row[: max(n, 0)]
        completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


def completion_traces(prompts: Sequence[Trace], completions: Sequence[Sequence[int]], tokenizer: Tokenizer,
                      source: dict, ids: Sequence[str] | None = None) -> list[Trace]:
    """Trace records (DESIGN §3) of generated completions: the prompt's input and program, the
    parsed steps (``None`` where unreadable) and ``extra["malformed"]`` (``None`` or the reason)."""
    traces = []
    for n, (prompt, completion) in enumerate(zip(prompts, completions)):
        parsed = tokenizer.parse_completion(completion, len(prompt.program))
        tid = ids[n] if ids is not None else prompt.id
        traces.append(Trace(tid, prompt.input, list(prompt.program), parsed.steps, None, dict(source),
                            None, {"malformed": parsed.malformed}))
    return traces


def check_prompts(model: GPT, tokenizer: Tokenizer, prompts: Sequence[Trace]) -> None:
    """``ValueError`` naming the first prompt the policy cannot complete: no program, a module
    the tokenizer lacks, or a prompt and completion longer than the model's context."""
    block = model.config.block_size
    for p in prompts:
        if p.program is None:
            raise ValueError(f"prompt {p.id!r} states no program; a policy needs the intended program")
        need = len(p.input) + 2 * len(p.program) + 3 + tokenizer.completion_budget(len(p.program))
        if need > block:
            raise ValueError(f"prompt {p.id!r} (depth {len(p.program)}) needs {need} positions; "
                             f"the policy's context holds {block} (programs up to depth "
                             f"{_deepest(tokenizer, block)})")


def _deepest(tok: Tokenizer, block: int) -> int:
    depth = 0
    while tok.block_size(depth + 1) <= block:
        depth += 1
    return depth


def sample_traces(model: GPT, tokenizer: Tokenizer, prompts: Sequence[Trace], *, policy: str, checkpoint: str,
                  seed: int = 0, temperature: float = 0.0, samples: int = 1, batch_size: int = 256,
                  progress: bool = False, stats: dict | None = None) -> list[Trace]:
    """``samples`` completions of every prompt (which must state its program) as traces.

    Ids are the prompt's id, suffixed ``-s{j}`` when ``samples > 1``. The random stream of a
    batch depends on ``(seed, batch index)``, so a run is reproducible for a given batch size.
    ``stats``, when given, receives ``generated_tokens``.
    """
    from tqdm.auto import tqdm

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    check_prompts(model, tokenizer, prompts)
    device = next(model.parameters()).device
    source = {"kind": "policy", "policy": policy, "checkpoint": str(checkpoint), "seed": seed,
              "device": device.type, "temperature": temperature}
    rows = [(p, j) for p in prompts for j in range(samples)]
    was_training = model.training
    model.eval()
    traces: list[Trace] = []
    generated = 0
    try:
        bar = tqdm(total=len(rows), desc=f"sample {policy}", unit="trace", disable=not progress)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            encoded = [tokenizer.encode_prompt(p.input, p.program) for p, _ in chunk]
            budgets = [tokenizer.completion_budget(len(p.program)) for p, _ in chunk]
            gen = torch.Generator(device=device).manual_seed(derive_seed(seed, start // batch_size))
            with autocast(device):
                completions = generate(model, encoded, budgets, eos=tokenizer.eos, pad=tokenizer.pad,
                                       temperature=temperature, generator=gen)
            generated += sum(len(c) for c in completions)
            ids = [p.id if samples == 1 else f"{p.id}-s{j}" for p, j in chunk]
            traces.extend(completion_traces([p for p, _ in chunk], completions, tokenizer, source, ids))
            bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)
    if stats is not None:
        stats["generated_tokens"] = generated
    return traces
