"""Traces (DESIGN §3) and what is made of them, one module per step of the flow:

* :mod:`latentsel.traces.format`: the :class:`Trace` record and its JSONL file format;
* :mod:`latentsel.traces.regimes`: seeded prompts and golden traces of the prompt regimes;
* :mod:`latentsel.traces.simulate`: traces drawn from the HLSM at given parameters;
* :mod:`latentsel.traces.consistency`: the modules that reproduce each observed step;
* :mod:`latentsel.traces.graph`: the module graph of one trace (which entries each step reads);
* :mod:`latentsel.traces.emission`: traces into the arrays the models see (:class:`HLSMData`).

Importing this package loads the file format only (no JAX, no torch): the policies read and
write traces through it.
"""
from latentsel.traces.format import (
                                     Trace,
                                     TraceFormatError,
                                     Truth,
                                     golden_trace,
                                     iter_traces,
                                     parse_trace,
                                     read_traces,
                                     write_traces,
)

__all__ = ["Trace", "Truth", "TraceFormatError", "read_traces", "iter_traces", "write_traces", "parse_trace",
           "golden_trace"]
