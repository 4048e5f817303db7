"""NSA as the gated sum of its three branches, composed from any implementation's branch ops (the reference uses it;
the Triton NSA fuses the same steps into one autograd Function, :mod:`nsa_kernels.triton.nsa`, and shares
:func:`check_nsa_inputs`)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from .validation import (AttnDims, check_attention_inputs, check_gates, check_non_negative_int,
                         check_selection_geometry)


def check_nsa_inputs(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                     v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *,
                     block_len: int, stride: int, select_len: int, top_n: int, window: int, init_blocks: int,
                     local_blocks: int, cu_seqlens: Optional[torch.Tensor]) -> AttnDims:
    """Validate the arguments of ``nsa_attention`` (every tensor and the geometry); returns the sizes."""
    check_selection_geometry(block_len, stride, select_len, top_n, init_blocks, local_blocks)
    check_non_negative_int("window", window)
    dims = check_attention_inputs(q, k_slc, v_slc, cu_seqlens, k_name="k_slc", v_name="v_slc")
    check_attention_inputs(q, k_win, v_win, cu_seqlens, k_name="k_win", v_name="v_win")
    check_attention_inputs(q, k_cmp, v_cmp, cu_seqlens, compression=(block_len, stride), k_name="k_cmp",
                           v_name="v_cmp")
    check_gates(gates, dims)
    return dims


def gated_nsa(ops: SimpleNamespace, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
              v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *,
              block_len: int, stride: int, select_len: int, top_n: int, window: int, init_blocks: int,
              local_blocks: int, scale: Optional[float], cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` computed with ``ops`` (a namespace holding
    ``compressed_attention``, ``select_blocks``, ``selected_attention``, ``window_attention`` and ``gate_combine``
    of one implementation). Arguments as :func:`nsa_kernels.reference.nsa_attention`; ``window=0`` drops the window
    branch (its gate is ignored)."""
    check_nsa_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_len=block_len, stride=stride,
                     select_len=select_len, top_n=top_n, window=window, init_blocks=init_blocks,
                     local_blocks=local_blocks, cu_seqlens=cu_seqlens)
    o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, block_len, stride, scale, cu_seqlens)
    block_idx = ops.select_blocks(q, k_cmp, lse, block_len, stride, select_len, top_n, init_blocks, local_blocks,
                                  scale, cu_seqlens)
    o_slc = ops.selected_attention(q, k_slc, v_slc, block_idx, select_len, scale, cu_seqlens)
    o_win = ops.window_attention(q, k_win, v_win, window, scale, cu_seqlens) if window > 0 else None
    return ops.gate_combine(gates, o_cmp, o_slc, o_win)
