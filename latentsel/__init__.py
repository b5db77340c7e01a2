"""latentsel: the hierarchical latent selection model of reasoning traces."""
from latentsel.models.params import EntangledParams, GrammarParams, ModularParams
from latentsel.traces import Trace, TraceFormatError, read_traces, write_traces
from latentsel.world import Route, Skill, World, default_world

__version__ = "0.1.0"


# the inference entry points pull in JAX: loaded on first use, so that the CLI and the
# policies start without it
_LAZY = {"log_evidence": "latentsel.analysis.posterior", "fit": "latentsel.analysis.fitting",
         "Fit": "latentsel.analysis.results", "load_fit": "latentsel.analysis.results"}


def __getattr__(name):
    if name in _LAZY:
        import importlib  # see above

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latentsel' has no attribute {name!r}")


__all__ = [
    "EntangledParams",
    "GrammarParams",
    "ModularParams",
    "log_evidence",
    "fit",
    "Fit",
    "load_fit",
    "Route",
    "Skill",
    "Trace",
    "TraceFormatError",
    "World",
    "default_world",
    "read_traces",
    "write_traces",
    "__version__",
]
