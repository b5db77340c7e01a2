"""How every entry point that runs inference starts JAX: the command line, once per command,
and each worker process of a parallel sweep. Importing this module loads nothing."""
from __future__ import annotations

import os
import sys

__all__ = ["start_jax"]


def start_jax(devices: int = 1) -> None:
    """Start JAX as every command that runs inference needs it: float64 throughout (the one
    place it is switched on) and, when JAX has not started yet, ``devices``
    CPU devices so that NUTS chains run in parallel (up to the cores; XLA reads the count when
    JAX starts, so a process that has JAX already keeps its devices)."""
    if devices > 1 and "jax" not in sys.modules:
        from numpyro.util import set_host_device_count  # loads JAX: only after the count is known

        set_host_device_count(max(1, min(devices, os.cpu_count() or 1)))
    import jax  # this is where JAX starts

    jax.config.update("jax_enable_x64", True)
