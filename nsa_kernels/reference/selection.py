"""Reference top-n block selection (NSA Sec. 3.3.2, Eq. 8-10)."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_select_blocks_inputs
from .compressed import compressed_block_visibility, compressed_doc_ranges
from .tiles import compute_dtype, default_scale, key_segment_offsets, query_tiles


def overlap_weights(num_cmp: int, num_sel: int, block_len: int, stride: int, select_len: int,
                    dtype: torch.dtype, device=None) -> torch.Tensor:
    """Eq. 9 weights ``[num_cmp, num_sel]``: stride-``d`` chunks shared by compressed block i and selection block j.

    Compressed block ``i`` covers chunks ``[i, i + l/d)``, selection block ``j`` chunks
    ``[j*l'/d, (j+1)*l'/d)``; for l=32, d=16, l'=64 a selection block's weights run 1, 2, 2, 2, 1.
    """
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_sel, device=device)[None, :]
    per_sel = select_len // stride
    lo = torch.maximum(i, j * per_sel)
    hi = torch.minimum(i + block_len // stride, (j + 1) * per_sel)
    return (hi - lo).clamp_min(0).to(dtype)


def pick_blocks(scores: torch.Tensor, positions: torch.Tensor, select_len: int, top_n: int,
                init_blocks: int, local_blocks: int) -> torch.Tensor:
    """Top-n selection from block scores with forced blocks and deterministic ties.

    Args:
        scores: ``[..., tq, num_sel]`` importance of each selection block (>= 0).
        positions: ``[tq]`` document positions of the queries.
    Returns:
        int32 ``[..., tq, top_n]``: candidates are blocks ``j`` with ``j * select_len <= t``; blocks
        ``j < init_blocks`` and the ``local_blocks`` most recent candidates are always taken, the rest
        by score, ties to the lower index. Each row is sorted ascending and padded with -1.
    """
    num_sel = scores.shape[-1]
    j = torch.arange(num_sel, device=scores.device)
    last = torch.div(positions, select_len, rounding_mode="floor")[:, None]  # newest candidate per query
    candidate = j[None, :] <= last
    forced = candidate & ((j[None, :] < init_blocks) | (j[None, :] > last - local_blocks))
    ranked = scores.masked_fill(forced, float("inf")).masked_fill(~candidate, float("-inf"))
    # stable descending sort: equal scores keep index order, so ties go to the lower block index
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :top_n]
    taken = torch.gather(ranked, -1, order) > float("-inf")
    sentinel = num_sel  # sorts after every real index, then becomes -1
    chosen = torch.sort(torch.where(taken, order, torch.full_like(order, sentinel)), dim=-1).values
    chosen = torch.where(chosen == sentinel, torch.full_like(chosen, -1), chosen)
    if chosen.shape[-1] < top_n:
        pad = chosen.new_full((*chosen.shape[:-1], top_n - chosen.shape[-1]), -1)
        chosen = torch.cat([chosen, pad], dim=-1)
    return chosen.to(torch.int32)


def pick_by_block_logits(block_logit: torch.Tensor, positions: torch.Tensor, *, select_len: int, top_n: int,
                         init_blocks: int, local_blocks: int) -> torch.Tensor:
    """Selection from per-head block logits.

    Args:
        block_logit: float ``[B, H, G, tq, num_sel]`` scaled logits of each query head for each selection block
            (``-inf`` for a block the query cannot see).
        positions: ``[tq]`` document positions of the queries.
    Returns:
        int32 ``[B, tq, H, top_n]``: per head a softmax over the blocks, summed over the group's heads, then
        :func:`pick_blocks` (sorted, ``-1`` padded).
    """
    probs = torch.softmax(block_logit, dim=-1).nan_to_num(0.0)  # a query that sees no block: all 0
    picked = pick_blocks(probs.sum(2), positions, select_len, top_n, init_blocks, local_blocks)  # [B, H, tq, n]
    return picked.permute(0, 2, 1, 3)


@torch.no_grad()
def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, block_len: int, stride: int,
                  select_len: int, top_n: int, init_blocks: int = 1, local_blocks: int = 2,
                  scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the selection blocks each query attends to, shared by the query heads of a KV group.

    Args:
        q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Nc, H, Dk]`` compressed keys (as for ``compressed_attention``).
        lse: ``[B, T, HQ]`` log-sum-exp returned by ``compressed_attention`` for the same q, k_cmp, scale
            and segments.
        block_len, stride: compression geometry ``l``, ``d``; select_len: selection block ``l'``
            (``l' % d == 0``); top_n: blocks per query; init_blocks / local_blocks: forced leading blocks
            and forced most recent candidates (``init_blocks + local_blocks <= top_n``).
        cu_seqlens: optional int32 ``[N + 1]`` packed-document offsets (B = 1).
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments, exactly as for ``compressed_attention``
            (k_cmp packed per key segment, queries bottom-right aligned); the returned block numbers are
            then counted from each key segment's start and the query position ``t`` below is the position
            in its key segment.
    Returns:
        int32 ``[B, T, H, top_n]``. Block ``j`` (document-relative, tokens ``[j*l', (j+1)*l')``) scores
        ``s_j = sum_{heads of group} sum_i w_ij p_i`` with ``p_i = exp(q k_i * scale - lse)`` over the
        compressed blocks the query sees and ``w`` from :func:`overlap_weights`. Selection follows
        :func:`pick_blocks`. Not differentiable.
    """
    dims = check_select_blocks_inputs(q, k_cmp, lse, block_len, stride, select_len, top_n, init_blocks, local_blocks,
                                      cu_seqlens, cu_seqlens_k)
    scale = default_scale(scale, dims.Dk)
    ct = compute_dtype(q.dtype)
    q_, k_, lse_ = q.to(ct), k_cmp.to(ct), lse.to(ct)
    ranges = compressed_doc_ranges(key_segment_offsets(cu_seqlens, cu_seqlens_k), k_cmp.shape[1], block_len, stride)
    out = torch.full((dims.B, dims.T, dims.H, top_n), -1, dtype=torch.int32, device=q.device)
    for tile in query_tiles(cu_seqlens, dims.T, cu_seqlens_k):
        c0, c1 = ranges[tile.segment]
        pos = tile.local_positions(q.device)
        num_sel = -(-tile.key_len // select_len)
        tq = tile.t1 - tile.t0
        qg = q_[:, tile.t0:tile.t1].reshape(dims.B, tq, dims.H, dims.G, dims.Dk)
        logits = torch.einsum("bqhgd,bshd->bhgqs", qg, k_[:, c0:c1]) * scale
        tile_lse = lse_[:, tile.t0:tile.t1].reshape(dims.B, tq, dims.H, dims.G).permute(0, 2, 3, 1)[..., None]
        visible = compressed_block_visibility(pos, c1 - c0, block_len, stride)
        probs = torch.exp(torch.where(visible, logits - tile_lse, torch.full_like(logits, float("-inf"))))
        group_probs = probs.sum(dim=2)  # [B, H, tq, nc]
        scores = group_probs @ overlap_weights(c1 - c0, num_sel, block_len, stride, select_len, ct, q.device)
        picked = pick_blocks(scores, pos, select_len, top_n, init_blocks, local_blocks)  # [B, H, tq, n]
        out[:, tile.t0:tile.t1] = picked.permute(0, 2, 1, 3)
    return out
