"""Prefill through the Triton kernels (the GPU path; the interpreter on the CPU) and decode steps through the torch
reference equal the Triton forward over the whole sequence."""
import pytest
import torch

import nsa_kernels

from .cases import layer_decode_walk, nsa_config, nsa_layer

pytestmark = pytest.mark.slow  # Triton kernels under the CPU interpreter


@pytest.mark.parametrize("scoring", ["compressed", "max_logit"])
def test_triton_prefill_then_reference_decode(scoring):
    layer = nsa_layer(nsa_config(selection_scoring=scoring), seed=1)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(2))
    with nsa_kernels.use_backend("triton"):
        with torch.no_grad():
            full = layer(x)
        outs = layer_decode_walk(layer, x, torch.tensor([30, 17]))
    for b, out in enumerate(outs):
        torch.testing.assert_close(out, full[b, :out.shape[0]], atol=1e-4, rtol=1e-4)
