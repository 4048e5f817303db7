"""Dense causal attention (SDPA) with the same interface as NSA: the baseline the GPT can switch to."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nsa_kernels import doc_local_positions
from nsa_kernels.validation import check_cu_seqlens

from ..rotary import RotaryEmbedding


def document_causal_mask(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """bool ``[T, T]``: key ``s`` visible to query ``t`` iff ``s <= t`` and both lie in the same document."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                  output_size=seq_len)
    pos = torch.arange(seq_len, device=cu_seqlens.device)
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


class DenseAttention(nn.Module):
    """Full causal GQA attention through ``torch.nn.functional.scaled_dot_product_attention``.

    ``x [B, T, hidden]`` (+ packed ``cu_seqlens``) -> ``[B, T, hidden]``. With ``cu_seqlens`` it builds a
    ``[T, T]`` block-diagonal mask, so use it as a baseline at the lengths dense attention fits.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: Optional[float] = 10000.0):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv_proj = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope_theta else None

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        check_cu_seqlens(cu_seqlens, B, T)
        q, k, v = self.qkv_proj(x).view(B, T, -1, self.head_dim).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.rotary is not None:
            pos = doc_local_positions(cu_seqlens, T, device=x.device) if position_ids is None else position_ids
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        group = self.num_heads // self.num_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
        if cu_seqlens is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(cu_seqlens, T))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
