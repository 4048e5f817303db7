"""``NativeSparseAttention``: the NSA layer (projections, compressors, gates, rotary, output projection)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import nsa_kernels
from nsa_kernels import compressed_block_last_tokens, doc_local_positions
from nsa_kernels.validation import check_cu_seqlens

from .compression import BlockCompressor
from .config import NSAConfig
from .parallel import CPLayout, CPStats, ShardedSequence, context_parallel_nsa
from .rotary import RotaryEmbedding


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention layer (DeepSeek, arXiv 2502.11089).

    ``x [B, T, hidden]`` -> ``[B, T, hidden]``: q and per-branch K/V projections, learnable compressors
    ``phi_k``, ``phi_v`` over blocks of the compression branch's K/V, a sigmoid gate per query head and
    branch, rotary embeddings, the three branches of :func:`nsa_kernels.nsa_attention`, output projection.

    Rotary: q and the selection/window keys rotate at their token positions; compressors see un-rotated
    keys (content plus intra-block position embeddings) and each compressed key rotates at the position
    of its block's last token, so a query at ``t`` sees block ``i`` at relative distance ``t - (i*d + l - 1) >= 0``.
    """

    def __init__(self, config: NSAConfig, cp_group=None):
        """``cp_group``: optional ``torch.distributed`` process group for context parallelism. Then ``x`` is this
        rank's shard of the sequence in the ``config.cp_layout`` layout (:class:`nsa_dist.parallel.CPLayout`),
        while ``cu_seqlens`` and ``position_ids`` stay global (the values a single-rank call would get)."""
        super().__init__()
        c = self.config = config
        self.cp_group = cp_group
        self.last_cp_stats: Optional[CPStats] = None  # statistics of the last context-parallel call
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.kv_proj = nn.Linear(c.hidden_size, c.num_kv_branches * c.num_kv_heads * (c.head_dim + c.v_head_dim),
                                 bias=c.qkv_bias)
        self.gate_proj = nn.Linear(c.hidden_size, c.num_heads * 3)
        self.o_proj = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.k_compressor = BlockCompressor(c.compressor, c.head_dim, c.block_len, c.stride, c.compressor_hidden)
        self.v_compressor = BlockCompressor(c.compressor, c.v_head_dim, c.block_len, c.stride, c.compressor_hidden)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta) if c.use_rope else None

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args:
            x: ``[B, T, hidden]`` (under context parallelism: this rank's ``[B, T / P, hidden]`` shard).
            cu_seqlens: optional int32 ``[N + 1]`` offsets of packed documents (``B = 1``); no branch
                looks across a document boundary and rotary positions restart at each document. Under
                context parallelism the global offsets (ending at ``T``).
            position_ids: optional int ``[T]`` or ``[B, T]`` rotary positions (default: position within
                the document); global under context parallelism.
        Returns:
            ``[B, T, hidden]`` (the local rows under context parallelism).
        """
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"x must be [B, T, hidden_size={c.hidden_size}], got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        if self.cp_group is None:
            check_cu_seqlens(cu_seqlens, B, T)
        q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim)
        kv = self.kv_proj(x).view(B, T, c.num_kv_branches, c.num_kv_heads, c.head_dim + c.v_head_dim)
        k_all, v_all = kv.split([c.head_dim, c.v_head_dim], dim=-1)
        branch = [0, 1, 2] if c.kv_sharing == "separate" else [0, 0, 0]
        (k_c, k_s, k_w), (v_c, v_s, v_w) = ([t[:, :, i] for i in branch] for t in (k_all, v_all))
        gates = torch.sigmoid(self.gate_proj(x)).view(B, T, c.num_heads, 3)
        if self.cp_group is not None:
            o = self._context_parallel(q, k_c, v_c, k_s, v_s, k_w, v_w, gates, cu_seqlens, position_ids)
            return self.o_proj(o.reshape(B, T, c.num_heads * c.v_head_dim))

        k_cmp = self.k_compressor(k_c, cu_seqlens)
        v_cmp = self.v_compressor(v_c, cu_seqlens)
        if self.rotary is not None:
            if position_ids is None:
                position_ids = doc_local_positions(cu_seqlens, T, device=x.device)
            last = compressed_block_last_tokens(cu_seqlens, T, c.block_len, c.stride, device=x.device)
            q = self.rotary(q, position_ids)
            k_cmp = self.rotary(k_cmp, position_ids[..., last])
            k_s = self.rotary(k_s, position_ids)
            k_w = k_s if c.kv_sharing == "shared" else self.rotary(k_w, position_ids)
        o = nsa_kernels.nsa_attention(
            q, k_cmp, v_cmp, k_s, v_s, k_w, v_w, gates, block_len=c.block_len, stride=c.stride,
            select_len=c.select_len, top_n=c.top_n, window=c.window, init_blocks=c.init_blocks,
            local_blocks=c.local_blocks, scale=c.softmax_scale, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, c.num_heads * c.v_head_dim))

    def _context_parallel(self, q, k_c, v_c, k_s, v_s, k_w, v_w, gates, cu_seqlens, position_ids):
        """NSA of the local shard: the ``[B, T/P, ...]`` tensors flatten to one packed row (each batch row a
        document unless ``cu_seqlens`` packs them) for :func:`~nsa_dist.parallel.context_parallel_nsa`."""
        c = self.config
        B, T_local = q.shape[:2]
        P = dist.get_world_size(self.cp_group)
        shards = ShardedSequence(CPLayout(P, T_local * P, c.cp_layout, c.select_len), cu_seqlens, B)
        rank = dist.get_rank(self.cp_group)
        flat = [t.reshape(1, B * T_local, *t.shape[2:]) for t in (q, k_c, v_c, k_s, v_s, k_w, v_w, gates)]
        q, k_c, v_c, k_s, v_s, k_w, v_w, gates = flat
        if position_ids is not None:
            position_ids = position_ids.to(q.device).expand(B, shards.layout.seq_len).reshape(-1)
        if self.rotary is not None:
            local = shards.positions(rank, device=q.device)
            pos = shards.doc_positions(rank, device=q.device) if position_ids is None else position_ids[local]
            q = self.rotary(q, pos)
            k_s = self.rotary(k_s, pos)
            k_w = k_s if c.kv_sharing == "shared" else self.rotary(k_w, pos)
        o, self.last_cp_stats = context_parallel_nsa(
            q, k_c, v_c, k_s, v_s, k_w, v_w, gates, shards=shards, group=self.cp_group, compress_k=self.k_compressor,
            compress_v=self.v_compressor, rotary=self.rotary, position_ids=position_ids, block_len=c.block_len,
            stride=c.stride, select_len=c.select_len, top_n=c.top_n, window=c.window, init_blocks=c.init_blocks,
            local_blocks=c.local_blocks, scale=c.softmax_scale, selection_exchange=c.cp_selection_exchange)
        return o
