"""``TileBounds``: per-tile key minima and maxima of the selection keys, for ``selection_scoring="key_bound"``."""
from __future__ import annotations

from typing import List

import torch

from ..key_bound_selection import tile_key_bounds
from .positions import gather_rows, valid_rows


class TileBounds:
    """``kmin``, ``kmax [B, ceil(capacity / tile_len), H, Dk]``: per-coordinate minimum and maximum of the rotated
    selection keys of tile ``n`` (positions ``[n * tile_len, (n + 1) * tile_len)``) once the tile is complete (zero
    before), as :func:`~nsa_dist.key_bound_selection.tile_key_bounds` computes them in training."""

    def __init__(self, batch: int, capacity: int, heads: int, k_dim: int, tile_len: int, dtype: torch.dtype,
                 device=None):
        self.tile_len = tile_len
        num_tiles = -(-capacity // tile_len)
        self.kmin = torch.zeros(batch, num_tiles, heads, k_dim, dtype=dtype, device=device)
        self.kmax = torch.zeros_like(self.kmin)

    def fill(self, k: torch.Tensor, lengths: torch.Tensor) -> None:
        """Bounds of the complete tiles of the first ``lengths[b]`` rows of the rotated keys ``k [B, T, H, Dk]``."""
        kmin, kmax = tile_key_bounds(k, self.tile_len)
        keep = valid_rows(torch.div(lengths, self.tile_len, rounding_mode="floor"), kmin.shape[1])[..., None, None]
        self.kmin.zero_()
        self.kmax.zero_()
        self.kmin[:, :kmin.shape[1]] = torch.where(keep, kmin, 0).to(self.kmin.dtype)
        self.kmax[:, :kmax.shape[1]] = torch.where(keep, kmax, 0).to(self.kmax.dtype)

    def append(self, keys: torch.Tensor, positions: torch.Tensor) -> None:
        """Bound the tiles that the tokens at ``positions`` (int64 ``[B, S]``) complete, reading their keys from
        ``keys [B, N, H, Dk]`` (the cache's rotated selection keys, which already hold those tokens)."""
        t = self.tile_len
        rows, cols = ((positions + 1) % t == 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        tile = torch.div(positions[rows, cols] + 1, t, rounding_mode="floor") - 1                  # [n]
        tile_keys = gather_rows(keys[rows], tile[:, None] * t + torch.arange(t, device=keys.device))  # [n, t, H, D]
        self.kmin[rows, tile] = tile_keys.amin(1)
        self.kmax[rows, tile] = tile_keys.amax(1)

    def tensors(self) -> List[torch.Tensor]:
        """The tensors held (for the cache's byte count)."""
        return [self.kmin, self.kmax]
