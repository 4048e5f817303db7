"""Rotary position embeddings (rotate-half convention, as Llama and Megatron-core)."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates pairs ``(x[i], x[i + D/2])`` of each head by ``position * theta^(-2i/D)``."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, S, H, D]``, integer ``positions [S]`` or ``[B, S]`` -> rotated ``x`` (same dtype)."""
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        angles = positions.to(x.device, ct)[..., None] * self.inv_freq.to(ct)  # [(B,) S, D/2]
        if angles.dim() == 2:
            angles = angles[None]
        cos = torch.cos(angles).repeat(1, 1, 2)[:, :, None, :]
        sin = torch.sin(angles).repeat(1, 1, 2)[:, :, None, :]
        xc = x.to(ct)
        x1, x2 = xc.chunk(2, dim=-1)
        return (xc * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
