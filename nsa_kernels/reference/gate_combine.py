"""Reference gate combination of the NSA branch outputs (NSA Eq. 5)."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_gate_combine_inputs
from .tiles import compute_dtype


def gate_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                 o_win: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``o = g_cmp * o_cmp + g_slc * o_slc (+ g_win * o_win)``.

    Args:
        gates: ``[B, T, HQ, 3]`` gate values (after the sigmoid), order compressed, selected, window; any
            floating dtype.
        o_cmp, o_slc, o_win: ``[B, T, HQ, Dv]`` branch outputs of one shape, dtype and device (checked by
            :func:`nsa_kernels.validation.check_gate_combine_inputs`, as in the Triton op); ``o_win=None`` drops
            the window branch (its gate then gets a zero gradient).
    Returns:
        ``[B, T, HQ, Dv]`` in the branch outputs' dtype, summed in fp32 for fp16 / bf16 outputs (as the Triton
        kernel) and in the outputs' dtype for fp32 / fp64.
    """
    check_gate_combine_inputs(gates, o_cmp, o_slc, o_win)
    ct = compute_dtype(o_cmp.dtype)
    g = gates.to(ct).unsqueeze(-1)
    o = g[..., 0, :] * o_cmp.to(ct) + g[..., 1, :] * o_slc.to(ct)
    if o_win is not None:
        o = o + g[..., 2, :] * o_win.to(ct)
    return o.to(o_cmp.dtype)
