"""Reference NSA: the three reference branches combined by their gates (NSA Eq. 5)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from ..composition import gated_nsa
from .compressed import compressed_attention
from .gate_combine import gate_combine
from .selected import selected_attention
from .selection import select_blocks
from .window import window_attention

REFERENCE_OPS = SimpleNamespace(compressed_attention=compressed_attention, select_blocks=select_blocks,
                                selected_attention=selected_attention, window_attention=window_attention,
                                gate_combine=gate_combine)


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
            (paper defaults l=32, d=16, l'=64, n=16, w=512, 1 initial and 2 local blocks); ``window=0``
            drops the window branch (flash-linear-attention's configuration).
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype. Blocks are selected from the compressed scores without gradient.
    """
    return gated_nsa(REFERENCE_OPS, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_len=block_len,
                     stride=stride, select_len=select_len, top_n=top_n, window=window, init_blocks=init_blocks,
                     local_blocks=local_blocks, scale=scale, cu_seqlens=cu_seqlens)
