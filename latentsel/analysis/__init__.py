"""From fitted arrays back to answers about traces:

* :mod:`latentsel.analysis.posterior`: exact evidence, per-step posteriors and exact draws of
  the executed selections for traces or prepared data;
* :mod:`latentsel.analysis.options`: the fitting methods and their options (JAX-free);
* :mod:`latentsel.analysis.fitting`: a corpus fitted by one method, as a :class:`Fit`, and
  its ``fit.json`` / ``posterior.jsonl``;
* :mod:`latentsel.analysis.equivalence`: which modules a trace cannot tell apart;
* :mod:`latentsel.analysis.diagnostics`: ArviZ data, PSIS-LOO, posterior predictive checks
  (the one module that talks to ArviZ).

Importing this package loads nothing: each module is imported by its path.
"""
