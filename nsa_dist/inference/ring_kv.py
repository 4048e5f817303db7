"""``RingKV``: the K/V of the last ``size`` tokens of each sequence in a ring buffer (slot = position % size)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from .positions import gather_rows, ring_positions, write_rows


class RingKV:
    """Keys ``k [B, size, H, Dk]`` and values ``v [B, size, H, Dv]``: slot ``j`` holds the newest token whose
    position ``p`` has ``p % size == j`` (zero where none was written yet). Used for the window branch (``size`` =
    window) and for the compressor's unfinished block (``size`` = block length)."""

    def __init__(self, batch: int, size: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype, device=None):
        self.size = size
        self.k = torch.zeros(batch, size, heads, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, size, heads, v_dim, dtype=dtype, device=device)

    def fill(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        """Hold the last ``size`` of the first ``lengths[b]`` rows of ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``."""
        held = ring_positions(lengths, self.size)
        rows = held.clamp_min(0)
        keep = (held >= 0)[..., None, None]
        self.k.copy_(torch.where(keep, gather_rows(k, rows), 0))
        self.v.copy_(torch.where(keep, gather_rows(v, rows), 0))

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the tokens ``k [B, S, H, Dk]``, ``v [B, S, H, Dv]`` at consecutive positions ``positions`` (int64
        ``[B, S]``) in their slots; of more than ``size`` tokens only the last ``size`` remain."""
        last = slice(max(0, positions.shape[1] - self.size), None)
        slots = torch.remainder(positions[:, last], self.size)
        write_rows(self.k, slots, k[:, last])
        write_rows(self.v, slots, v[:, last])

    def read(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[B, S, H, D]`` of the held tokens at ``positions`` (int64 ``[B, S]``, each among the last ``size``
        written)."""
        slots = torch.remainder(positions, self.size)
        return gather_rows(self.k, slots), gather_rows(self.v, slots)

    def tensors(self) -> List[torch.Tensor]:
        """The tensors held (for the cache's byte count)."""
        return [self.k, self.v]
