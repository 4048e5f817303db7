"""Selected-block lists in the form the selected-attention kernels read, built by two small Triton kernels.

* **Canonical rows** (:func:`canonical_rows`): each query's row of ``block_idx`` reduced to the blocks ``j`` it
  can see keys of (``0 <= j`` and ``j * l' <= t``, ``t`` the query's position in its key segment), distinct,
  ascending, then :data:`EMPTY`. Same visible keys as the raw row, whatever the raw row held (negative
  entries, duplicates, blocks past the query, any order).
* **Tile unions** (:func:`tile_unions`): for a forward / dq program that packs ``BQ`` consecutive queries of
  one segment, the union of their canonical rows (distinct, ascending, ``EMPTY``-padded) and its length.

Both are one pass over their input: a program loads a register tile of rows, sorts each row with a bitonic
network (:mod:`.bitonic`), replaces every entry equal to its left neighbour by ``EMPTY`` (``tl.gather`` of the
row shifted by one) and sorts again. They replace batched torch sorts, cumsums and gathers, whose short-row
scans were slow on the GPU (``benchmarks/RESULTS.md``, "Tuning notes behind the kernels' heuristics").
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .bitonic import sort_rows
from .tile_loads import tile_row
from .utils import new_output, pow2, query_positions

EMPTY = 2 ** 30  # canonical "no block" entry: sorts after every real index, never equals one
TILE_ELEMS = 2048  # entries per program (rows x padded row length)


@triton.jit
def _distinct_sorted(x, N_DIMS: tl.constexpr, EMPTY_ID: tl.constexpr):
    """int32 ``[R, 2**N_DIMS]`` -> per row its distinct values, ascending, then ``EMPTY_ID`` (the largest
    value; entries already ``EMPTY_ID`` count as empty)."""
    x = sort_rows(x, N_DIMS, 0)
    i = tl.arange(0, 2 ** N_DIMS)[None, :]
    left = tl.gather(x, tl.broadcast_to(tl.maximum(i - 1, 0), x.shape), 1)
    x = tl.where((i > 0) & (x == left), EMPTY_ID, x)
    return sort_rows(x, N_DIMS, 0)


@triton.jit
def canonical_block_rows_kernel(IDX, POS, OUT, n_rows, T, H, N_IDX, SELECT_LEN,
                                BLOCK_R: tl.constexpr, N_DIMS: tl.constexpr, EMPTY_ID: tl.constexpr):
    """Canonical rows (module docstring) of ``BLOCK_R`` rows of the flattened ``block_idx [B, T, H, N_IDX]`` per
    program; row ``r`` is token ``(r // H) % T``, whose position is ``POS[token]``."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    limit = tl.load(POS + (r // H) % T, mask=r_ok, other=0) // SELECT_LEN  # the last block holding a visible key
    c = tl.arange(0, 2 ** N_DIMS)
    m = r_ok[:, None] & (c[None, :] < N_IDX)
    e = tl.load(IDX + r[:, None] * N_IDX + c[None, :], mask=m, other=-1).to(tl.int64)
    e = tl.where((e >= 0) & (e <= limit[:, None]), e, EMPTY_ID).to(tl.int32)
    tl.store(OUT + r[:, None] * N_IDX + c[None, :], _distinct_sorted(e, N_DIMS, EMPTY_ID), mask=m)


@triton.jit
def tile_block_unions_kernel(CANON, TILES, UNI, UCNT, n_unions, T, H, NT, N_IDX, UL,
                             BLOCK_R: tl.constexpr, BQ: tl.constexpr, BQP: tl.constexpr, NP: tl.constexpr,
                             U_DIMS: tl.constexpr, EMPTY_ID: tl.constexpr):
    """Union of the canonical rows of each query tile's ``BQ`` queries and its length, ``BLOCK_R`` unions of the
    flattened ``[B, NT, H]`` per program; union ``u`` = (tile ``(u // H) % NT``, KV head ``u % H``)."""
    u = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    u_ok = u < n_unions
    h = u % H
    tile = (u // H) % NT
    b = (u // (H * NT)).to(tl.int64)
    _, q_end, tile_start, _, _, _ = tile_row(TILES, tile)
    i = tl.arange(0, BQP)[None, :]
    t = tile_start[:, None] + i  # [BLOCK_R, BQP] the tile's query rows (BQ of them)
    c = tl.arange(0, NP)
    ok = (u_ok[:, None] & (i < BQ) & (t < q_end[:, None]))[:, :, None] & (c < N_IDX)[None, None, :]
    row = (b[:, None] * T + t) * H + h[:, None]
    x = tl.load(CANON + row[:, :, None] * N_IDX + c[None, None, :], mask=ok, other=EMPTY_ID)
    x = _distinct_sorted(tl.reshape(x, [BLOCK_R, BQP * NP]), U_DIMS, EMPTY_ID)
    cu = tl.arange(0, BQP * NP)
    tl.store(UNI + u.to(tl.int64)[:, None] * UL + cu[None, :], x, mask=u_ok[:, None] & (cu[None, :] < UL))
    tl.store(UCNT + u, tl.sum((x < EMPTY_ID).to(tl.int32), 1), mask=u_ok)


def _log2_pow2(x: int) -> int:
    """``log2`` of the smallest power of two ``>= x``."""
    return pow2(x).bit_length() - 1


def canonical_rows(block_idx: torch.Tensor, select_len: int, cu_seqlens: Optional[torch.Tensor],
                   cu_seqlens_k: Optional[torch.Tensor]) -> torch.Tensor:
    """int32 ``[B, T, H, n]`` canonical rows (module docstring) of the integer ``block_idx [B, T, H, n]``, on its
    device; ``cu_seqlens`` / ``cu_seqlens_k``: CPU segment offsets as in
    :func:`.selected_attention.selected_attention`."""
    B, T, H, n = block_idx.shape
    out = new_output((B, T, H, n), torch.int32, block_idx.device)
    n_rows = B * T * H
    if n_rows == 0:
        return out
    pos = query_positions(cu_seqlens, T, cu_seqlens_k, block_idx.device)
    n_dims = _log2_pow2(n)
    R = max(1, TILE_ELEMS >> n_dims)
    canonical_block_rows_kernel[(triton.cdiv(n_rows, R),)](
        IDX=block_idx.contiguous(), POS=pos, OUT=out, n_rows=n_rows, T=T, H=H, N_IDX=n, SELECT_LEN=select_len,
        BLOCK_R=R, N_DIMS=n_dims, EMPTY_ID=EMPTY, num_warps=4)
    return out


def tile_unions(canon: torch.Tensor, tiles: torch.Tensor, BQ: int):
    """Union of the canonical rows of each query tile's ``BQ`` queries: int32 ``[B, n_tiles, H, BQ * n]``
    (distinct, ascending, :data:`EMPTY`-padded) and its length int32 ``[B, n_tiles, H]``. ``canon``: from
    :func:`canonical_rows`; ``tiles``: the int32 query tile table of ``BQ`` rows on canon's device
    (:func:`.utils.query_tile_table`). With ``BQ = 1`` the union is the row itself."""
    B, T, H, n = canon.shape
    if BQ == 1:  # one tile per token, in token order
        return canon, (canon < EMPTY).sum(-1, dtype=torch.int32).contiguous()
    NT = tiles.shape[0]
    uni = new_output((B, NT, H, BQ * n), torch.int32, canon.device)
    ucnt = new_output((B, NT, H), torch.int32, canon.device)
    n_unions = B * NT * H
    if n_unions == 0:
        return uni, ucnt
    NP, BQP = triton.next_power_of_2(n), triton.next_power_of_2(BQ)
    u_dims = _log2_pow2(BQP * NP)
    R = max(1, TILE_ELEMS >> u_dims)
    tile_block_unions_kernel[(triton.cdiv(n_unions, R),)](
        CANON=canon, TILES=tiles, UNI=uni, UCNT=ucnt, n_unions=n_unions, T=T, H=H, NT=NT, N_IDX=n, UL=BQ * n,
        BLOCK_R=R, BQ=BQ, BQP=BQP, NP=NP, U_DIMS=u_dims, EMPTY_ID=EMPTY, num_warps=4)
    return uni, ucnt
