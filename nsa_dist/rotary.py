"""Rotary position embeddings (rotate-half convention, as Llama and Megatron-core)."""
from __future__ import annotations

import torch
from torch import nn


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[i], x[i + R/2])`` of the first ``R = 2 * angles.shape[-1]`` channels of each head by
    ``angles[..., i]``; channels ``R ..`` pass unchanged (Megatron's ``rotary_percent < 1``).

    ``x [B, S, H, D]``, ``angles [S, R/2]`` or ``[B, S, R/2]`` -> rotated ``x`` (same dtype; computed in
    float32, or float64 for float64 ``x``)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = angles.to(x.device, ct)
    if angles.dim() == 2:
        angles = angles[None]
    R = 2 * angles.shape[-1]
    if R > x.shape[-1]:
        raise ValueError(f"{R} rotary channels do not fit head dim {x.shape[-1]}")
    cos = torch.cos(angles).repeat(1, 1, 2)[:, :, None, :]
    sin = torch.sin(angles).repeat(1, 1, 2)[:, :, None, :]
    xc = x[..., :R].to(ct)
    x1, x2 = xc.chunk(2, dim=-1)
    rotated = (xc * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    return rotated if R == x.shape[-1] else torch.cat([rotated, x[..., R:]], dim=-1)


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
        return apply_rotary(x, positions.to(x.device, ct)[..., None] * self.inv_freq.to(x.device, ct))
