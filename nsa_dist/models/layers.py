"""Small transformer building blocks: the SwiGLU MLP (the norm is ``torch.nn.RMSNorm``)."""
from __future__ import annotations

import torch
from torch import nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with ``hidden -> ffn_hidden -> hidden``."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn_hidden, bias=False)
        self.down = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)
