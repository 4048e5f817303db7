"""Max-logit block selection: the block-maximum op (reference and Triton) against float64 loops, the selection
against loops (packed documents, lengths that are not multiples of the blocks, several GQA ratios, chunked rows),
its relation to key bounds (one-key tiles make the bound exact), and the layer on both backends."""
from __future__ import annotations

import pytest
import torch

import nsa_kernels
import oracle as O
from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_dist import max_logit_selection
from nsa_dist.key_bound_selection import key_bound_select_blocks
from nsa_dist.max_logit_selection import max_logit_select_blocks
from nsa_kernels.triton.block_max import block_max_logits as triton_block_max_logits

PICK = dict(select_len=8, top_n=3, init_blocks=1, local_blocks=1)


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


@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_elements", [1 << 26, 200])
def test_selection_matches_loops(HQ, H, packed, chunk_elements, seed, monkeypatch):
    monkeypatch.setattr(max_logit_selection, "CHUNK_ELEMENTS", chunk_elements)  # 200: a few rows per chunk
    B, T, D = (1 if packed else 2), 53, 5
    cu = torch.tensor([0, 22, T], dtype=torch.int32) if packed else None
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D)
    got = max_logit_select_blocks(q, k, scale=0.7, cu_seqlens=cu, **PICK)
    expected = O.oracle_max_logit_blocks(q, k, scale=0.7, cu_seqlens=cu, **PICK)
    assert torch.equal(got, expected), f"HQ={HQ} H={H} packed={packed} seed={seed}"


def test_equals_key_bounds_over_one_key_tiles(seed):
    """A tile of one key has the key itself as its minimum and maximum: the bound is the logit."""
    q, k = torch.randn(1, 90, 8, 6, dtype=torch.float64), torch.randn(1, 90, 2, 6, dtype=torch.float64)
    cu = torch.tensor([0, 37, 90], dtype=torch.int32)
    exact = max_logit_select_blocks(q, k, scale=0.4, cu_seqlens=cu, **PICK)
    assert torch.equal(exact, key_bound_select_blocks(q, k, scale=0.4, cu_seqlens=cu, tile_len=1, **PICK))


def test_finds_a_needle_that_key_bounds_miss():
    """Filler tiles of one-hot keys ``e_0 .. e_15`` bound an all-ones query's logit at 16 (times the scale) but
    reach only 1; a needle ``0.5 * ones`` among zeros reaches 8. The exact maxima pick the needle's block, the
    bounds pick filler blocks."""
    T, D = 1024, 16
    k = torch.eye(D).repeat(T // D, 1)[None, :, None]  # [1, T, 1, D]
    needle_block = 5
    k[0, needle_block * 64:(needle_block + 1) * 64] = 0.0
    k[0, needle_block * 64 + 10] = 0.5
    q = torch.ones(1, T, 1, D)
    pick = dict(select_len=64, top_n=4, init_blocks=1, local_blocks=1)
    exact = max_logit_select_blocks(q, k, **pick)[0, -1, 0].tolist()
    bound = key_bound_select_blocks(q, k, tile_len=16, **pick)[0, -1, 0].tolist()
    assert needle_block in exact and needle_block not in bound, (exact, bound)


def test_config_accepts_max_logit_and_refuses_the_selection_loss():
    base = dict(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4)
    assert NSAConfig(**base, selection_scoring="max_logit").selection_scoring == "max_logit"
    with pytest.raises(ValueError, match="selection_scoring='max_logit'; set it to 0"):
        NSAConfig(**base, selection_scoring="max_logit", selection_loss_weight=1.0)
