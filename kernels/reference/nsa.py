"""Reference NSA: the three branches combined by their gates (NSA Eq. 5)."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_attention_inputs, check_gates, check_positive_int, check_selection_geometry
from .compressed import compressed_attention
from .selected import selected_attention
from .selection import select_blocks
from .window import window_attention


def nsa_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor, v_slc: torch.Tensor,
                  k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, block_len: int = 32,
                  stride: int = 16, select_len: int = 64, top_n: int = 16, window: int = 512, init_blocks: int = 1,
                  local_blocks: int = 2, scale: Optional[float] = None,
                  cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Native Sparse Attention output ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``.

    Args:
        q: ``[B, T, HQ, Dk]``.
        k_cmp, v_cmp: compressed K/V ``[B, Nc, H, Dk|Dv]`` (see ``compressed_attention``).
        k_slc, v_slc: raw K/V of the selection branch ``[B, T, H, Dk|Dv]``.
        k_win, v_win: raw K/V of the window branch ``[B, T, H, Dk|Dv]`` (pass the same tensors for
            every branch for ``kv_sharing="shared"``).
        gates: ``[B, T, HQ, 3]`` gate values (already through the sigmoid), order compressed, selected, window.
        block_len, stride, select_len, top_n, window, init_blocks, local_blocks: NSA geometry
            (paper defaults l=32, d=16, l'=64, n=16, w=512, 1 initial and 2 local blocks).
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype. Blocks are selected from the compressed scores without gradient.
    """
    check_selection_geometry(block_len, stride, select_len, top_n, init_blocks, local_blocks)
    check_positive_int("window", window)
    dims = check_attention_inputs(q, k_slc, v_slc, cu_seqlens, k_name="k_slc", v_name="v_slc")
    check_attention_inputs(q, k_win, v_win, cu_seqlens, k_name="k_win", v_name="v_win")
    check_gates(gates, dims)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, block_len, stride, scale, cu_seqlens)
    block_idx = select_blocks(q, k_cmp, lse, block_len, stride, select_len, top_n, init_blocks, local_blocks,
                              scale, cu_seqlens)
    o_slc = selected_attention(q, k_slc, v_slc, block_idx, select_len, scale, cu_seqlens)
    o_win = window_attention(q, k_win, v_win, window, scale, cu_seqlens)
    g = gates.to(o_cmp.dtype).unsqueeze(-1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
