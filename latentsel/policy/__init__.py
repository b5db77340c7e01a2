"""Reasoning policies: tokenizer, transformer, sampler, SFT and RL training, evaluation.

Needs torch and numpy only (never JAX), so it runs on a bare GPU image.
"""
