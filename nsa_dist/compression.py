"""Learnable block compressors phi: ``[l, D]`` raw tokens of a block -> one ``[D]`` compressed token."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nsa_kernels import unfold_blocks


class BlockCompressor(nn.Module):
    """Compresses every block of ``block_len`` tokens (stride ``stride``) of each head into one token.

    Kinds (weights shared by all heads):

    - ``"mlp"``: ``phi(x) = mean_l(x) + MLP(flatten(x + pe))`` with intra-block position embeddings
      ``pe [l, D]`` and a two-layer GELU MLP ``l*D -> hidden -> D`` whose output layer starts at zero,
      so training starts from mean pooling and learns the rest (paper Sec. 3.3.1).
    - ``"linear"``: ``phi(x) = W flatten(x + pe)``, ``W`` initialised to mean pooling.
    - ``"mean"``: parameter-free mean pooling.
    - ``"softmax"``: per-coordinate softmax pooling ``phi(x)_d = sum_i softmax_i(beta_d * x_{i,d}) x_{i,d}`` with a
      learned sharpness ``beta [D]`` starting at 0 (exactly mean pooling); as ``beta_d`` grows it tends to the
      block's max, so one token's large coordinate is no longer diluted ``l``-fold (negative ``beta_d`` tends to
      the min).
    """

    def __init__(self, kind: str, head_dim: int, block_len: int, stride: int, hidden: int):
        super().__init__()
        self.kind, self.block_len, self.stride = kind, block_len, stride
        if kind == "mean":
            return
        if kind == "softmax":
            self.beta = nn.Parameter(torch.zeros(head_dim))
            return
        self.pos_emb = nn.Parameter(torch.empty(block_len, head_dim))
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(block_len * head_dim, hidden), nn.GELU(), nn.Linear(hidden, head_dim))
        elif kind == "linear":
            self.proj = nn.Linear(block_len * head_dim, head_dim, bias=False)
        else:
            raise ValueError(f"unknown compressor kind {kind!r}; expected 'mlp', 'linear', 'mean' or 'softmax'")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Start at mean pooling: zero MLP output layer (``"mlp"``), the averaging matrix (``"linear"``) or zero
        sharpness (``"softmax"``)."""
        if self.kind == "mean":
            return
        if self.kind == "softmax":
            nn.init.zeros_(self.beta)
            return
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.kind == "mlp":
            self.mlp[0].reset_parameters()
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        else:
            head_dim = self.pos_emb.shape[1]
            self.proj.weight.copy_(torch.eye(head_dim).repeat(1, self.block_len) / self.block_len)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, T, H, D]`` -> compressed ``[B, Nc, H, D]`` packed document after document (see
        :func:`nsa_kernels.unfold_blocks`)."""
        blocks = unfold_blocks(x, self.block_len, self.stride, cu_seqlens)  # [B, Nc, H, l, D]
        if self.kind == "mean":
            return blocks.mean(dim=-2)
        if self.kind == "softmax":
            weights = torch.softmax(blocks * self.beta.to(blocks.dtype), dim=-2)
            return (weights * blocks).sum(dim=-2)
        flat = (blocks + self.pos_emb.to(blocks.dtype)).flatten(-2)
        if self.kind == "linear":
            return self.proj(flat)
        return blocks.mean(dim=-2) + self.mlp(flat)
