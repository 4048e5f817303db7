"""Max-logit block selection under context parallelism (:mod:`nsa_dist.max_logit_selection` on one rank).

A query's block maxima need every earlier selection key of its document, wherever it lives: one all-gather of
the raw selection keys (``B*T * H * Dk`` values in all, half of what dense attention's K/V all-gather moves;
no backward, the selection is not differentiable). Each rank then scores each local segment's queries against
its document's keys up to the segment's end exactly as a single rank does, so the selection equals the
single-rank one.
"""
from __future__ import annotations

import torch

from ..max_logit_selection import pick_by_max_logits, rows_per_chunk
from .comm import all_gather_bytes, row_bytes
from .dense import all_gather_global
from .segments import ShardedSequence
from .stats import CPStats


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
