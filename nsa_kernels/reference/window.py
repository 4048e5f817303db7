"""Reference sliding-window attention (NSA Sec. 3.3.3)."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_window_attention_inputs
from .tiles import default_scale, tiled_masked_attention


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

    def tile_keys(tile):
        first_key = max(0, tile.first_pos - window + 1)  # position of the first key any query of the tile sees
        q_pos = tile.local_positions(q.device)[:, None]
        k_pos = torch.arange(first_key, tile.end_pos, device=q.device)[None, :]
        return tile.key_rows(first_key), (k_pos <= q_pos) & (k_pos > q_pos - window)

    return tiled_masked_attention(q, k, v, default_scale(scale, dims.Dk), cu_seqlens, cu_seqlens_k, tile_keys)
