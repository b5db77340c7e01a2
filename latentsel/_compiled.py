"""When the compiled (numba) kernels run instead of the vectorized and jitted paths.

Both give the same numbers (the tests hold them equal); the compiled kernels are several times
faster per trace but cost a process about a second the first time (numba's import and its
first dispatch). So they run where the work pays that back: ``LATENTSEL_COMPILED=auto`` (the
default) from ``threshold`` items of work up, ``always``, or ``never`` (the benchmarks' anchor).
Importing this module loads nothing."""
from __future__ import annotations

import os

__all__ = ["use_compiled", "numba_threads", "COMPILED_ENV"]

COMPILED_ENV = "LATENTSEL_COMPILED"


def use_compiled(work: int, threshold: int) -> bool:
    """Whether a task of ``work`` items (steps, traces) runs compiled; ``ValueError`` naming the
    variable for a value other than ``auto``, ``always`` or ``never``."""
    value = os.environ.get(COMPILED_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "always", "never"):
        raise ValueError(f"{COMPILED_ENV}={value!r}: expected auto, always or never")
    return value == "always" or (value == "auto" and work >= threshold)


def numba_threads() -> None:
    """numba's own thread pool (``workqueue``) for the compiled kernels, unless
    ``NUMBA_THREADING_LAYER`` says otherwise. Its OpenMP layer, the default where libgomp is
    found, keeps its threads spinning after a kernel, which slowed the jitted E-step that runs
    next by 10 to 25 % on 2 cores (the workqueue's threads sleep). Call before the first kernel."""
    if "NUMBA_THREADING_LAYER" not in os.environ:
        from numba import config  # only the modules that hold kernels call this, and they load numba anyway
        config.THREADING_LAYER = "workqueue"
