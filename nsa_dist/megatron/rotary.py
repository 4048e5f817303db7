"""Rotary embeddings as Megatron passes them: its RoPE angle table, looked up by position.

NSA rotates q and the selection/window keys at their token positions and each compressed key at the position of
its block's last token. Megatron's ``rotary_pos_emb`` holds the angles of this rank's tokens (under context
parallelism only the local zigzag rows; for ``thd`` packing the rows of positions ``0 .. S-1``), and every position
NSA rotates at is among them (a rank compresses only blocks whose last token it holds), so the NSA rotation uses
Megatron's own angles: the same numbers on every rank, whatever the RoPE variant computed them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..rotary import apply_rotary


class RotaryTable(nn.Module):
    """``rotary(x, positions)`` with angles looked up in Megatron's table.

    Args:
        rotary_pos_emb: Megatron's angles ``[S, 1, 1, R]`` (halves repeated: ``cat((freqs, freqs), -1)``).
        row_positions: int ``[S]``, the position each row stands for (distinct).
        head_dim: the head dim (``R <= head_dim``; channels past ``R`` are not rotated).
        interleaved: ``config.rotary_interleaved``; not supported (ValueError).
    A position with no row raises ``IndexError`` (on the GPU a device-side assert), never a wrong angle.
    """

    def __init__(self, rotary_pos_emb: torch.Tensor, row_positions: torch.Tensor, head_dim: int,
                 interleaved: bool = False):
        super().__init__()
        if interleaved:
            raise ValueError("rotary_interleaved=True is not supported by the NSA layer; use the default "
                             "rotate-half RoPE (rotary_interleaved=False)")
        S, R = rotary_pos_emb.shape[0], rotary_pos_emb.shape[-1]
        if rotary_pos_emb.numel() != S * R or R % 2 or R > head_dim:
            raise ValueError(f"rotary_pos_emb of shape {tuple(rotary_pos_emb.shape)} is not Megatron's [S, 1, 1, R] "
                             f"RoPE table with an even R <= head_dim={head_dim}")
        if row_positions.shape != (S,):
            raise ValueError(f"rotary_pos_emb has {S} rows but this rank's tokens need {tuple(row_positions.shape)}: "
                             f"expected Megatron's RoPE table for this rank's tokens")
        self.angles = rotary_pos_emb.reshape(S, R)[:, : R // 2]
        row_positions = row_positions.to(self.angles.device, torch.long)
        # position -> row; positions without a row map to S, out of range for the lookup
        self.row_of = torch.full((int(row_positions.max()) + 1,), S, dtype=torch.long, device=self.angles.device)
        self.row_of[row_positions] = torch.arange(S, device=self.angles.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, S', H, D]``, integer ``positions [S']`` or ``[B, S']`` -> ``x`` rotated by Megatron's angles."""
        return apply_rotary(x, self.angles[self.row_of[positions.to(self.row_of.device, torch.long)]])
