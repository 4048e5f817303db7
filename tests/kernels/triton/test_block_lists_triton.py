"""The selected-block lists (:mod:`nsa_kernels.triton.block_lists`) against plain Python sets.

``canonical_rows`` on raw random rows (negative entries, duplicates, blocks past the query, any integer dtype,
row lengths that are not powers of two, packed documents, key segments longer than the query segments) must
give ``sorted({j in row : 0 <= j <= pos // l'})`` padded with ``EMPTY``; ``tile_unions`` the sorted union of
the canonical rows of each query tile's queries, and its length. Positions are recomputed here from the
segment lengths, independently of the library's tables; expectations are built on the CPU (explicitly: the
GPU run may set a default device). Runs through the interpreter on the CPU, compiled
on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from nsa_kernels.triton import block_lists as BL
from nsa_kernels.triton.utils import query_tile_table
from tests.helpers.segments import offsets

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: Triton kernels under the CPU interpreter


def _positions(T, q_lengths, k_lengths):
    """Each query's position in its key segment: bottom-right aligned (``L_k - L_q + j`` for query ``j``)."""
    if q_lengths is None:
        return list(range(T))
    k_lengths = k_lengths or q_lengths
    return [lk - lq + j for lq, lk in zip(q_lengths, k_lengths) for j in range(lq)]


def _offsets(lengths):
    return None if lengths is None else offsets(lengths)


def _want_rows(block_idx, select_len, pos):
    B, T, H, n = block_idx.shape
    want = []
    for b in range(B):
        for t in range(T):
            for h in range(H):
                seen = sorted({j for j in block_idx[b, t, h].tolist() if 0 <= j <= pos[t] // select_len})
                want.append(seen + [BL.EMPTY] * (n - len(seen)))
    return torch.tensor(want, dtype=torch.int32, device="cpu").reshape(B, T, H, n)


CASES = {  # name: (B, T, H, n, select_len, query segment lengths, key segment lengths)
    "B2_n3": (2, 45, 2, 3, 8, None, None),
    "n16": (1, 70, 3, 16, 4, None, None),
    "packed_n20": (1, 61, 2, 20, 8, [1, 30, 9, 21], None),
    "keys_longer_n5": (1, 40, 1, 5, 16, [12, 28], [50, 30]),
    "n1": (2, 17, 2, 1, 4, None, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_canonical_rows_against_python_sets(seed, device, case, dtype):
    B, T, H, n, select_len, q_lengths, k_lengths = CASES[case]
    pos = _positions(T, q_lengths, k_lengths)
    hi = max(pos) // select_len + 3  # some blocks past every query
    block_idx = torch.randint(-3, hi, (B, T, H, n), dtype=torch.int64, device="cpu")
    block_idx[..., : n // 2] = block_idx[..., n - n // 2:]  # duplicates in every row
    got = BL.canonical_rows(block_idx.to(dtype).to(device), select_len, _offsets(q_lengths),
                            _offsets(k_lengths) if k_lengths else None).cpu()
    want = _want_rows(block_idx, select_len, pos)
    assert got.dtype == torch.int32
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{case} {dtype}: first bad row {bad[0].tolist()} (seed={seed})"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("BQ", [2, 3, 4, 16])
def test_tile_unions_against_python_sets(seed, device, case, BQ):
    B, T, H, n, select_len, q_lengths, k_lengths = CASES[case]
    pos = _positions(T, q_lengths, k_lengths)
    block_idx = torch.randint(-1, max(pos) // select_len + 1, (B, T, H, n), device="cpu")
    canon = _want_rows(block_idx, select_len, pos)
    tiles = query_tile_table(_offsets(q_lengths), T, BQ, device)
    uni, cnt = (x.cpu() for x in BL.tile_unions(canon.to(device), tiles, BQ))
    tiles = tiles.cpu()
    assert uni.shape == (B, tiles.shape[0], H, BQ * n) and cnt.shape == (B, tiles.shape[0], H)
    for i, (_, q_end, start, *_rest) in enumerate(tiles.tolist()):
        queries = range(start, min(start + BQ, q_end))
        for b in range(B):
            for h in range(H):
                seen = sorted({j for t in queries for j in canon[b, t, h].tolist()} - {BL.EMPTY})
                assert uni[b, i, h].tolist() == seen + [BL.EMPTY] * (BQ * n - len(seen)), (
                    f"{case} BQ={BQ}: tile {i} (queries {list(queries)}), b={b} h={h} (seed={seed})")
                assert cnt[b, i, h].item() == len(seen), f"{case} BQ={BQ}: tile {i} count (seed={seed})"
