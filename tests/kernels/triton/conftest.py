"""Kernel tests build their small inputs with plain ``torch.randn(...)``: on the CPU they run through
Triton's interpreter; on a GPU machine this fixture makes CUDA the default device, so the same tests run
the compiled kernels."""
import pytest
import torch


@pytest.fixture(autouse=True)
def kernels_on_gpu_when_present():
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
