"""Compare two policies' corpora: how faithfully each executes every intended skill, with
intervals, from the HLSM fitted to each.

    python examples/compare_policies.py data/policy-cpu/corpora/sft.eval-seen.jsonl.gz \
        data/policy-cpu/corpora/sft+rl-compound.eval-seen.jsonl.gz

The intervals are those of the conjugate posterior at the EM estimate: where modules alias
they are too narrow, so read a difference only where the intervals are far apart.
"""
import argparse
from pathlib import Path

import latentsel as ls

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "data" / "policy-cpu" / "corpora"


def fidelity(path, max_traces, progress):
    traces = ls.read_traces(path)[:max_traces]
    table = ls.fit(traces, "modular", "em", progress=progress).execution_table()
    same = table[(table.kind == "skill") & (table.intended == table.executed)]
    return same.set_index("intended")[["prob", "lower", "upper"]], len(traces)


def main(args):
    a, n_a = fidelity(args.a, args.max_traces, not args.no_progress)
    b, n_b = fidelity(args.b, args.max_traces, not args.no_progress)
    name_a, name_b = (Path(p).name.split(".")[0] for p in (args.a, args.b))
    print(f"P(executed = intended skill): {name_a} ({n_a} traces) vs {name_b} ({n_b} traces), 90% intervals")
    print(f"{'skill':<14} {name_a:>22} {name_b:>22}  apart")
    for skill in a.index:
        ra, rb = a.loc[skill], b.loc[skill]
        apart = "yes" if ra.upper < rb.lower or rb.upper < ra.lower else ""
        print(f"{skill:<14} {ra.prob:6.3f} [{ra.lower:.3f}, {ra.upper:.3f}] {rb.prob:6.3f} [{rb.lower:.3f}, {rb.upper:.3f}]"
              f"  {apart}")
    return a, b


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", nargs="?", default=str(CORPORA / "sft.eval-seen.jsonl.gz"), help="first corpus")
    parser.add_argument("b", nargs="?", default=str(CORPORA / "sft+rl-compound.eval-seen.jsonl.gz"),
                        help="second corpus")
    parser.add_argument("--max-traces", type=int, default=2000, help="first traces of each corpus (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    main(parser.parse_args())
