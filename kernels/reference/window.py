"""Reference sliding-window attention (NSA Sec. 3.3.3)."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_attention_inputs, check_positive_int
from .tiles import compute_dtype, default_scale, masked_gqa_attention, query_tiles, run_tile


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: Optional[float] = None,
                     cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of query ``t`` over keys ``t - window + 1 ... t`` of its own document.

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (the window branch's K/V).
        window: ``w >= 1`` (``w = 1``: each query sees only itself).
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype.
    """
    check_positive_int("window", window)
    dims = check_attention_inputs(q, k, v, cu_seqlens)
    scale = default_scale(scale, dims.Dk)
    ct = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(ct), k.to(ct), v.to(ct)

    def tile_fn(q_tile, k_keys, v_keys, mask):
        return masked_gqa_attention(q_tile, k_keys, v_keys, mask, scale)[0]

    outs = []
    for tile in query_tiles(cu_seqlens, dims.T):
        k0 = max(tile.doc_start, tile.t0 - window + 1)
        q_pos = torch.arange(tile.t0, tile.t1, device=q.device)[:, None]
        k_pos = torch.arange(k0, tile.t1, device=q.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        outs.append(run_tile(tile_fn, q_[:, tile.t0:tile.t1], k_[:, k0:tile.t1], v_[:, k0:tile.t1], mask))
    if not outs:
        return q.new_zeros(dims.B, 0, dims.HQ, dims.Dv)
    return torch.cat(outs, 1).to(q.dtype)
