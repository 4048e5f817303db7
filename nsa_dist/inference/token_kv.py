"""``TokenKV``: the K/V of every token of each sequence of a batch, padded to a fixed capacity."""
from __future__ import annotations

from typing import List

import torch

from .positions import valid_rows, write_rows


class TokenKV:
    """Keys ``k [B, capacity, H, Dk]`` and values ``v [B, capacity, H, Dv]``, row = position; rows a sequence has
    not reached are zero."""

    def __init__(self, batch: int, capacity: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device=None):
        self.k = torch.zeros(batch, capacity, heads, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, capacity, heads, v_dim, dtype=dtype, device=device)

    def fill(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        """Hold the first ``lengths[b]`` rows of ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]`` of each sequence (later
        rows, padding, become zero); ``T <= capacity``."""
        T = k.shape[1]
        keep = valid_rows(lengths, T)[..., None, None]
        self.k.zero_()
        self.v.zero_()
        self.k[:, :T] = torch.where(keep, k, 0).to(self.k.dtype)
        self.v[:, :T] = torch.where(keep, v, 0).to(self.v.dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store ``k [B, S, H, Dk]``, ``v [B, S, H, Dv]`` at rows ``positions`` (int64 ``[B, S]``)."""
        write_rows(self.k, positions, k)
        write_rows(self.v, positions, v)

    def tensors(self) -> List[torch.Tensor]:
        """The tensors held (for the cache's byte count)."""
        return [self.k, self.v]
