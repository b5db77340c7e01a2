"""Generative programs of the hierarchical latent selection model (installed as ``latentsel.models``).

They see arrays only: emission tensors, intended-module indices, masks and parameter
NamedTuples; never the world, trace files or plots.
"""
