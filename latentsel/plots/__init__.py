"""The toolkit's own figures. ArviZ's diagnostic plots live in :mod:`latentsel.analysis.diagnostics`.

- :mod:`~latentsel.plots.modules`: one fit or one trace: execution and selection heatmaps,
  module graphs, distinguishability classes.
- :mod:`~latentsel.plots.experiments`: experiment summaries: identifiability and contraction
  curves, SBC rank histograms, error attribution.
- :mod:`~latentsel.plots.policy`: the training curves of a policy protocol.

Every function takes numpy arrays and plain records, so it can be tested without running
inference, and returns a :class:`matplotlib.figure.Figure` built with the object-oriented API,
without pyplot: nothing is shown and nothing stays in a global figure list. Graphs are built
where their meaning lives (:mod:`latentsel.traces.graph`, :mod:`latentsel.analysis.equivalence`); this
package only draws them. Figures are sized
for a report about 1000 px wide; :func:`save_figure` writes one as a PNG atomically.
"""
from latentsel.plots._common import save_figure
from latentsel.plots.experiments import (attribution_bars, attribution_by_step, contraction_curves, execution_by_step,
                                         fidelity_scatter, identifiability_curves, sbc_histograms)
from latentsel.plots.modules import (draw_distinguishability_graph, draw_module_digraph, execution_heatmap,
                                     fit_execution_heatmap, fit_selection_heatmap, module_graph, selection_heatmap)
from latentsel.plots.policy import training_curves

__all__ = ["save_figure", "execution_heatmap", "selection_heatmap", "fit_execution_heatmap", "fit_selection_heatmap",
           "draw_module_digraph", "module_graph", "draw_distinguishability_graph", "identifiability_curves",
           "contraction_curves", "sbc_histograms", "attribution_bars", "attribution_by_step", "execution_by_step",
           "fidelity_scatter", "training_curves"]
