"""Policy subcommands of ``latentsel``: ``train sft|rl``, ``sample``, ``evaluate``, ``protocol``.

Imports of torch and the training code happen inside the commands, so ``latentsel --help``
stays fast. Data-parallel training runs the same command under ``torchrun``::

    torchrun --nproc_per_node=4 -m latentsel train sft --out runs/sft --preset gpu
"""
from __future__ import annotations

import argparse
import sys

from latentsel.cli._argtypes import at_least
from latentsel.cli._argtypes import nonneg_float as _nonneg_float

_count = at_least(1)

__all__ = ["add_commands"]

_SFT_DEFAULTS = dict(regime="sft", steps=2000, batch_size=64, lr=3e-3, min_lr=3e-4, warmup=50)
_RL_DEFAULTS = dict(regime="rl-compound", steps=200, batch_size=16, lr=1e-4, min_lr=1e-5, warmup=10)


def _named(value: str) -> tuple[str, str]:
    from latentsel.policy.evaluate import check_policy_name

    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT, got {value[:200]!r}")
    try:
        check_policy_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, path


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from latentsel.policy.train import TrainConfig, train

    _threads(args)
    keys = set(TrainConfig.__dataclass_fields__)
    if getattr(args, "min_groups", 0) is None:
        args.min_groups = max(1, args.batch_size // 4)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in keys})
    summary = train(cfg, progress=not args.no_progress)
    if summary["world_size"] > 1 and not _is_rank0():
        return 0
    last = summary["last"]
    print(f"{summary['policy']}: {summary['steps_run']} steps on {summary['device']} x{summary['world_size']} "
          f"in {summary['wall_s']:.1f} s, {summary['tokens_per_s']:.0f} tokens/s, loss {last.get('loss', 0.0):.4f}"
          + (f", reward {last['reward']:.3f}" if "reward" in last else "")
          + f"; wrote {cfg.out}/checkpoint.pt and {cfg.out}/metrics.jsonl")
    tf = summary.get("teacher_forced")
    if tf:
        by_pos = ", ".join(f"step {t} {c['acc']:.1%}" for t, c in tf["by_position"].items())
        print(f"teacher-forced on {tf['answer']['n']} held-out eval-seen prompts: per step {tf['step']['acc']:.1%} "
              f"({by_pos}), stop {tf['stop']['acc']:.1%}, answer {tf['answer']['acc']:.1%}"
              + ("" if summary["competent"] else "; UNDER-TRAINED (competent at >= 90% per step)"))
    return 0


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def cmd_sample(args) -> int:
    import time

    from latentsel.policy.checkpoint import load_policy
    from latentsel.policy.distributed import pick_device
    from latentsel.policy.sampling import check_prompts, sample_traces
    from latentsel.traces import read_traces, write_traces
    from latentsel.world import default_world

    _threads(args)
    errors: list = []
    prompts = read_traces(args.prompts, skip_invalid=args.skip_invalid, errors=errors)
    if errors:
        print(f"skipped {len(errors)} invalid records (first: {errors[0]})", file=sys.stderr)
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    model, tok, state = load_policy(args.checkpoint, pick_device(args.device), world=default_world())
    stats: dict = {}
    t0 = time.perf_counter()
    try:
        check_prompts(model, tok, prompts)
    except ValueError as e:
        raise ValueError(f"{args.prompts}: {e}") from None
    traces = sample_traces(model, tok, prompts, policy=args.policy or state["policy"], checkpoint=args.checkpoint,
                           seed=args.seed, temperature=args.temperature, samples=args.samples,
                           batch_size=args.batch_size, progress=not args.no_progress, stats=stats)
    wall = time.perf_counter() - t0
    write_traces(args.output, traces)
    malformed = sum(t.extra["malformed"] is not None for t in traces)
    print(f"wrote {len(traces)} traces to {args.output} ({malformed} malformed); "
          f"{stats['generated_tokens'] / wall:.0f} generated tokens/s")
    return 0


def cmd_evaluate(args) -> int:
    from latentsel.policy.evaluate import evaluate

    _threads(args)
    names = [name for name, _ in args.policy]
    if len(set(names)) != len(names):
        raise ValueError(f"--policy names must be distinct, got {names}")
    record = evaluate(dict(args.policy), args.out, n=args.n, seed=args.seed, split_seed=args.split_seed,
                      splits=args.splits, device=args.device, batch_size=args.batch_size,
                      temperature=args.temperature, save_traces=args.save_traces, title=args.title,
                      progress=not args.no_progress)
    for name, entry in record["policies"].items():
        cells = ", ".join(f"{s} {100 * c['accuracy']:.1f}%" for s, c in entry["splits"].items())
        print(f"{name}: {cells}")
    print(f"wrote {args.out}/eval.json and {args.out}/eval.md")
    return 0


def cmd_protocol(args) -> int:
    from latentsel.policy.protocol import run_protocol

    _threads(args)
    summary = run_protocol(args.out, size=args.size, seed=args.seed, device=args.device,
                           progress=not args.no_progress, corpus_n=args.corpus_n, eval_n=args.eval_n,
                           budget_s=args.budget)
    print(f"protocol ({args.size}) on {summary['device']} in {summary['wall_s']:.0f} s; wrote {args.out}/")
    return 0


# --------------------------------------------------------------------------------------
def _common(p, device=True):
    if device:
        p.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--threads", type=_count, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_args(p, defaults: dict):
    from latentsel.traces.regimes import PROMPT_REGIMES

    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, train.json; "
                                                "a folder holding a checkpoint resumes")
    # "toy" as in latentsel.policy.data.POOL_REGIMES, spelled out here to keep torch out of --help
    p.add_argument("--regime", choices=["toy", *PROMPT_REGIMES], help="prompts to train on (default: %(default)s)")
    p.add_argument("--steps", type=_count, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=_count, help="global batch (default: %(default)s)")
    p.add_argument("--lr", type=_nonneg_float, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr", type=_nonneg_float, help="final learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=_count, help="warm-up steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.1, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--pool", type=at_least(0), default=0,
                   help="a fixed pool of this many training prompts; 0 draws fresh prompts every step "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization, the prompts and the sampling")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the skill-bigram split (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=_count, default=100, help="steps between checkpoints")
    p.add_argument("--log-every", type=_count, default=10, help="steps between metrics.jsonl lines")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between teacher-forced accuracy probes on held-out eval-seen prompts "
                        "(logged in metrics.jsonl; 0: only at the end) (default: %(default)s)")
    p.add_argument("--eval-prompts", type=_count, default=500,
                   help="held-out eval-seen prompts per probe (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    p.add_argument("--workers", type=at_least(0), default=0,
                   help="processes that prepare SFT batches ahead of the step (default: %(default)s)")
    _common(p)
    p.set_defaults(func=cmd_train, **defaults)


