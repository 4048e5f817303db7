"""Decoding tests run tiny tensors: one intra-op thread each (faster, and immune to an oversubscribed CPU)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs under the shared ``one_thread`` fixture."""
    yield
