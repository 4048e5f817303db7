"""The transformers integration tests run tiny fp32 models on the CPU: one intra-op thread each."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs under the shared ``one_thread`` fixture."""
    yield
