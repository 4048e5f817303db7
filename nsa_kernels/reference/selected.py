"""Reference selected-block attention (NSA Sec. 3.3.2)."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_selected_attention_inputs
from .tiles import default_scale, tiled_masked_attention


def selected_key_mask(block_idx: torch.Tensor, positions: torch.Tensor, num_keys: int, select_len: int) -> torch.Tensor:
    """bool ``[B, H, tq, num_keys]``: key ``s`` (position in the document / key segment) is visible to the query
    at position ``t`` iff ``s <= t`` and block ``s // select_len`` is one of the query's indices
    ``block_idx [B, tq, H, n]`` (negative = empty)."""
    B, tq, H, _ = block_idx.shape
    num_blocks = -(-num_keys // select_len)
    # out-of-range and empty (-1) entries go to an extra slot that no key maps to
    slot = torch.where((block_idx >= 0) & (block_idx < num_blocks), block_idx.long(), torch.full_like(
        block_idx, num_blocks, dtype=torch.long))
    chosen = torch.zeros(B, tq, H, num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    chosen.scatter_(-1, slot, True)
    key_pos = torch.arange(num_keys, device=block_idx.device)
    mask = chosen[..., key_pos // select_len] & (key_pos[None, :] <= positions[:, None])[None, :, None, :]
    return mask.permute(0, 2, 1, 3)


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, select_len: int,
                       scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                       cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each query over the keys of its selected blocks.

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (the selection branch's K/V).
        block_idx: int ``[B, T, H, n]`` document-relative block numbers (block ``j`` = tokens
            ``[j*select_len, (j+1)*select_len)``), shared by the G query heads of KV head ``h``; negative
            entries are empty, a repeated index counts once, blocks past the document hold no keys.
        select_len: selection block length ``l'``.
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N + 1]`` packed-document offsets (B = 1).
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments (needs ``cu_seqlens``, which then describes N
            query segments; ``L_k[n] >= L_q[n]``): k, v are ``[1, T_k, H, D]`` with
            ``T_k = cu_seqlens_k[-1]``, the key segments packed one after another, and block_idx stays
            ``[1, T, H, n]`` (one row per query) with blocks numbered from the key segment start. Query ``j``
            of segment ``n`` sits at position ``L_k[n] - L_q[n] + j`` of key segment ``n`` (bottom-right
            aligned); causality uses these positions. Default: the key segments are the documents.
    Returns:
        ``o [B, T, HQ, Dv]``: softmax over the selected blocks' keys ``s <= t`` (positions in the document,
        or key segment); ``o = 0`` for a query whose selection holds no such key.
    """
    dims = check_selected_attention_inputs(q, k, v, block_idx, select_len, cu_seqlens, cu_seqlens_k)

    def tile_keys(tile):
        # the tile's queries can only see their key segment's keys up to the tile's last query
        mask = selected_key_mask(block_idx[:, tile.t0:tile.t1], tile.local_positions(q.device), tile.end_pos,
                                 select_len)
        return tile.key_rows(), mask

    return tiled_masked_attention(q, k, v, default_scale(scale, dims.Dk), cu_seqlens, cu_seqlens_k, tile_keys)
