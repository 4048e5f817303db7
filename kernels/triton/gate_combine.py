"""Triton gate combination of the NSA branch outputs: one pass forward, one pass backward.

``o = sum_c g_c * o_c`` over the ``[B, T, HQ, Dv]`` branch outputs is pure memory traffic. Written as torch
ops it costs five elementwise kernels forward (each reading two and writing one full-size tensor) and about
as many backward plus the gate reductions; here the forward reads each branch output once and writes ``o``,
the backward reads ``dO`` and the branch outputs once and writes each ``dO_c = g_c * dO`` and ``dg``
(``sum_d dO * o_c``). fp32 arithmetic, outputs in the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import new_output

BLOCK_ROWS = 16  # (token, head) rows per program


@triton.jit
def _rows(X, r64, offs_d, ok, D: tl.constexpr):
    return tl.load(X + r64[:, None] * D + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _combine_fwd_kernel(G, OC, OS, OW, O, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BR: tl.constexpr,
                        HAS_WIN: tl.constexpr):
    r64 = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = r64 < n_rows
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    g0 = tl.load(G + r64 * 3, mask=row_ok, other=0.0).to(tl.float32)
    g1 = tl.load(G + r64 * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    o = g0[:, None] * _rows(OC, r64, offs_d, ok, D) + g1[:, None] * _rows(OS, r64, offs_d, ok, D)
    if HAS_WIN:
        g2 = tl.load(G + r64 * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        o += g2[:, None] * _rows(OW, r64, offs_d, ok, D)
    tl.store(O + r64[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=ok)


@triton.jit
def _branch_bwd(X, DX, do, g, r64, offs_d, ok, D: tl.constexpr):
    """Store ``g * dO`` for one branch and return ``sum_d dO * o_branch`` per row."""
    tl.store(DX + r64[:, None] * D + offs_d[None, :], (g[:, None] * do).to(DX.dtype.element_ty), mask=ok)
    return tl.sum(do * _rows(X, r64, offs_d, ok, D), 1)


@triton.jit
def _combine_bwd_kernel(G, OC, OS, OW, DO, DG, DOC, DOS, DOW, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BR: tl.constexpr, HAS_WIN: tl.constexpr):
    r64 = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = r64 < n_rows
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    do = _rows(DO, r64, offs_d, ok, D)
    dg0 = _branch_bwd(OC, DOC, do, tl.load(G + r64 * 3, mask=row_ok, other=0.0).to(tl.float32), r64, offs_d, ok, D)
    dg1 = _branch_bwd(OS, DOS, do, tl.load(G + r64 * 3 + 1, mask=row_ok, other=0.0).to(tl.float32), r64, offs_d,
                      ok, D)
    dg2 = tl.zeros([BR], dtype=tl.float32)
    if HAS_WIN:
        dg2 = _branch_bwd(OW, DOW, do, tl.load(G + r64 * 3 + 2, mask=row_ok, other=0.0).to(tl.float32), r64,
                          offs_d, ok, D)
    tl.store(DG + r64 * 3, dg0.to(DG.dtype.element_ty), mask=row_ok)
    tl.store(DG + r64 * 3 + 1, dg1.to(DG.dtype.element_ty), mask=row_ok)
    tl.store(DG + r64 * 3 + 2, dg2.to(DG.dtype.element_ty), mask=row_ok)


def _launch_meta(o: torch.Tensor):
    n_rows = o.numel() // o.shape[-1]
    return n_rows, (triton.cdiv(n_rows, BLOCK_ROWS),), dict(D=o.shape[-1], BLOCK_D=triton.next_power_of_2(
        o.shape[-1]), BR=BLOCK_ROWS, num_warps=4)


class _GateCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, o_cmp, o_slc, o_win):
        has_win = o_win is not None
        out = new_output(o_cmp.shape, o_cmp.dtype, o_cmp.device)
        n_rows, grid, meta = _launch_meta(o_cmp)
        _combine_fwd_kernel[grid](gates, o_cmp, o_slc, o_win if has_win else o_cmp, out, n_rows, HAS_WIN=has_win,
                                  **meta)
        ctx.save_for_backward(gates, o_cmp, o_slc, o_win if has_win else o_cmp)
        ctx.has_win = has_win
        return out

    @staticmethod
    def backward(ctx, do):
        gates, o_cmp, o_slc, o_win = ctx.saved_tensors
        do = do.contiguous()
        dg = new_output(gates.shape, gates.dtype, gates.device)
        d_cmp, d_slc = (new_output(o_cmp.shape, o_cmp.dtype, o_cmp.device) for _ in range(2))
        d_win = new_output(o_cmp.shape, o_cmp.dtype, o_cmp.device) if ctx.has_win else d_cmp
        n_rows, grid, meta = _launch_meta(o_cmp)
        _combine_bwd_kernel[grid](gates, o_cmp, o_slc, o_win, do, dg, d_cmp, d_slc, d_win, n_rows,
                                  HAS_WIN=ctx.has_win, **meta)
        return dg, d_cmp, d_slc, (d_win if ctx.has_win else None)


def gate_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                 o_win: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``o = g_cmp * o_cmp + g_slc * o_slc (+ g_win * o_win)`` in one Triton pass (backward: one pass).

    Same contract as :func:`nsa_kernels.reference.gate_combine`: ``gates [B, T, HQ, 3]``, branch outputs
    ``[B, T, HQ, Dv]`` of one dtype; returns ``[B, T, HQ, Dv]`` in that dtype.
    """
    gates, o_cmp, o_slc = gates.contiguous(), o_cmp.contiguous(), o_slc.contiguous()
    return _GateCombine.apply(gates, o_cmp, o_slc, None if o_win is None else o_win.contiguous())
