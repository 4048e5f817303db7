"""Dense causal attention (SDPA) with the same interface as NSA: the baseline the GPT can switch to."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nsa_kernels import doc_local_positions
from nsa_kernels.validation import check_cu_seqlens

from ..parallel.dense import allgather_dense_attention
from ..parallel.layout import CPLayout, check_layout_kind
from ..parallel.sharding import ShardedSequence
from ..rotary import RotaryEmbedding
from ..validation import check_layer_inputs


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

    Context parallelism (``cp_group``, as :class:`~nsa_dist.NativeSparseAttention`): ``x`` is this rank's
    ``[B, T / P, hidden]`` shard in the ``cp_layout`` layout (:class:`~nsa_dist.parallel.CPLayout`), while
    ``cu_seqlens`` and ``position_ids`` stay global; the layer all-gathers K/V over the group and attends each
    local segment to its document's keys (:func:`~nsa_dist.parallel.dense.allgather_dense_attention`), equal
    to the single-rank result. Parameter gradients are then this rank's share (all-reduce them over the group).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: Optional[float] = 10000.0, cp_group=None, cp_layout: str = "zigzag"):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        check_layout_kind(cp_layout, "cp_layout")
        self.cp_group, self.cp_layout = cp_group, cp_layout
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv_proj = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope_theta else None

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        cp_size = 1 if self.cp_group is None else dist.get_world_size(self.cp_group)
        check_layer_inputs(x, position_ids, self.qkv_proj.in_features, self.qkv_proj.weight.dtype, cp_size)
        B, T, _ = x.shape
        context_parallel = cp_size > 1
        if not context_parallel:
            check_cu_seqlens(cu_seqlens, B, T)
        q, k, v = self.qkv_proj(x).view(B, T, -1, self.head_dim).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if context_parallel:
            return self.o_proj(self._context_parallel(q, k, v, cu_seqlens, position_ids).reshape(B, T, -1))
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

    def _context_parallel(self, q, k, v, cu_seqlens, position_ids) -> torch.Tensor:
        """The local shard's ``[B, T/P, ...]`` heads flatten to one packed row (each batch row a document unless
        ``cu_seqlens`` packs them) for :func:`allgather_dense_attention`; returns ``[1, B*T/P, HQ, D]``."""
        B, T_local = q.shape[:2]
        P, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        shards = ShardedSequence(CPLayout(P, T_local * P, self.cp_layout), cu_seqlens, B)
        q, k, v = (t.reshape(1, B * T_local, *t.shape[2:]) for t in (q, k, v))
        if self.rotary is not None:
            pos = shards.rotary_positions(rank, position_ids, device=q.device)
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        return allgather_dense_attention(q, k, v, shards=shards, group=self.cp_group)
