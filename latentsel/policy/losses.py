"""Token-level losses for SFT and the group-relative policy gradient (Dr. GRPO).

Both losses are sums over the completion tokens of the local shard divided by the number of
completion tokens in the *global* batch, times the world size: DDP averages gradients over
ranks, so the result is the gradient of the global token mean, whatever the number of ranks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from latentsel.policy.data import Batch

__all__ = ["token_logprobs", "sft_loss", "group_advantages", "Advantages", "grpo_loss"]


def token_logprobs(model, batch: Batch) -> torch.Tensor:
    """``log pi(target | prefix)``: ``[B, T]`` in float32."""
    logits = model(batch.inputs)
    return -F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none")


def sft_loss(model, batch: Batch, n_tokens: float, world_size: int = 1) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens; ``n_tokens`` counts them over all ranks."""
    logp = token_logprobs(model, batch)
    return -(logp * batch.mask).sum() * (world_size / n_tokens)


class Advantages(NamedTuple):
    """``advantage: [n_groups, G]`` = reward minus the group mean (no division by the std);
    ``keep: bool[n_groups]`` is False for a group whose rewards are all equal (no signal)."""

    advantage: torch.Tensor
    keep: torch.Tensor


def group_advantages(rewards: torch.Tensor) -> Advantages:
    """Dr. GRPO advantages of ``rewards: [n_groups, G]`` (G samples of one prompt per row)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [n_groups, G >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.double()
    advantage = rewards - rewards.mean(dim=1, keepdim=True)
    keep = rewards.amax(dim=1) > rewards.amin(dim=1)
    return Advantages(advantage.float(), keep)


def grpo_loss(model, batch: Batch, advantage: torch.Tensor, n_tokens: float, world_size: int = 1,
              ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, kl)`` of one on-policy update.

    Args:
        batch: the sampled completions of the local shard (``mask`` = generated tokens).
        advantage: ``[B]``, one per completion.
        ref_logp: ``[B, T]``, the reference policy's token log-probabilities (needed when
            ``kl_coef > 0``); the penalty is the k3 estimator ``exp(d) - d - 1``, ``d = ref - logp``.

    The policy-gradient term is ``-A * logp`` per token: with a single update per batch the
    importance ratio is 1 and PPO's clipping never acts. ``kl`` is the mean k3 over local tokens
    (0 without a reference).
    """
    logp = token_logprobs(model, batch)
    per_token = -advantage[:, None] * logp
    kl = torch.zeros((), device=logp.device)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference log-probabilities")
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * k3
        kl = (k3 * batch.mask).sum().detach() / batch.mask.sum().clamp(min=1)
    return (per_token * batch.mask).sum() * (world_size / n_tokens), kl