def add_commands(sub) -> None:
    """Add ``train``, ``sample``, ``evaluate`` and ``protocol`` to a subparsers object."""
    from latentsel.traces.regimes import PROMPT_REGIMES

    p = sub.add_parser("train", help="train a policy: SFT, or RL from an SFT checkpoint")
    modes = p.add_subparsers(dest="mode", metavar="MODE", parser_class=type(p), required=True)
    q = modes.add_parser("sft", help="supervised fine-tuning on golden traces")
    _train_args(q, dict(_SFT_DEFAULTS, mode="sft"))
    q.add_argument("--preset", default="cpu", choices=["tiny", "toy", "cpu", "gpu"], help="model size")
    q.add_argument("--max-depth", type=_count, default=4, help="deepest program the context must hold")
    q = modes.add_parser("rl", help="group-relative policy gradient with an exact-match reward")
    _train_args(q, dict(_RL_DEFAULTS, mode="rl"))
    q.add_argument("--init", required=True, help="the SFT checkpoint to start from (and the KL reference)")
    q.add_argument("--group-size", type=_count, default=8, help="samples per prompt (default: %(default)s)")
    q.add_argument("--temperature", type=_nonneg_float, default=1.0, help="sampling temperature of the rollouts")
    q.add_argument("--kl-coef", type=_nonneg_float, default=0.05,
                   help="weight of the KL penalty (k3) to the --init policy (default: %(default)s)")
    q.add_argument("--min-groups", type=_count,
                   help="update only when at least this many prompt groups have unequal rewards "
                        "(default: a quarter of --batch-size, at least 1)")

    p = sub.add_parser("sample", help="complete prompts with a policy and write its traces")
    p.add_argument("--checkpoint", required=True, help="policy checkpoint (.pt)")
    p.add_argument("--prompts", required=True, help="trace file whose inputs and programs are the prompts")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.jsonl or .jsonl.gz)")
    p.add_argument("--policy", help="policy name in the traces' source (default: the checkpoint's)")
    p.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--samples", type=_count, default=1, help="completions per prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=_count, default=256, help="prompts completed at once")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid prompt records and count them")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="accuracy of policies on the evaluation splits, per depth")
    p.add_argument("--policy", type=_named, action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="a policy to evaluate (repeat for several)")
    p.add_argument("--out", required=True, help="folder for eval.json and eval.md")
    p.add_argument("--n", type=_count, default=1000, help="prompts per split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="prompt and sampling seed (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the skill-bigram split")
    p.add_argument("--splits", nargs="+", choices=list(PROMPT_REGIMES), default=["eval-seen", "eval-unseen", "eval-ood"],
                   help="evaluation splits")
    p.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--batch-size", type=_count, default=256, help="prompts completed at once")
    p.add_argument("--save-traces", action="store_true", help="also write the completions as trace files")
    p.add_argument("--title", help="title of the markdown table")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("protocol", help="SFT, RL atomic, RL compound, evaluation and trace corpora in one run")
    p.add_argument("--out", required=True, help="output folder (resumes the training stages it holds)")
    p.add_argument("--size", choices=["tiny", "cpu", "gpu"], default="cpu",
                   help="run size: tiny (a smoke run), cpu, gpu (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole protocol")
    p.add_argument("--eval-n", type=_count, help="evaluation prompts per split (default: the size's)")
    p.add_argument("--corpus-n", type=_count, help="corpus traces per policy and split (default: the size's)")
    p.add_argument("--budget", type=_nonneg_float,
                   help="wall-clock seconds for the training stages, each sized to its share from a short "
                        "calibration run; 0 for none (default: the size's: 1680 for cpu, 450 for gpu)")
    _common(p)
    p.set_defaults(func=cmd_protocol)
