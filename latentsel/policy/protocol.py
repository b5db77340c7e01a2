"""The default protocol (DESIGN §7): SFT -> RL atomic and RL compound -> evaluation -> corpora.

One folder holds everything::

    out/sft/, out/rl-atomic/, out/rl-compound/   runs (checkpoint.pt, metrics.jsonl, train.json)
    out/policies/{policy}.pt.gz                  the final weights, without optimizer state, gzipped
    out/eval/eval.json, out/eval/eval.md         accuracy per split and depth, greedy decoding
    out/corpora/{policy}.{split}.jsonl.gz        traces sampled at temperature 1 per policy and split
    out/protocol.json                            sizes, wall times, throughput, device

Both RL runs start from the final SFT checkpoint. Started again on the same folder, the
training stages resume (or are skipped when finished); evaluation and sampling are redone.
Single process: the stages that sample and evaluate do not shard over ``torchrun`` ranks.

The recipe: SFT on fresh depth 2-3 prompts of seen bigrams at every step (compound only, so
stopping is learned and no isolated atom is ever seen), a slot-position model (a deeper program
moves nothing a step reads); RL with a KL penalty to the SFT policy and no update from a step
where fewer than a quarter of the prompt groups carry a signal. ``cpu`` and ``gpu`` run under
a wall-clock budget (28 and 7.5 minutes): each training stage gets its share, and its steps are
sized from a calibration run on the machine at hand.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from latentsel._io import atomic_open
from latentsel.policy.checkpoint import export_policy, load_checkpoint, load_policy
from latentsel.policy.evaluate import SPLITS, evaluate, score
from latentsel.policy.sampling import sample_traces
from latentsel.policy.train import TrainConfig, train
from latentsel.traces import write_traces
from latentsel.traces.regimes import bigram_split, generate
from latentsel.world import default_world

__all__ = ["Size", "SIZES", "POLICIES", "run_protocol"]


@dataclass(frozen=True)
class Size:
    """A protocol size. With a wall-clock budget, ``share`` splits it between SFT, each RL run
    and the rest (evaluation and corpora), and a training stage's steps are its share divided
    by the step time measured in a short calibration run, at most ``sft_steps`` / ``rl_steps``."""

    preset: str
    sft_steps: int
    sft_batch: int
    sft_lr: float
    rl_steps: int
    rl_prompts: int
    group_size: int
    rl_lr: float
    eval_n: int
    corpus_n: int
    batch_size: int  # sampling batch
    kl_coef: float = 0.05
    workers: int = 0
    share: tuple[float, float, float] = (0.6, 0.12, 0.12)  # SFT, each RL run (the rest: eval + corpora)
    budget_s: float | None = None  # the default wall-clock budget


SIZES = {
    "tiny": Size("tiny", 4, 8, 3e-3, 2, 4, 4, 1e-4, 8, 4, 64),
    "cpu": Size("cpu", 6000, 64, 3e-3, 100, 16, 8, 5e-5, 1000, 2000, 500, share=(0.8, 0.05, 0.05), budget_s=1680),
    "gpu": Size("gpu", 20000, 256, 2e-3, 300, 64, 16, 5e-5, 2000, 2000, 1024, workers=6, budget_s=450),
}
POLICIES = {"sft": "sft", "sft+rl-atomic": "rl-atomic", "sft+rl-compound": "rl-compound"}
CALIBRATION_STEPS = {"sft": 12, "rl": 3}


def _stage(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("policy", "device", "world_size", "n_params", "wall_s", "tokens_per_s",
                                        "model_flops_per_s", "mfu", "steps_run", "resumed_from_step", "stopped_at",
                                        "teacher_forced", "competent")} | {
        "steps": summary["config"]["steps"], "last": summary["last"]}


def _sized(cfg: TrainConfig, seconds: float | None, progress: bool) -> tuple[TrainConfig, dict | None]:
    """``cfg`` with as many steps as fit in ``seconds`` (measured on a short calibration run)."""
    ckpt = Path(cfg.out, "checkpoint.pt")
    if ckpt.exists():  # a run to resume, with the steps it was sized to when it started
        saved = load_checkpoint(ckpt)["train_config"] or {}
        return replace(cfg, steps=saved.get("steps", cfg.steps), warmup=saved.get("warmup", cfg.warmup)), None
    if seconds is None:
        return cfg, None
    n = CALIBRATION_STEPS[cfg.mode]
    cal_dir = Path(cfg.out).parent / ".calibration" / Path(cfg.out).name
    stamps: list[float] = []
    t0 = time.perf_counter()
    train(replace(cfg, out=str(cal_dir), steps=n + 1, warmup=1, eval_every=0, eval_prompts=1, log_every=1,
                  checkpoint_every=10**9), progress=False, on_step=lambda step: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    shutil.rmtree(cal_dir, ignore_errors=True)
    # the first step pays for warm-up (allocation, kernel selection, loader start): time the rest
    per_step = (stamps[-1] - stamps[0]) / n
    steps = max(1, min(cfg.steps, int(0.95 * (seconds - wall) / per_step)))
    return replace(cfg, steps=steps, warmup=min(cfg.warmup, max(1, steps // 10))), {
        "calibration_steps": n + 1, "calibration_wall_s": wall, "s_per_step": per_step,
        "first_step_s": stamps[0] - t0, "steps": steps, "budget_s": seconds}


def run_protocol(out, *, size: str = "cpu", seed: int = 0, device: str | None = None, progress: bool = True,
                 eval_n: int | None = None, corpus_n: int | None = None, budget_s: float | None = None) -> dict:
    """Run the protocol into ``out``; returns the record also written to ``out/protocol.json``.

    ``budget_s`` (default the size's; 0 for none) bounds the training stages by wall clock:
    each gets its share of the budget, its steps sized from a calibration run and a hard
    deadline at the end of its share.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    s = SIZES[size]
    budget_s = s.budget_s if budget_s is None else budget_s or None
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")
    eval_n, corpus_n = eval_n or s.eval_n, corpus_n or s.corpus_n
    out = Path(out)
    world = default_world()
    t_start = time.perf_counter()
    clock0 = time.monotonic()
    common = dict(seed=seed, device=device, checkpoint_every=100)
    budgets = None if budget_s is None else [budget_s * f for f in s.share]
    sizing = {}

    def run(name: str, cfg: TrainConfig, k: int) -> dict:
        seconds = None if budgets is None else budgets[k] - (time.monotonic() - clock0 - sum(budgets[:k]))
        cfg, sizing[name] = _sized(cfg, seconds, progress)
        deadline = None if budgets is None else clock0 + sum(budgets[: k + 1])
        return _stage(train(cfg, progress=progress, deadline=deadline))

    stages = {"sft": run("sft", TrainConfig(
        mode="sft", out=str(out / "sft"), regime="sft", preset=s.preset, steps=s.sft_steps, batch_size=s.sft_batch,
        lr=s.sft_lr, min_lr=s.sft_lr / 10, warmup=min(100, s.sft_steps // 10 + 1), log_every=10,
        eval_every=max(1, s.sft_steps // 12), workers=s.workers, **common), 0)}
    init = str(out / "sft" / "checkpoint.pt")
    for k, regime in enumerate(("rl-atomic", "rl-compound"), start=1):
        stages[regime] = run(regime, TrainConfig(
            mode="rl", out=str(out / regime), regime=regime, init=init, steps=s.rl_steps, batch_size=s.rl_prompts,
            group_size=s.group_size, lr=s.rl_lr, min_lr=s.rl_lr / 10, warmup=min(10, s.rl_steps // 10 + 1),
            kl_coef=s.kl_coef, min_groups=max(1, s.rl_prompts // 4), eval_every=max(1, s.rl_steps // 4),
            log_every=1, **common), k)  # every step: which groups carried a signal
    checkpoints = {name: str(out / "policies" / f"{name}.pt.gz") for name in POLICIES}
    for name, run in POLICIES.items():
        export_policy(out / run / "checkpoint.pt", checkpoints[name])

    t0 = time.perf_counter()
    dev_name = stages["sft"]["device"]
    evaluation = evaluate(checkpoints, out / "eval", n=eval_n, seed=seed + 1, device=device,
                          batch_size=s.batch_size, progress=progress,
                          title=f"Compositional generalization: {dev_name.upper()} run, {size} size")
    eval_s = time.perf_counter() - t0

    split = bigram_split(world.n_skills)
    prompts = {sp: generate(sp, corpus_n, seed + 2, world=world, split=split) for sp in SPLITS}
    corpora = {}
    for name, path in checkpoints.items():
        model, tok, _ = load_policy(path, device or dev_name)
        for sp in SPLITS:
            stats: dict = {}
            t0 = time.perf_counter()
            traces = sample_traces(model, tok, prompts[sp], policy=name, checkpoint=path, seed=seed + 2,
                                   temperature=1.0, batch_size=s.batch_size, progress=progress, stats=stats)
            wall = time.perf_counter() - t0
            file = out / "corpora" / f"{name}.{sp}.jsonl.gz"
            write_traces(file, traces, world=world)
            acc = score(traces, prompts[sp])
            corpora[file.name] = {"policy": name, "split": sp, "n": len(traces), "temperature": 1.0,
                                  "accuracy": acc["accuracy"], "malformed": acc["malformed"],
                                  "generated_tokens_per_s": stats["generated_tokens"] / wall}
    record = {
        "device": dev_name, "device_name": _device_name(dev_name), "size": size, "seed": seed,
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in s.__dict__.items()},
        "budget_s": budget_s, "sizing": sizing, "stages": stages,
        "evaluation": {name: {sp: {k: c[k] for k in ("accuracy", "ci95", "n", "malformed")}
                              for sp, c in entry["splits"].items()}
                       for name, entry in evaluation["policies"].items()},
        "evaluation_wall_s": eval_s, "corpora": corpora, "wall_s": time.perf_counter() - t_start,
    }
    with atomic_open(out / "protocol.json", "w") as f:
        json.dump(record, f, indent=1)
    return record


def _device_name(kind: str) -> str:
    import platform

    import torch

    if kind == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
