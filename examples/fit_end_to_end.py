"""Fit the HLSM end to end: simulate traces with a planted confusion, fit them by EM and by
NUTS, read the labelled execution tables, draw the heatmaps and summarize the draws with ArviZ.

    python examples/fit_end_to_end.py --n 2000 --out fit-example
"""
import argparse
from pathlib import Path

import arviz as az
import numpy as np

import latentsel as ls
from latentsel import plots
from latentsel.models.registry import default_params
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate


def main(args):
    world = ls.default_world()
    out = Path(args.out)
    # the truth: near-faithful, except that intended `reverse` runs as `rotl` 30% of the time
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.95)
    rev, rotl = world.skill_index("reverse"), world.skill_index("rotl")
    truth.skill_exec[rev] = 0.0
    truth.skill_exec[rev, rev], truth.skill_exec[rev, rotl] = 0.7, 0.3
    traces = simulate(generate("eval-seen", args.n, seed=args.seed, world=world), truth, "modular", world,
                      seed=args.seed)
    print(f"simulated {len(traces)} traces; intended reverse runs as rotl with probability 0.30")

    for method, options in (("em", {}), ("nuts", dict(warmup=args.nuts_draws, samples=args.nuts_draws))):
        fit = ls.fit(traces, "modular", method, progress=not args.no_progress, **options)
        table = fit.execution_table()
        rows = table[(table.kind == "skill") & (table.intended == "reverse")]
        print(f"\n{method}: log evidence {fit.log_evidence:.1f}; executed when reverse is intended:")
        print(rows.sort_values("prob", ascending=False).head(3).round(3).to_string(index=False))
        fit.save(out / method)
        plots.save_figure(plots.fit_execution_heatmap(fit, "skill", truth=truth.skill_exec),
                          out / method / "skills.png")
    idata = fit.to_inference_data(traces)  # the NUTS draws, dims intended_skill, executed_skill, ...
    summary = az.summary(idata, var_names=["skill_exec"], coords={"intended_skill": ["reverse"],
                                                                  "executed_skill": ["reverse", "rotl"]})
    print("\nArviZ summary of the NUTS draws:")
    print(summary[["mean", "sd", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk"]].round(3).to_string())
    worst = float(np.nanmax(summary["r_hat"]))
    if worst > 1.01:
        print(f"R-hat {worst:.3f} > 1.01: run longer chains (--nuts-draws) before reading the draws")
    print(f"\nwrote {out}/em and {out}/nuts (fit.json, posterior.jsonl, skills.png; nuts also samples.npz)")
    return fit


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="traces to simulate (default: %(default)s)")
    parser.add_argument("--nuts-draws", type=int, default=300,
                        help="NUTS warm-up and kept draws per chain (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the simulation")
    parser.add_argument("--out", default="fit-example", help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    main(parser.parse_args())
