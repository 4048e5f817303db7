"""Triton sliding-window attention (NSA Sec. 3.3.3): the WINDOW mode of :mod:`.range_attention`."""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.tiles import default_scale
from ..validation import check_window_attention_inputs
from .range_attention import (WINDOW, RangeGeometry, prepare_inputs, range_attention_backward,
                              range_attention_forward)


class WindowAttentionFunction(torch.autograd.Function):
    """Forward and backward both in Triton; saves ``q, k, v, o, lse`` (O(T * HQ) extra state)."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, cu_seqlens, cu_seqlens_k):
        geom = RangeGeometry(WINDOW, window=window)
        o, lse, tiles = range_attention_forward(q, k, v, geom, scale, cu_seqlens, cu_seqlens_k)
        ctx.save_for_backward(q, k, v, o, lse, tiles, cu_seqlens, cu_seqlens_k)
        ctx.geom, ctx.scale = geom, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, tiles, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = range_attention_backward(do, q, k, v, o, lse, tiles, ctx.geom, ctx.scale, cu_seqlens,
                                              cu_seqlens_k)
        return dq, dk, dv, None, None, None, None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: Optional[float] = None,
                     cu_seqlens: Optional[torch.Tensor] = None,
                     cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of query ``t`` over keys ``t - window + 1 ... t`` of its own document (Triton).

    Same contract as :func:`nsa_kernels.reference.window_attention`:

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (HQ = G * H, query head ``hq`` reads
            KV head ``hq // G``), fp16 / bf16 / fp32 (fp32 accumulation; fp64 runs in fp32).
        window: ``w >= 1`` (``w = 1``: each query sees only itself).
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N + 1]`` packed-document offsets (B = 1); windows never cross documents.
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments (needs ``cu_seqlens``, which then describes N query
            segments; ``L_k[n] >= L_q[n]``): k, v are ``[1, T_k, H, D]``, ``T_k = cu_seqlens_k[-1]``, the key
            segments packed one after another; query ``j`` of segment ``n`` sits at position
            ``t = L_k[n] - L_q[n] + j`` of key segment ``n`` and sees its keys ``max(0, t - window + 1) ... t``.
            Default: the key segments are the documents.
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype, differentiable w.r.t. q, k and v.
    """
    dims = check_window_attention_inputs(q, k, v, window, cu_seqlens, cu_seqlens_k)
    scale = default_scale(scale, dims.Dk)
    dtype = q.dtype
    q, k, v = prepare_inputs(q, k, v)
    return WindowAttentionFunction.apply(q, k, v, clamped_window(window, k.shape[1]), scale, cu_seqlens,
                                         cu_seqlens_k).to(dtype)


def clamped_window(window: int, key_rows: int) -> int:
    """``window`` capped at the key axis length: a longer window is the whole (causal) segment, and the smaller
    value keeps the kernel's constexpr (and the number of compiled variants) small."""
    return min(window, max(key_rows, 1))
