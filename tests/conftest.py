"""Test platform: CPU, float64, fixed seeds."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# the commands' compiled programs are kept for the session's subprocesses, not in the user's cache
os.environ.setdefault("LATENTSEL_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"latentsel-test-jax-{os.getuid()}"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from latentsel.world import default_world  # noqa: E402


@pytest.fixture(scope="session")
def world():
    return default_world()


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules with small tensors: on two cores a second intra-op thread only competes with
    the other pytest worker (the amortized tests ran 4x slower with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
