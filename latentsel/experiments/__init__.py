"""Experiments built on the analysis:

* :mod:`latentsel.experiments.designs`: regimes, models and backends of a sweep, as data;
* :mod:`latentsel.experiments.identify`: one identifiability task (simulate, fit, measure);
* :mod:`latentsel.experiments.sweeps`: sweeps of tasks in parallel, and simulation-based calibration;
* :mod:`latentsel.experiments.identify_outputs`: a sweep's ``identify.json``, figures and report section;
* :mod:`latentsel.experiments.policy_fits`: the HLSM fitted to policy corpora;
* :mod:`latentsel.experiments.demo`: the embedded end-to-end run.

Importing this package loads nothing: each module is imported by its path.
"""
