"""SFT and group-relative RL training, single-process or data-parallel under ``torchrun``.

A run writes to its folder ``out/``: ``checkpoint.pt`` (every ``checkpoint_every`` steps and at
the end, atomically), ``metrics.jsonl`` (one object per logged step) and ``train.json`` (the
config and the throughput at the end). Started again on the same folder, a run resumes from the
checkpoint; since every step draws its batch and its random stream from ``(seed, step, rank)``,
the resumed run ends where an uninterrupted one would.

    latentsel train sft --out runs/sft ...                  # see ``latentsel train --help``
    torchrun --nproc_per_node=N -m latentsel train sft --out runs/sft ...
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from latentsel._io import atomic_open
from latentsel.policy import distributed
from latentsel.policy.checkpoint import CheckpointError, load_checkpoint, load_policy, save_checkpoint
from latentsel.policy.data import POOL_REGIMES, PromptStream, collate, prompt_pool, sft_pairs
from latentsel.policy.losses import group_advantages, grpo_loss, sft_loss, token_logprobs
from latentsel.policy.model import GPT, PRESETS, GPTConfig
from latentsel.policy.probe import COMPETENT, teacher_forced
from latentsel.policy.sampling import autocast, derive_seed, generate
from latentsel.policy.tokenizer import Tokenizer
from latentsel.world import default_world

__all__ = ["TrainConfig", "train", "lr_at"]

# fields that may differ when a run is resumed: where and how it runs, not what it computes
_RUN_FIELDS = {"out", "checkpoint_every", "log_every", "compile", "device", "eval_every", "eval_prompts", "workers"}

EVAL_SEED = 1_000_003
"""Seed of the held-out eval-seen prompts that training measures itself on (the pools draw
with the run's own seed)."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved (as a dict) in its checkpoints.

    ``batch_size`` is global: sequences per step for SFT, prompts per step for RL (each
    sampled ``group_size`` times). ``pool=0`` draws fresh prompts every step; ``pool > 0``
    draws from a fixed pool of that many. An RL step updates only when at least
    ``min_groups`` of its groups carry a signal (rewards not all equal): Adam turns any
    gradient into a step of about ``lr``, so a step driven by one or two prompts moves the
    policy as far as one driven by the whole batch.
    """

    mode: str = "sft"
    out: str = "policy-run"
    regime: str = "sft"
    preset: str = "cpu"
    init: str | None = None
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    pool: int = 0
    seed: int = 0
    split_seed: int = 0
    group_size: int = 8
    temperature: float = 1.0
    kl_coef: float = 0.0
    min_groups: int = 1
    max_depth: int = 4
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 100
    eval_prompts: int = 500
    compile: bool = False
    device: str | None = None
    workers: int = 0
    """Processes that draw and collate SFT batches ahead of the step (0: in the training loop)."""

    def __post_init__(self):
        if self.mode not in ("sft", "rl"):
            raise ValueError(f"mode must be 'sft' or 'rl', got {self.mode!r}")
        if self.regime not in POOL_REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose from {', '.join(POOL_REGIMES)}")
        if self.mode == "sft" and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.mode == "rl" and not self.init:
            raise ValueError("RL needs --init, the checkpoint to start from")
        if self.mode == "rl" and self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "eval_prompts", "min_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool < 0:
            raise ValueError(f"pool must be >= 0 (0: fresh prompts every step), got {self.pool}")
        if self.mode == "rl" and self.min_groups > self.batch_size:
            raise ValueError(f"min_groups={self.min_groups} exceeds the {self.batch_size} groups of a step")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only at the end), got {self.eval_every}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def _optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # no weight decay on gains and biases (1-d), as in GPT-2
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _check_resume(saved: dict | None, cfg: TrainConfig, path: Path) -> None:
    if saved is None:
        raise CheckpointError(f"{path}: holds no training config, so the run cannot resume from it")
    now = asdict(cfg)
    # a field newer than the checkpoint had its default when the checkpoint was written
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    diff = [f"{k}: {saved.get(k, defaults[k])!r} != {now[k]!r}" for k in now
            if k not in _RUN_FIELDS and saved.get(k, defaults[k]) != now[k]]
    if diff:
        raise CheckpointError(f"{path} was written by a different run ({diff[0]}); use another --out to start afresh")


def _build(cfg: TrainConfig, tok: Tokenizer, ckpt: Path, device) -> tuple[GPT, dict | None]:
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        _check_resume(state["train_config"], cfg, ckpt)
        model = GPT(GPTConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        return model.to(device), state
    if cfg.mode == "sft":
        torch.manual_seed(cfg.seed)
        n_layer, n_head, n_embd = PRESETS[cfg.preset]
        model = GPT(GPTConfig(tok.vocab_size, tok.block_size(cfg.max_depth), n_layer, n_head, n_embd,
                              slot_layout=tok.segment_tokens))
        return model.to(device), None
    model, _, _ = load_policy(cfg.init, device, world=default_world())
    return model.train(), None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step``: a killed run may have logged steps its checkpoint lacks.

    A last line cut short (a kill or a full disk mid-append) is dropped with a warning naming the
    file and line, and the file is rewritten without it before anything is appended; an
    unreadable line before it is an error naming the file and line.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec_step = int(rec["step"])
        except (ValueError, KeyError, TypeError) as e:
            if n == last:  # the torn end of an interrupted append
                print(f"warning: {path}:{n}: dropped a torn last line (an interrupted append): {line[:60]!r}",
                      file=sys.stderr)
                break
            raise ValueError(f"{path}:{n}: not a metrics record ({type(e).__name__}: {str(e)[:80]}); "
                             f"remove the line or start afresh with another --out") from None
        if rec_step <= step:
            keep.append(line)
    with atomic_open(path, "w") as f:
        f.writelines(line + "\n" for line in keep)


def train(cfg: TrainConfig, *, progress: bool = True, on_step=None, deadline: float | None = None) -> dict:
    """Run (or resume) training; returns the summary also written to ``out/train.json``.

    ``on_step(step)`` is called after every completed step, once its checkpoint (if any) is written.
    ``deadline`` (a ``time.monotonic()`` value) ends the run early: the step in progress completes,
    the checkpoint is written and the summary records ``stopped_at`` (``None`` when the run ran
    all its steps).
    """
    d = distributed.setup(cfg.device)
    try:
        return _train(cfg, d, progress, on_step, deadline)
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, d: distributed.Dist, progress: bool, on_step, deadline) -> dict:
    from tqdm.auto import tqdm

    if cfg.batch_size < d.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is smaller than the {d.world_size} processes")
    world = default_world()
    tok = Tokenizer.from_world(world)
    out = Path(cfg.out)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    model, state = _build(cfg, tok, ckpt_path, d.device)
    start = state["step"] if state else 0
    if start >= cfg.steps and (out / "train.json").exists():
        return json.loads((out / "train.json").read_text())  # finished: keep the run's own summary
    optimizer = _optimizer(model, cfg, d.device)
    if state and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    ref = load_policy(cfg.init, d.device)[0] if cfg.mode == "rl" and cfg.kl_coef > 0 else None
    stream = PromptStream(cfg.regime, cfg.pool, cfg.seed, world, cfg.split_seed)
    if tok.block_size(stream.depth) > model.config.block_size:
        raise ValueError(f"regime {cfg.regime} has depth-{stream.depth} programs, beyond the model's "
                         f"block_size={model.config.block_size}")
    step_fn = _SFTStep(cfg, tok, stream, d) if cfg.mode == "sft" else _RLStep(cfg, tok, stream, d, model, ref)
    # held-out eval-seen prompts: what the run measures its learning on (teacher-forced accuracy)
    held_out = prompt_pool("eval-seen", cfg.eval_prompts, EVAL_SEED, world, cfg.split_seed) if d.is_main else None
    if held_out and tok.block_size(max(len(t.program) for t in held_out)) > model.config.block_size:
        held_out = None  # a model built for shorter programs (a toy run) cannot read eval-seen prompts
    probe = None
    net = torch.compile(model) if cfg.compile else model
    if d.enabled:
        net = DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start)
    policy = "sft" if cfg.mode == "sft" else f"rl:{cfg.regime}"
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {policy}", unit="step", disable=not (progress and d.is_main))
    tokens = flops = 0.0
    t0 = time.perf_counter()
    record: dict = {}
    model.train()
    stopped_at = None
    batches = _prefetch(step_fn, start, cfg) if cfg.mode == "sft" and cfg.workers else None
    for step in range(start, cfg.steps):
        torch.manual_seed(derive_seed(cfg.seed, step, d.rank))  # dropout, if any
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        record = step_fn(net, step, next(batches) if batches is not None else None)
        record["updated"] = record.pop("_update")
        if record["updated"]:
            record["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        tokens += record["tokens"]
        flops += record["tokens"] * model.flops_per_token(record.pop("_width"))
        out_of_time = deadline is not None and time.monotonic() >= deadline and step + 1 < cfg.steps
        if deadline is not None and d.enabled:  # every rank stops at the same step
            out_of_time = distributed.all_sum([float(out_of_time)], d)[0] > 0
        evaluate_now = step + 1 == cfg.steps or out_of_time or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)
        if d.is_main and ((step + 1) % cfg.log_every == 0 or evaluate_now):
            record = {k: float(v) if torch.is_tensor(v) else v for k, v in record.items()}
            elapsed = time.perf_counter() - t0
            record.update(step=step + 1, lr=lr, tokens_per_s=tokens / elapsed, model_flops_per_s=flops / elapsed)
            if evaluate_now and held_out:
                t_eval = time.perf_counter()
                probe = teacher_forced(model, tok, held_out)
                t0 += time.perf_counter() - t_eval  # the probe's time is not training throughput
                record["teacher_forced"] = probe
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "reward") if k in record})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
            if d.is_main:
                save_checkpoint(ckpt_path, model, tok, step=step + 1, policy=policy, train_config=asdict(cfg),
                                optimizer=optimizer)
        bar.update(1)
        if on_step is not None:
            on_step(step + 1)
        if out_of_time:
            stopped_at = step + 1
            break
    bar.close()
    record = {k: float(v) if torch.is_tensor(v) else v for k, v in record.items()}
    elapsed = time.perf_counter() - t0
    summary = {"config": asdict(cfg), "policy": policy, "device": d.device.type, "world_size": d.world_size,
               "n_params": model.n_params(), "resumed_from_step": start,
               "steps_run": (stopped_at or cfg.steps) - start, "stopped_at": stopped_at,
               "wall_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed else None,
               "model_flops_per_s": flops / elapsed if elapsed else None,
               "mfu": _mfu(flops / elapsed, d) if elapsed else None, "last": record,
               "teacher_forced": probe,
               "competent": None if probe is None else probe["step"]["acc"] >= COMPETENT}
    if d.is_main:
        with atomic_open(out / "train.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary


class _StepBatches(torch.utils.data.Dataset):
    """The SFT batch of step ``i`` for one rank, on the host: what loader workers compute ahead."""

    def __init__(self, step_fn: "_SFTStep", n: int):
        self.step_fn, self.n = step_fn, n

    def __len__(self):
        return self.n

    def __getitem__(self, step):
        return self.step_fn.host_batch(step)


def _prefetch(step_fn: "_SFTStep", start: int, cfg: TrainConfig):
    loader = torch.utils.data.DataLoader(
        _StepBatches(step_fn, cfg.steps), batch_size=None, sampler=range(start, cfg.steps), num_workers=cfg.workers,
        pin_memory=step_fn.d.device.type == "cuda", prefetch_factor=4, persistent_workers=False)
    return iter(loader)


class _SFTStep:
    """One SFT step: backward of the completion NLL on this rank's share of the global batch."""

    def __init__(self, cfg, tok, stream, d):
        self.cfg, self.tok, self.d, self.stream = cfg, tok, d, stream

    def host_batch(self, step: int):
        traces = self.stream.batch(step, self.cfg.batch_size)[self.d.rank:: self.d.world_size]
        return collate(sft_pairs(traces, self.tok), self.tok.pad, "cpu"), len(traces)

    def __call__(self, net, step: int, prepared=None) -> dict:
        batch, n_rows = prepared if prepared is not None else self.host_batch(step)
        # counted on the host copy: no device synchronisation in the step
        local_tokens = float((batch.inputs != self.tok.pad).sum()) + n_rows
        n_completion = float(batch.mask.sum())
        batch = type(batch)(*(x.to(self.d.device, non_blocking=True) for x in batch))
        if self.d.enabled:
            n_completion, _ = distributed.all_sum([n_completion, 0.0], self.d)
        with autocast(self.d.device):
            loss = sft_loss(net, batch, n_completion, self.d.world_size)
        loss.backward()
        if not self.d.enabled:  # the loss stays on the device until a record is written
            return {"loss": loss.detach(), "tokens": local_tokens, "_update": True, "_width": batch.inputs.shape[1]}
        total_loss, tokens = distributed.all_sum([float(loss.detach()) / self.d.world_size, local_tokens], self.d)
        return {"loss": total_loss, "tokens": tokens, "_update": True, "_width": batch.inputs.shape[1]}


class _RLStep:
    """One group-relative policy-gradient step on this rank's prompts (``group_size`` samples each)."""

    def __init__(self, cfg, tok, stream, d, model, ref):
        self.cfg, self.tok, self.stream, self.d, self.model, self.ref = cfg, tok, stream, d, model, ref

    def __call__(self, net, step: int, prepared=None) -> dict:
        cfg, tok, d, g = self.cfg, self.tok, self.d, self.cfg.group_size
        local = self.stream.batch(step, cfg.batch_size)[d.rank:: d.world_size]
        rows = range(len(local))
        encoded = [tok.encode_prompt(t.input, t.program) for t in local]
        prompts = [encoded[i] for i in rows for _ in range(g)]
        budgets = [tok.completion_budget(len(local[i].program)) for i in rows for _ in range(g)]
        gen = torch.Generator(device=d.device).manual_seed(derive_seed(cfg.seed, step, d.rank))
        self.model.eval()
        with autocast(d.device):
            completions = generate(self.model, prompts, budgets, eos=tok.eos, pad=tok.pad,
                                   temperature=cfg.temperature, generator=gen)
        self.model.train()
        rewards = torch.tensor([[_reward(tok, completions[n * g + j], local[n]) for j in range(g)] for n in rows])
        adv = group_advantages(rewards)
        kept = [(n, j) for n in range(len(rows)) if adv.keep[n] for j in range(g)]
        sampled = sum(len(c) for c in completions)
        pairs = [(prompts[n * g + j], completions[n * g + j]) for n, j in kept]
        n_completion = float(sum(len(c) for _, c in pairs))
        n_tok, n_skipped, reward_sum, n_sampled = distributed.all_sum(
            [n_completion, float((~adv.keep).sum()), float(rewards.sum()), float(sampled)], d)
        record = {"reward": reward_sum / (cfg.batch_size * g), "groups_skipped": int(n_skipped),
                  "groups": cfg.batch_size, "sampled_tokens": int(n_sampled), "loss": 0.0, "kl": 0.0,
                  "tokens": 0.0, "_update": False, "_width": 0}
        if n_tok == 0 or cfg.batch_size - n_skipped < cfg.min_groups:
            return record  # too few informative groups: no update (see TrainConfig)
        # a rank whose groups all carry no signal still joins DDP's gradient all-reduce
        batch = collate(pairs or [(prompts[0], completions[0])], tok.pad, d.device)
        if not pairs:
            batch = batch._replace(mask=torch.zeros_like(batch.mask))
        advantage = torch.tensor([float(adv.advantage[n, j]) for n, j in kept] or [0.0], device=d.device)
        with autocast(d.device):
            ref_logp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_logp = token_logprobs(self.ref, batch)
            loss, kl = grpo_loss(net, batch, advantage, n_tok, d.world_size, ref_logp, cfg.kl_coef)
        loss.backward()
        local_tokens = float((batch.inputs != tok.pad).sum()) + len(pairs)
        total_loss, kl_sum, tokens = distributed.all_sum(
            [float(loss.detach()) / d.world_size, float(kl) / d.world_size, local_tokens], d)
        record.update(loss=total_loss, kl=kl_sum, tokens=tokens, _update=True, _width=batch.inputs.shape[1])
        return record


# dense bf16 peak FLOP/s per device: the H200's as measured on a large bf16 matmul (its data
# sheet says 989e12), the others from the vendors' data sheets (no sparsity)
_PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 790e12, "B200": 2250e12, "L4": 121e12, "A10": 125e12}


def _mfu(flops_per_s: float, d: distributed.Dist) -> float | None:
    """Model FLOP utilisation over all ranks, for the GPUs whose peak is known; else ``None``."""
    if d.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(d.device)
    peak = next((v for k, v in _PEAK_BF16.items() if k in name.split()), None)
    return flops_per_s / (peak * d.world_size) if peak else None


def _reward(tok: Tokenizer, completion, prompt) -> float:
    """1 for a well-formed completion whose final step is the golden answer, else 0."""
    parsed = tok.parse_completion(completion, len(prompt.program))
    return float(parsed.malformed is None and parsed.steps[-1] == prompt.steps[-1])
