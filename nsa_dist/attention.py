"""``NativeSparseAttention``: the NSA layer (projections, compressors, gates, rotary, output projection)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .branch_kv import BranchKV
from .branches import nsa_branches
from .compression import BlockCompressor
from .config import NSAConfig
from .parallel import CPStats, UlyssesStats
from .parallel.ulysses import heads_to_sequence, sequence_to_heads, ulysses_local_heads
from .rotary import RotaryEmbedding
from .selection_warmup import FullSelectionSwitch
from .validation import check_layer_inputs


class NativeSparseAttention(FullSelectionSwitch, nn.Module):
    """Native Sparse Attention layer (DeepSeek, arXiv 2502.11089).

    ``x [B, T, hidden]`` -> ``[B, T, hidden]``: q and per-branch K/V projections, learnable compressors
    ``phi_k``, ``phi_v`` over blocks of the compression branch's K/V, a sigmoid gate per query head and
    branch, rotary embeddings, the three branches of :func:`nsa_kernels.nsa_attention`, output projection.

    Rotary: q and the selection/window keys rotate at their token positions; compressors see un-rotated
    keys (content plus intra-block position embeddings) and each compressed key rotates at the position
    of its block's last token, so a query at ``t`` sees block ``i`` at relative distance ``t - (i*d + l - 1) >= 0``.
    """

    def __init__(self, config: NSAConfig, cp_group=None, ulysses_group=None):
        """``cp_group``: optional ``torch.distributed`` process group for context parallelism. Then ``x`` is this
        rank's shard of the sequence in the ``config.cp_layout`` layout (:class:`nsa_dist.parallel.CPLayout`),
        while ``cu_seqlens`` and ``position_ids`` stay global (the values a single-rank call would get).

        ``ulysses_group``: optional process group of ``U`` ranks for Ulysses sequence parallelism
        (:mod:`nsa_dist.parallel.ulysses`): ``x`` is then rank ``u``'s ``u``-th contiguous piece of the sequence
        (of this rank's context-parallel shard when ``cp_group`` is set too), each rank computes NSA on the whole
        sequence (shard) for ``num_heads / U`` query heads (for the whole GQA group of its KV head, replicated on
        ``U / num_kv_heads`` ranks, when ``U > num_kv_heads``), and the context-parallel exchange runs over
        ``cp_group``, the ranks holding the same heads in the other shards."""
        super().__init__()
        c = self.config = config
        self.cp_group = cp_group
        self.ulysses_group = ulysses_group
        self.last_cp_stats: Optional[CPStats] = None  # statistics of the last context-parallel call
        self.last_ulysses_stats: Optional[UlyssesStats] = None  # statistics of the last Ulysses call
        self.last_selection_loss: Optional[torch.Tensor] = None  # selection loss of the last training forward
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
            x: ``[B, T, hidden]`` (under context parallelism: this rank's ``[B, T / P, hidden]`` shard; under
                Ulysses parallelism its ``[B, T / (P * U), hidden]`` piece of that shard).
            cu_seqlens: optional int32 ``[N + 1]`` offsets of packed documents (``B = 1``); no branch
                looks across a document boundary and rotary positions restart at each document. Under
                context or Ulysses parallelism the global offsets (ending at ``T``).
            position_ids: optional int ``[T]`` or ``[B, T]`` rotary positions (default: position within
                the document); global under context or Ulysses parallelism.
        Returns:
            ``[B, T, hidden]`` (the local rows under context or Ulysses parallelism).
        """
        c = self.config
        cp_size, ulysses_size = (1 if g is None else dist.get_world_size(g)
                                 for g in (self.cp_group, self.ulysses_group))
        check_layer_inputs(x, position_ids, c.hidden_size, self.q_proj.weight.dtype, cp_size * ulysses_size)
        B, T, _ = x.shape
        q, kv, gates = self.project(x)
        if ulysses_size > 1:
            q, kv, gates = self._to_heads(q, kv, gates, ulysses_size)
        branch_kv = BranchKV.from_projection(kv, c.head_dim, shared=c.kv_sharing == "shared")
        out = nsa_branches(c, q, branch_kv, gates, k_compressor=self.k_compressor,
                           v_compressor=self.v_compressor, rotary=self.rotary, cu_seqlens=cu_seqlens,
                           position_ids=position_ids, cp_group=self.cp_group, full_selection=self.full_selection)
        if self.cp_group is not None:
            self.last_cp_stats = out.cp_stats
        self.last_selection_loss = out.selection_loss
        o = out.o
        if ulysses_size > 1:
            o = heads_to_sequence(o, c.num_kv_heads, self.ulysses_group, self.last_ulysses_stats)
        return self.o_proj(o.reshape(B, T, c.num_heads * c.v_head_dim))

    def project(self, x: torch.Tensor):
        """``x [B, T, hidden]`` -> un-rotated ``q [B, T, HQ, Dk]``, the K/V projection per branch and KV head
        ``kv [B, T, branches, H, Dk + Dv]`` (:meth:`BranchKV.from_projection` splits it) and the gates
        ``[B, T, HQ, 3]`` after the sigmoid: what the forward (and a decode step) computes before the branches."""
        c = self.config
        B, T, _ = x.shape
        return (self.q_proj(x).view(B, T, c.num_heads, c.head_dim),
                self.kv_proj(x).view(B, T, c.num_kv_branches, c.num_kv_heads, c.head_dim + c.v_head_dim),
                torch.sigmoid(self.gate_proj(x)).view(B, T, c.num_heads, 3))

    def _to_heads(self, q: torch.Tensor, kv: torch.Tensor, gates: torch.Tensor, size: int):
        """This rank's rows of ``q [B, S, HQ, Dk]``, ``kv [B, S, branches, H, Dk + Dv]`` and ``gates [B, S, HQ, 3]``
        -> the whole sequence (``U * S`` rows) of this rank's GQA groups over the Ulysses group of ``size = U``
        ranks (:func:`~nsa_dist.parallel.ulysses.sequence_to_heads`): q and gates ``[B, U*S, n, ...]``, kv
        ``[B, U*S, branches, max(1, H/U), Dk + Dv]``, where ``n = HQ/U`` or, with ``U > H``, the group's ``G``."""
        c = self.config
        ulysses_local_heads(c.num_heads, c.num_kv_heads, size)
        if c.selection_loss_weight:
            raise ValueError(f"selection_loss_weight={c.selection_loss_weight} is not supported under Ulysses "
                             "parallelism (its loss averages over all heads); set it to 0 or run the layer on one rank")
        self.last_ulysses_stats = UlyssesStats(dist.get_rank(self.ulysses_group), size)
        kv_heads = kv.transpose(2, 3).flatten(3).to(q.dtype)  # [B, S, H, branches * (Dk + Dv)]
        q, kv_heads, gates = sequence_to_heads([q, kv_heads, gates.to(q.dtype)], c.num_kv_heads, self.ulysses_group,
                                               self.last_ulysses_stats)
        return q, kv_heads.unflatten(-1, (kv.shape[2], kv.shape[4])).transpose(2, 3), gates
