"""latentsel: the hierarchical latent selection model of reasoning traces."""
from latentsel.models.params import EntangledParams, GrammarParams, ModularParams
from latentsel.traces import Trace, TraceFormatError, read_traces, write_traces
from latentsel.world import Route, Skill, World, default_world

__version__ = "0.1.0"


def __getattr__(name):
    if name == "log_evidence":
        # the inference entry points pull in JAX: loaded on first use, so the CLI starts fast
        from latentsel.analysis.posterior import log_evidence

        return log_evidence
    raise AttributeError(f"module 'latentsel' has no attribute {name!r}")

__all__ = [
    "EntangledParams",
    "GrammarParams",
    "ModularParams",
    "log_evidence",
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
