"""Inference for the hierarchical latent selection model (installed as ``latentsel.inference``).

Arrays in, arrays out: the emission tensor, intended-module indices, masks and parameter
NamedTuples; never the world, trace files or plots.
"""
