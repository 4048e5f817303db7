"""NSA with the Triton branch kernels: the gated sum of compressed, selected and window attention."""
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

TRITON_OPS = SimpleNamespace(compressed_attention=compressed_attention, select_blocks=select_blocks,
                             selected_attention=selected_attention, window_attention=window_attention,
                             gate_combine=gate_combine)


def nsa_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor, v_slc: torch.Tensor,
                  k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, block_len: int = 32,
                  stride: int = 16, select_len: int = 64, top_n: int = 16, window: int = 512, init_blocks: int = 1,
                  local_blocks: int = 2, scale: Optional[float] = None,
                  cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton NSA; same contract as :func:`nsa_kernels.reference.nsa_attention`."""
    return gated_nsa(TRITON_OPS, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_len=block_len,
                     stride=stride, select_len=select_len, top_n=top_n, window=window, init_blocks=init_blocks,
                     local_blocks=local_blocks, scale=scale, cu_seqlens=cu_seqlens)
