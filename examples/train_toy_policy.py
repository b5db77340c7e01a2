"""Train a toy policy by SFT on depth-1 and depth-2 programs on a CPU, then measure it.

The toy regime draws every module uniformly (240 of them) at depth 1 or 2, fresh prompts at
every step. The script trains the 0.35M-parameter ``toy`` preset (1800 steps of 64 traces by
default, a few minutes on one core) and prints the exact-match accuracy of greedy decoding on
depth-1 and depth-2 programs with 95% intervals (chance is 0).

    python examples/train_toy_policy.py --out toy-policy
    python examples/train_toy_policy.py --steps 20 --n-eval 50     # a smoke run
"""
import argparse
import tempfile
from pathlib import Path

import torch

from latentsel.policy.checkpoint import load_policy
from latentsel.policy.data import toy_prompts
from latentsel.policy.evaluate import score
from latentsel.policy.sampling import sample_traces
from latentsel.policy.train import TrainConfig, train
from latentsel.world import default_world


def main(args):
    # the model is small: a second intra-op thread gains little and costs much on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        cfg = TrainConfig(mode="sft", out=str(out), regime="toy", preset="toy", steps=args.steps, batch_size=64,
                          lr=3e-3, min_lr=3e-4, warmup=min(50, args.steps), max_depth=2, seed=args.seed,
                          log_every=max(1, args.steps // 20), checkpoint_every=max(1, args.steps // 6))
        summary = train(cfg, progress=not args.no_progress)
        print(f"trained {summary['n_params']:,} parameters for {args.steps} steps in {summary['wall_s']:.0f} s "
              f"({summary['tokens_per_s']:.0f} tokens/s), final loss {summary['last']['loss']:.3f}")
        model, tok, _ = load_policy(out / "checkpoint.pt")
        world = default_world()
        results = {}
        for depth in (1, 2):
            prompts = toy_prompts(args.n_eval, args.seed + 1000 + depth, world, depths=(depth,))
            traces = sample_traces(model, tok, prompts, policy="toy-sft", checkpoint=str(out / "checkpoint.pt"))
            results[depth] = score(traces, prompts)
            lo, hi = results[depth]["ci95"]
            print(f"depth {depth}: {100 * results[depth]['accuracy']:.1f}% exact [{100 * lo:.1f}, {100 * hi:.1f}] "
                  f"of {args.n_eval}, {results[depth]['malformed']} malformed")
        example, golden = traces[0], prompts[0]
        print(f"example: {example.input!r} {example.program} -> {example.steps} (golden {golden.steps})")
        if args.out:
            print(f"checkpoint and metrics in {out}/")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train a toy policy by SFT on a CPU and measure it.")
    parser.add_argument("--out", help="run folder to keep (default: a temporary one); an existing run resumes")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--n-eval", type=int, default=1000, help="evaluation prompts per depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    main(parser.parse_args())
