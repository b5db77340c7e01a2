"""The fitting methods and their options, one NamedTuple per method (JAX-free: the command
line reads its choices from here).

Each options class names its ``method``, its ``backend`` and the ``backends`` it can run on,
and checks its own values (:meth:`check`); :data:`METHODS` maps a method's name to its class.
"""
from __future__ import annotations

import difflib
from typing import NamedTuple

__all__ = ["EMOptions", "SVIOptions", "NUTSOptions", "AmortizedOptions", "METHODS", "FIT_BACKENDS", "SHARD_BACKENDS", "EVALUATION_TRACES",
           "FitOptions", "fit_options", "did_you_mean"]

FIT_BACKENDS = ("numpyro", "pyro")
# the backends of a sharded EM fit (latentsel.analysis.sharded), which runs no other method
SHARD_BACKENDS = ("dask", "ray")
# the held-out traces of an amortized fit: a tenth of the corpus, at most this many
EVALUATION_TRACES = 2000


def did_you_mean(name, choices) -> str:
    """`` (did you mean 'nuts'?)`` for a near miss among ``choices``, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1) if isinstance(name, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _positive(name: str, value, minimum=1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: unknown {value!r}; choose from {', '.join(choices)}")


class EMOptions(NamedTuple):
    """EM: the MAP in softmax coordinates, ``max_iter`` E-steps at most, stopped when the
    objective's relative change is below ``tol``."""

    max_iter: int = 500
    tol: float = 1e-8

    method = "em"
    backend = "numpyro"
    backends = ("numpyro",)

    def check(self) -> "EMOptions":
        _positive("max_iter", self.max_iter, 0)
        if not self.tol >= 0:  # also refuses NaN
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        return self


class SVIOptions(NamedTuple):
    """SVI with TraceEnum_ELBO: an AutoDelta guide (``"delta"``, the same point as EM by
    stochastic optimization) or an AutoNormal one (``"normal"``, a variational posterior);
    ``steps`` Adam steps of size ``lr``; on the NumPyro or the Pyro backend."""

    guide: str = "delta"
    steps: int = 2000
    lr: float = 0.05
    seed: int = 0
    backend: str = "numpyro"

    method = "svi"
    backends = FIT_BACKENDS

    def check(self) -> "SVIOptions":
        _choice("guide", self.guide, ("delta", "normal"))
        _choice("backend", self.backend, FIT_BACKENDS)
        _positive("steps", self.steps)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        return self


class NUTSOptions(NamedTuple):
    """NUTS on the collapsed posterior: ``chains`` chains of ``warmup`` + ``samples`` draws."""

    warmup: int = 500
    samples: int = 500
    chains: int = 2
    seed: int = 0

    method = "nuts"
    backend = "numpyro"
    backends = ("numpyro",)

    def check(self) -> "NUTSOptions":
        _positive("warmup", self.warmup, 0)
        _positive("samples", self.samples, 4)
        _positive("chains", self.chains)
        return self


class AmortizedOptions(NamedTuple):
    """θ by EM (``em``) on at most ``em_traces`` random traces, then an inference network
    trained ``steps`` steps of ``batch`` traces (Adam, ``lr``) with the ELBO gradient
    ``estimator`` (``"enum"`` or ``"tracegraph"``) on the rest, on torch ``device`` (default:
    CUDA when there is one). The default ``lr``: the network diverged at 0.03 under
    TraceGraph_ELBO, and its KL was 40x higher at 0.05 than at 0.02 under TraceEnum_ELBO
    (default world, 300 steps of 256 traces)."""

    em: EMOptions = EMOptions()
    em_traces: int = 10_000
    estimator: str = "enum"
    steps: int = 2000
    batch: int = 256
    lr: float = 0.02
    seed: int = 0
    device: str | None = None

    method = "amortized"
    backend = "pyro"
    backends = ("pyro",)

    @staticmethod
    def held_out(n_traces: int) -> int:
        """The traces held out to measure the network against the exact posterior: a tenth of
        the corpus, at most :data:`EVALUATION_TRACES`."""
        return min(EVALUATION_TRACES, n_traces // 10)

    def check(self) -> "AmortizedOptions":
        self.em.check()
        _choice("estimator", self.estimator, ("enum", "tracegraph"))
        for name in ("em_traces", "steps", "batch"):
            _positive(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        return self


FitOptions = EMOptions | SVIOptions | NUTSOptions | AmortizedOptions

METHODS: dict[str, type] = {"em": EMOptions, "svi": SVIOptions, "nuts": NUTSOptions, "amortized": AmortizedOptions}


def fit_options(method: str | FitOptions) -> FitOptions:
    """``method``'s default options when given a name; the options themselves, checked, otherwise."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; choose from {', '.join(METHODS)}")
        return METHODS[method]()
    if not isinstance(method, tuple(METHODS.values())):
        raise TypeError(f"options must be a method name or one of {', '.join(c.__name__ for c in METHODS.values())}, "
                        f"got {type(method).__name__}")
    return method.check()
