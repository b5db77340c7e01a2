"""latentsel: the hierarchical latent selection model of reasoning traces."""
from latentsel.traces import Trace, TraceFormatError, read_traces, write_traces
from latentsel.world import Route, Skill, World, default_world

__version__ = "0.1.0"

__all__ = [
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
