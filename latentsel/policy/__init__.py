"""Reasoning policies: tokenizer, transformer, sampler, SFT and RL training, evaluation.

Needs torch and numpy only (never JAX), so it runs on a bare GPU image.
"""

__all__ = ["COMPETENT"]

# a policy is competent when its teacher-forced per-step accuracy on eval-seen reaches this (DESIGN §7)
COMPETENT = 0.9
