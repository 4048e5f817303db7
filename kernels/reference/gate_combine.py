"""Reference gate combination of the NSA branch outputs (NSA Eq. 5)."""
from __future__ import annotations

from typing import Optional

import torch


def gate_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                 o_win: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``o = g_cmp * o_cmp + g_slc * o_slc (+ g_win * o_win)``.

    Args:
        gates: ``[B, T, HQ, 3]`` gate values (after the sigmoid), order compressed, selected, window.
        o_cmp, o_slc, o_win: ``[B, T, HQ, Dv]`` branch outputs; ``o_win=None`` drops the window branch (its
            gate then gets a zero gradient).
    Returns:
        ``[B, T, HQ, Dv]`` in the branch outputs' dtype.
    """
    g = gates.to(o_cmp.dtype).unsqueeze(-1)
    o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc
    if o_win is not None:
        o = o + g[..., 2, :] * o_win
    return o
