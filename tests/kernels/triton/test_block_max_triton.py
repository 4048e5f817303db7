"""The block-maximum op (``nsa_kernels.block_max_logits``): reference and Triton against float64 loops (several
GQA ratios, a partial last block, queries that start inside the keys), the GPU kernel against the reference in
bf16 at long-context shapes, and its input errors."""
from __future__ import annotations

import pytest
import torch

import nsa_kernels
from nsa_kernels.triton.block_max import block_max_logits as triton_block_max_logits
from tests.helpers import oracle as O

pytestmark = pytest.mark.slow  # Triton under the CPU interpreter


def _oracle_block_max(q, k, select_len, scale, first_pos):
    B, tq, HQ, _ = q.shape
    L, H = k.shape[1], k.shape[2]
    G = HQ // H
    out = torch.full((B, H, G, tq, -(-L // select_len)), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for t in range(tq):
            for hq in range(HQ):
                logits = O.oracle_head_block_max(q[b, t, hq].double(), k[b, :, hq // G].double(), first_pos + t,
                                                 select_len, scale)
                for j, v in logits.items():
                    out[b, hq // G, hq % G, t, j] = v
    return out


@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_block_max_matches_loops(HQ, H, impl, seed):
    """Queries at positions 9.. of a 45-key sequence, blocks of 8 (the last one partial)."""
    q, k = torch.randn(2, 30, HQ, 5), torch.randn(2, 45, H, 5)
    op = nsa_kernels.reference.block_max_logits if impl == "reference" else triton_block_max_logits
    got = op(q, k, 8, 0.6, 9)
    expected = _oracle_block_max(q, k, 8, 0.6, 9)
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), f"impl={impl} seed={seed}"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite].double(), expected[finite], rtol=1e-5, atol=1e-5,
                               msg=f"impl={impl} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,H,D", [(16, 4, 64), (64, 4, 128), (32, 8, 128)])
def test_block_max_triton_matches_reference_on_gpu(HQ, H, D, seed):
    """bf16 at long-context shapes: the GPU kernel against the reference (fp32 accumulation in both)."""
    q = torch.randn(1, 300, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3000, H, D, device="cuda", dtype=torch.bfloat16)
    got = triton_block_max_logits(q, k, 64, None, 2700)
    expected = nsa_kernels.reference.block_max_logits(q, k, 64, None, 2700)
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), f"seed={seed}"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=2e-3, atol=2e-3, msg=f"seed={seed}")


def test_block_max_refuses_keys_that_end_before_the_queries():
    with pytest.raises(ValueError, match="k holds 10 keys but the last query sits at position"):
        nsa_kernels.reference.block_max_logits(torch.randn(1, 4, 2, 4), torch.randn(1, 10, 1, 4), 8, None, 7)
    with pytest.raises(ValueError, match="query heads HQ=3 must be a multiple of KV heads H=2"):
        triton_block_max_logits(torch.randn(1, 4, 3, 4), torch.randn(1, 10, 2, 4), 8)
