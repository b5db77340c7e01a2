"""Shared fixtures of the policy tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # these models are tiny: intra-op threads gain nothing and, on a shared CPU, each small op
    # can wait a scheduler slice for its second thread (measured 10-40x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
