"""Backend choice of the public ops: Triton for CUDA tensors or under TRITON_INTERPRET=1, else the reference."""
import pytest
import torch

import nsa_kernels
from nsa_kernels import dispatch


@pytest.mark.parametrize("env_backend, interpret, expected", [
    ("auto", "0", "reference"),
    ("auto", "1", "triton"),
    ("reference", "1", "reference"),
    ("triton", "0", "triton"),
])
def test_backend_choice_on_cpu(monkeypatch, env_backend, interpret, expected):
    monkeypatch.setenv("NSA_KERNELS_BACKEND", env_backend)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert nsa_kernels.selected_backend(torch.zeros(1)) == expected


def test_use_backend_overrides_environment(monkeypatch):
    monkeypatch.setenv("NSA_KERNELS_BACKEND", "triton")
    with nsa_kernels.use_backend("reference"):
        assert nsa_kernels.selected_backend(torch.zeros(1)) == "reference"
    assert nsa_kernels.selected_backend(torch.zeros(1)) == "triton"


def test_bad_backend_names(monkeypatch):
    monkeypatch.setenv("NSA_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NSA_KERNELS_BACKEND='cuda' is not one of"):
        nsa_kernels.selected_backend(torch.zeros(1))
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        with nsa_kernels.use_backend("fast"):
            pass


def test_public_ops_keep_reference_signature_and_docs():
    for name in dispatch.TRITON_MODULES:
        public, ref = getattr(nsa_kernels, name), getattr(nsa_kernels.reference, name)
        assert public.__doc__ == ref.__doc__ and public.__wrapped__ is ref
