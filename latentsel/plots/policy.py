"""Training curves of a policy protocol: has the policy learned its modules, and did RL move it?"""
from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.figure import Figure

from latentsel.plots._common import _LABEL, _TICK, _WIDTH
from latentsel.policy import COMPETENT

__all__ = ["training_curves"]


def _series(records: Sequence[Mapping], key) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = key(r)
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def training_curves(sft: Sequence[Mapping], rl: Mapping[str, Sequence[Mapping]] | None = None, *,
                    title: str = "") -> Figure:
    """Three panels from ``metrics.jsonl`` records: the SFT loss; teacher-forced accuracy on
    held-out eval-seen prompts per step position, the stop and all steps, against the 90% bar
    of a competent policy; and, per RL run (``rl``: name -> records), the mean reward and the
    fraction of steps that updated the weights."""
    sft = [r for r in sft if "step" in r]
    if not sft:
        raise ValueError("sft must hold metrics records with 'step'")
    rl = dict(rl or {})
    fig = Figure(figsize=(_WIDTH, 3.2), layout="constrained")
    axes = fig.subplots(1, 3 if rl else 2)
    ax = axes[0]
    ax.plot(*_series(sft, lambda r: r.get("loss")), color="0.2", lw=1)
    ax.set(xlabel="SFT step", ylabel="completion NLL per token", ylim=(0, None))
    ax = axes[1]
    probes = [r for r in sft if r.get("teacher_forced")]
    positions = sorted({t for r in probes for t in r["teacher_forced"]["by_position"]}, key=int)
    for t in positions:
        ax.plot(*_series(probes, lambda r, t=t: r["teacher_forced"]["by_position"].get(t, {}).get("acc")),
                marker="o", ms=3, lw=1, label=f"step {t}")
    for key, style in (("stop", ":"), ("step", "-")):
        ax.plot(*_series(probes, lambda r, k=key: r["teacher_forced"][k]["acc"]), ls=style, color="k", lw=1.5,
                label="stop" if key == "stop" else "per step (all)")
    ax.axhline(COMPETENT, color="tab:red", lw=0.8, ls="--")
    ax.text(0.99, COMPETENT + 0.01, "competent", color="tab:red", fontsize=_TICK, ha="right",
            transform=ax.get_yaxis_transform())
    ax.set(xlabel="SFT step", ylabel="teacher-forced accuracy (eval-seen)", ylim=(0, 1))
    ax.legend(fontsize=_TICK, loc="center left", frameon=False)
    if rl:
        ax = axes[2]
        for name, records in rl.items():
            records = [r for r in records if "step" in r]
            xs, ys = _series(records, lambda r: r.get("reward"))
            # a running mean over 10 steps: single steps are 16 prompts
            smooth = [sum(ys[max(0, i - 9): i + 1]) / len(ys[max(0, i - 9): i + 1]) for i in range(len(ys))]
            updated = sum(bool(r.get("updated")) for r in records)
            ax.plot(xs, smooth, lw=1.2, label=f"{name} ({updated}/{len(records)} steps updated)")
        ax.set(xlabel="RL step", ylabel="mean reward (10-step running mean)", ylim=(0, 1))
        ax.legend(fontsize=_TICK, loc="upper left", frameon=False)
    for ax in axes:
        ax.tick_params(labelsize=_TICK)
        ax.xaxis.label.set_size(_LABEL)
        ax.yaxis.label.set_size(_LABEL)
    if title:
        fig.suptitle(title, fontsize=_LABEL + 1)
    return fig
