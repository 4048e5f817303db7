"""Plain KV cache and decode attention for dense-attention layers (models with ``attention: dense``), so dense
baselines generate the same way as NSA models."""
from __future__ import annotations

from typing import List, Optional

import torch

from nsa_kernels.reference.tiles import compute_dtype, default_scale, masked_gqa_attention

from .positions import check_room, step_positions
from .token_kv import TokenKV


class DenseLayerCache:
    """Rotated keys and values of every token, ``[B, capacity, H, D]`` each (:class:`TokenKV`), and ``lengths``
    (int64 ``[B]``) of ``batch`` sequences in ``dtype``. Memory:
    :func:`~nsa_dist.inference.memory.dense_cache_bytes`."""

    def __init__(self, num_kv_heads: int, head_dim: int, batch: int, capacity: int, dtype: torch.dtype, device=None):
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.kv = TokenKV(batch, capacity, num_kv_heads, head_dim, head_dim, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.k.dtype

    @property
    def batch(self) -> int:
        return self.kv.k.shape[0]

    def fill(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        """Hold right-padded prompts of ``lengths [B]`` tokens: ``k [B, T, H, D]`` rotated, ``v [B, T, H, D]``."""
        check_room(lengths, 0, self.capacity)
        self.lengths.copy_(lengths)
        self.kv.fill(k, v, lengths)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Add ``S`` tokens (``k [B, S, H, D]`` rotated at ``lengths[b] + s``, ``v``) to every sequence; returns
        their positions (int64 ``[B, S]``)."""
        check_room(self.lengths, k.shape[1], self.capacity)
        positions = step_positions(self.lengths, k.shape[1])
        self.kv.write(k, v, positions)
        self.lengths += k.shape[1]
        return positions

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the cache holds (its memory: their ``nbytes``)."""
        return [self.lengths, *self.kv.tensors()]

    def nbytes(self) -> int:
        """Bytes of all tensors held."""
        return sum(t.nbytes for t in self.tensors())


def dense_decode_reference(q: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Causal GQA attention of decode queries ``q [B, S, HQ, D]`` (rotated) at ``positions`` (int64 ``[B, S]``) over a
    dense cache's ``k [B, N, H, D]``, ``v [B, N, H, Dv]`` (row = position; key ``s`` visible iff ``s <= t``); scale
    default ``1 / sqrt(D)``. Returns ``[B, S, HQ, Dv]`` in q's dtype."""
    ct = compute_dtype(q.dtype)
    scale = default_scale(scale, q.shape[-1])
    causal = torch.arange(k.shape[1], device=q.device) <= positions[..., None]                # [B, S, N]
    mask = causal[:, None].expand(k.shape[0], k.shape[2], *causal.shape[1:])
    return masked_gqa_attention(q.to(ct), k.to(ct), v.to(ct), mask, scale)[0].to(q.dtype)
