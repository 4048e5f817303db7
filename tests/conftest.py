"""Shared pytest setup: GPU tests skip cleanly without CUDA; fresh, replayable seeds; thread control."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; the flag is read when a kernel is defined,
    # so it is set before any test imports nsa_kernels.triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NSA_KERNELS_POISON", "1")  # kernel outputs start as NaN: unwritten elements fail
# Module, model and training tests run the reference ops (fast on the CPU); kernel tests call
# nsa_kernels.triton.* directly or switch with nsa_kernels.use_backend("triton").
os.environ.setdefault("NSA_KERNELS_BACKEND", "reference")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test drawn from the OS (``NSA_TEST_SEED=<seed>`` replays one), applied to torch's
    global RNG; tests put it in their failure messages."""
    env = os.environ.get("NSA_TEST_SEED")
    value = int(env) if env else torch.seed() % (2 ** 63)
    torch.manual_seed(value)
    return value


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: the GPU when there is one (compiled Triton), else the CPU
    (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny tensors: faster, and immune to an oversubscribed CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
