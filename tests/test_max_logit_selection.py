"""Max-logit block selection against float64 loops (packed documents, lengths that are not multiples of the
blocks, several GQA ratios, chunked rows), its relation to key bounds (one-key tiles make the bound exact), a
needle that key bounds miss, and the config switch (the layer on both backends: test_key_bound_selection.py)."""
from __future__ import annotations

import pytest
import torch

from nsa_dist import NSAConfig
from nsa_dist import max_logit_selection
from nsa_dist.key_bound_selection import key_bound_select_blocks
from nsa_dist.max_logit_selection import max_logit_select_blocks
from tests.helpers import oracle as O

PICK = dict(select_len=8, top_n=3, init_blocks=1, local_blocks=1)


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
