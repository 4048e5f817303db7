"""Reference compressed-attention branch (NSA Sec. 3.3.1)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..layout import compressed_cu_seqlens
from ..validation import check_compressed_attention_inputs
from .tiles import compute_dtype, default_scale, key_segment_offsets, masked_gqa_attention, query_tiles, run_tile


def compressed_block_visibility(positions: torch.Tensor, num_blocks: int, block_len: int, stride: int) -> torch.Tensor:
    """bool ``[tq, num_blocks]``: query at position ``t`` (from its document / key segment start) sees block
    ``i`` iff ``i*stride + block_len - 1 <= t``."""
    block_end = torch.arange(num_blocks, device=positions.device) * stride + block_len - 1
    return block_end[None, :] <= positions[:, None]


def compressed_doc_ranges(cu_seqlens: Optional[torch.Tensor], num_cmp: int, block_len: int, stride: int):
    """Per document (or key segment: pass ``cu_seqlens_k``), the ``(start, end)`` rows of its blocks in the
    packed compressed K/V."""
    if cu_seqlens is None:
        return [(0, num_cmp)]
    offsets = compressed_cu_seqlens(cu_seqlens, block_len, stride).tolist()
    return [(offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_len: int, stride: int,
                         scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                         cu_seqlens_k: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the compressed blocks that end at or before it.

    Args:
        q: ``[B, T, HQ, Dk]``.
        k_cmp, v_cmp: ``[B, Nc, H, Dk]`` / ``[B, Nc, H, Dv]``, compressed block ``i`` of a document covering
            its tokens ``[i*stride, i*stride + block_len)``; with ``cu_seqlens`` packed document after
            document (``Nc = sum_n max(0, (L_n - block_len) // stride + 1)``).
        block_len, stride: compression block length ``l`` and stride ``d`` (``l % d == 0``).
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N + 1]`` packed-document offsets (B = 1).
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments on the raw token axis (needs ``cu_seqlens``,
            which then describes N query segments; ``L_k[n] >= L_q[n]``). Query ``j`` of segment ``n`` sits at
            position ``L_k[n] - L_q[n] + j`` of key segment ``n`` (bottom-right aligned) and blocks are
            numbered from the key segment start; k_cmp / v_cmp hold ``num_compressed_blocks(L_k[n])`` rows
            per key segment, packed (``Nc = compressed_cu_seqlens(cu_seqlens_k, l, d)[-1]``). Default: the
            key segments are the documents of ``cu_seqlens``.
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype and ``lse [B, T, HQ]`` (fp32, fp64 for fp64 inputs, no gradient):
        query at position ``t`` attends block ``i`` iff ``i*stride + block_len - 1 <= t`` (positions in its
        document, or key segment). A query that sees no block gets ``o = 0`` and ``lse = -inf``.
    """
    dims = check_compressed_attention_inputs(q, k_cmp, v_cmp, block_len, stride, cu_seqlens, cu_seqlens_k)
    scale = default_scale(scale, dims.Dk)
    ct = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(ct), k_cmp.to(ct), v_cmp.to(ct)
    ranges = compressed_doc_ranges(key_segment_offsets(cu_seqlens, cu_seqlens_k), k_cmp.shape[1], block_len, stride)

    def tile_fn(q_tile, k_seg, v_seg, mask):
        return masked_gqa_attention(q_tile, k_seg, v_seg, mask, scale)

    outs, lses = [], []
    for tile in query_tiles(cu_seqlens, dims.T, cu_seqlens_k):
        c0, c1 = ranges[tile.segment]
        mask = compressed_block_visibility(tile.local_positions(q.device), c1 - c0, block_len, stride)
        o, lse = run_tile(tile_fn, q_[:, tile.t0:tile.t1], k_[:, c0:c1], v_[:, c0:c1], mask)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(dims.B, 0, dims.HQ, dims.Dv), q.new_zeros(dims.B, 0, dims.HQ, dtype=ct)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1).detach()
