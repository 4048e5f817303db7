"""Triton compressed-attention branch (NSA Sec. 3.3.1): the COMPRESSED mode of :mod:`.range_attention`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..reference.tiles import default_scale
from ..validation import check_compressed_attention_inputs
from .range_attention import (COMPRESSED, RangeGeometry, prepare_inputs, range_attention_backward,
                              range_attention_forward)


class CompressedAttentionFunction(torch.autograd.Function):
    """Forward and backward both in Triton; ``lse`` is an output without gradient."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, block_len: int, stride: int, scale: float, cu_seqlens, cu_seqlens_k):
        geom = RangeGeometry(COMPRESSED, block_len=block_len, stride=stride)
        o, lse, tiles = range_attention_forward(q, k_cmp, v_cmp, geom, scale, cu_seqlens, cu_seqlens_k)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, tiles, cu_seqlens, cu_seqlens_k)
        ctx.geom, ctx.scale = geom, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # dlse: lse has no gradient
        q, k_cmp, v_cmp, o, lse, tiles, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = range_attention_backward(do, q, k_cmp, v_cmp, o, lse, tiles, ctx.geom, ctx.scale, cu_seqlens,
                                              cu_seqlens_k)
        return dq, dk, dv, None, None, None, None, None


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_len: int, stride: int,
                         scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                         cu_seqlens_k: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the compressed blocks that end at or before it (Triton).

    Same contract as :func:`nsa_kernels.reference.compressed_attention`:

    Args:
        q: ``[B, T, HQ, Dk]``, fp16 / bf16 / fp32 (fp32 accumulation; fp64 runs in fp32).
        k_cmp, v_cmp: ``[B, Nc, H, Dk]`` / ``[B, Nc, H, Dv]``; compressed block ``i`` of a document covers its
            tokens ``[i*stride, i*stride + block_len)``; with ``cu_seqlens`` packed document after document.
        block_len, stride: compression block length ``l`` and stride ``d`` (``l % d == 0``).
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N + 1]`` packed-document offsets (B = 1).
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments (needs ``cu_seqlens``, which then describes N query
            segments; ``L_k[n] >= L_q[n]``): query ``j`` of segment ``n`` sits at position ``L_k[n] - L_q[n] + j``
            of key segment ``n``, blocks are numbered from the key segment start and k_cmp / v_cmp hold
            ``num_compressed_blocks(L_k[n])`` rows per key segment, packed. Default: the documents.
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype (differentiable w.r.t. q, k_cmp, v_cmp) and ``lse [B, T, HQ]`` fp32
        (natural log, no gradient). Query at position ``p`` (in its document, or key segment) attends block
        ``i`` iff ``i*stride + block_len - 1 <= p``; a query that sees no block gets ``o = 0`` and ``lse = -inf``.
    """
    dims = check_compressed_attention_inputs(q, k_cmp, v_cmp, block_len, stride, cu_seqlens, cu_seqlens_k)
    scale = default_scale(scale, dims.Dk)
    dtype = q.dtype
    q, k_cmp, v_cmp = prepare_inputs(q, k_cmp, v_cmp)
    o, lse = CompressedAttentionFunction.apply(q, k_cmp, v_cmp, block_len, stride, scale, cu_seqlens, cu_seqlens_k)
    return o.to(dtype), lse
