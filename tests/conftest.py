"""Shared pytest setup: GPU tests skip cleanly without CUDA; every test gets a fresh, reported seed."""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (set NSA_TEST_SEED=<seed> to replay one); tests put it in their failure messages."""
    value = int(os.environ.get("NSA_TEST_SEED", torch.randint(0, 2**31 - 1, ()).item()))
    torch.manual_seed(value)
    return value
