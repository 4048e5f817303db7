"""Reference sliding-window attention (NSA Sec. 3.3.3)."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_window_attention_inputs
from .tiles import compute_dtype, default_scale, masked_gqa_attention, query_tiles, run_tile


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: Optional[float] = None,
                     cu_seqlens: Optional[torch.Tensor] = None,
                     cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of query ``t`` over keys ``t - window + 1 ... t`` of its own document.

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (the window branch's K/V).
        window: ``w >= 1`` (``w = 1``: each query sees only itself).
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N + 1]`` packed-document offsets (B = 1).
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments (needs ``cu_seqlens``, which then describes N
            query segments; ``L_k[n] >= L_q[n]``): k, v are ``[1, T_k, H, D]`` with
            ``T_k = cu_seqlens_k[-1]``, the key segments packed one after another. Query ``j`` of segment
            ``n`` sits at position ``t = L_k[n] - L_q[n] + j`` of key segment ``n`` (bottom-right aligned)
            and sees its keys ``max(0, t - window + 1) ... t``. Default: the key segments are the documents.
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype.
    """
    dims = check_window_attention_inputs(q, k, v, window, cu_seqlens, cu_seqlens_k)
    scale = default_scale(scale, dims.Dk)
    ct = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(ct), k.to(ct), v.to(ct)

    def tile_fn(q_tile, k_keys, v_keys, mask):
        return masked_gqa_attention(q_tile, k_keys, v_keys, mask, scale)[0]

    outs = []
    for tile in query_tiles(cu_seqlens, dims.T, cu_seqlens_k):
        first_key = max(0, tile.first_pos - window + 1)  # position of the first key any query of the tile sees
        q_pos = tile.local_positions(q.device)[:, None]
        k_pos = torch.arange(first_key, tile.end_pos, device=q.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        keys = tile.key_rows(first_key)
        outs.append(run_tile(tile_fn, q_[:, tile.t0:tile.t1], k_[:, keys], v_[:, keys], mask))
    if not outs:
        return q.new_zeros(dims.B, 0, dims.HQ, dims.Dv)
    return torch.cat(outs, 1).to(q.dtype)
