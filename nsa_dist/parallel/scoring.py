"""Block selection from the selected branch's own logits under context parallelism: key bounds and exact block
maxima (:mod:`nsa_dist.key_bound_selection` and :mod:`nsa_dist.max_logit_selection` on one rank). Either way
each rank then scores its own queries exactly as a single rank does, so the selection equals the single-rank one.

**Key bounds** (:func:`context_parallel_key_bound_blocks`): each rank folds its local selection keys into the
per-coordinate minima and maxima of the document tiles they belong to (a tile may straddle a chunk boundary, so
a rank may hold only part of one); one all-reduce (max over ``[-kmin, kmax]``) completes every tile's bounds on
every rank: ``2 * T/d * H * Dk`` float32 values, about what the compressed K/V all-gather moves.

**Block maxima** (:func:`context_parallel_max_logit_blocks`): a query's block maxima need every earlier
selection key of its document, wherever it lives: one all-gather of the raw selection keys (``B*T * H * Dk``
values in all, half of what dense attention's K/V all-gather moves; no backward, the selection is not
differentiable); each local segment's queries are scored against their document's keys up to the segment's end.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..key_bound_selection import ROWS_PER_CHUNK, check_tile_len, pick_by_key_bounds
from ..max_logit_selection import pick_by_max_logits, rows_per_chunk
from .comm import all_gather_bytes, row_bytes
from .dense import all_gather_global
from .sharding import ShardedSequence
from .stats import CPStats


@torch.no_grad()
def context_parallel_key_bound_blocks(q: torch.Tensor, k_slc: torch.Tensor, *, shards: ShardedSequence, rank: int,
                                      group, select_len: int, tile_len: int, top_n: int, init_blocks: int,
                                      local_blocks: int, scale: float, stats: CPStats) -> torch.Tensor:
    """Key-bound selection of this rank's queries.

    Args:
        q: ``[1, B*T/P, HQ, Dk]`` local rotated queries; k_slc: ``[1, B*T/P, H, Dk]`` local rotated selection keys
            (the flattened local rows of ``shards``).
        select_len .. scale: as for :func:`~nsa_dist.key_bound_selection.key_bound_select_blocks`.
        stats: the call's statistics; the all-reduce is counted as exchange ``key_bounds`` (ring estimate).
    Returns:
        int32 ``[1, B*T/P, H, top_n]`` document-relative block numbers (global), as ``select_blocks`` returns.
    """
    check_tile_len(select_len, tile_len)
    _, _, H, D = k_slc.shape
    lengths = torch.tensor(shards.doc_bounds).diff()
    tiles = torch.div(lengths + tile_len - 1, tile_len, rounding_mode="floor")
    first_tile = (torch.cumsum(tiles, 0) - tiles).tolist()
    num_tiles = int(tiles.sum())
    device = k_slc.device
    bounds = torch.full((2, num_tiles, H, D), float("-inf"), dtype=torch.float32, device=device)  # -kmin, kmax
    segments = shards.segments(rank)
    for seg in segments:
        keys = k_slc[0, seg.row:seg.row + seg.length].float()
        ids = first_tile[seg.doc] + torch.div(torch.arange(seg.p0, seg.p1, device=device), tile_len,
                                              rounding_mode="floor")
        index = ids[:, None, None].expand_as(keys)
        bounds[0].scatter_reduce_(0, index, -keys, "amax")
        bounds[1].scatter_reduce_(0, index, keys, "amax")
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    P = shards.world_size
    ring = 2 * (P - 1) * bounds.numel() * bounds.element_size() // P
    stats.add("key_bounds", ring, ring)
    out = torch.full((1, q.shape[1], H, top_n), -1, dtype=torch.int32, device=device)
    pick = dict(select_len=select_len, tile_len=tile_len, top_n=top_n, init_blocks=init_blocks,
                local_blocks=local_blocks, scale=scale)
    for seg in segments:
        doc_tiles = slice(first_tile[seg.doc], first_tile[seg.doc] + int(tiles[seg.doc]))
        kmin, kmax = -bounds[0, doc_tiles][None], bounds[1, doc_tiles][None]
        for p in range(seg.p0, seg.p1, ROWS_PER_CHUNK):
            p_end = min(p + ROWS_PER_CHUNK, seg.p1)
            rows = slice(seg.row + p - seg.p0, seg.row + p_end - seg.p0)
            out[:, rows] = pick_by_key_bounds(q[:, rows], torch.arange(p, p_end, device=device), kmin, kmax, **pick)
    return out


@torch.no_grad()
def context_parallel_max_logit_blocks(q: torch.Tensor, k_slc: torch.Tensor, *, shards: ShardedSequence, rank: int,
                                      group, select_len: int, top_n: int, init_blocks: int, local_blocks: int,
                                      scale: float, stats: CPStats) -> torch.Tensor:
    """Max-logit selection of this rank's queries.

    Args:
        q: ``[1, B*T/P, HQ, Dk]`` local rotated queries; k_slc: ``[1, B*T/P, H, Dk]`` local rotated selection keys
            (the flattened local rows of ``shards``).
        select_len .. scale: as for :func:`~nsa_dist.max_logit_selection.max_logit_select_blocks`.
        stats: the call's statistics; the all-gather is counted as exchange ``selection_keys``.
    Returns:
        int32 ``[1, B*T/P, H, top_n]`` document-relative block numbers (global), as ``select_blocks`` returns.
    """
    keys = all_gather_global(k_slc[0], shards, group)[None]  # [1, B*T, H, Dk]
    stats.add("selection_keys", *all_gather_bytes([shards.local_len] * shards.world_size, row_bytes(k_slc[0])))
    out = torch.full((1, q.shape[1], k_slc.shape[2], top_n), -1, dtype=torch.int32, device=q.device)
    pick = dict(select_len=select_len, top_n=top_n, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale)
    for seg in shards.segments(rank):
        rows = rows_per_chunk(-(-seg.p1 // select_len), q.shape[2])
        for p in range(seg.p0, seg.p1, rows):
            p_end = min(p + rows, seg.p1)
            local = slice(seg.row + p - seg.p0, seg.row + p_end - seg.p0)
            out[:, local] = pick_by_max_logits(q[:, local], keys[:, seg.doc_start:seg.doc_start + p_end], p, **pick)
    return out
