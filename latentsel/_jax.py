"""How every entry point that runs inference starts JAX: the command line, once per command,
and each worker process of a parallel sweep. Importing this module loads nothing."""
from __future__ import annotations

import os
import sys

__all__ = ["start_jax", "compilation_cache_dir", "use_compilation_cache"]

CACHE_ENV = "LATENTSEL_JAX_CACHE"


def compilation_cache_dir() -> str | None:
    """Where compiled XLA programs are kept between processes: ``$LATENTSEL_JAX_CACHE`` (``off``
    for none), else ``latentsel/jax`` under ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "latentsel", "jax")


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
    use_compilation_cache()


def use_compilation_cache() -> None:
    """Keep compiled programs in :func:`compilation_cache_dir` (JAX's persistent cache, keyed on
    the program, the JAX version and the backend), so that every jitted function compiles once
    per shape bucket and *machine*: a command's first call reads what an earlier command (or a
    worker of a cluster, on its own machine) compiled. A process that set a cache keeps it."""
    import jax  # loads JAX: only when a command or a worker runs inference

    cache = compilation_cache_dir()
    if cache is not None and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
