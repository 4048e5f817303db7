"""Triton gate combination of the NSA branch outputs: one pass forward, one pass backward.

``o = sum_c g_c * o_c`` over the ``[B, T, HQ, Dv]`` branch outputs is pure memory traffic. Written as torch
ops it costs five elementwise kernels forward (each reading two and writing one full-size tensor) and about
as many backward plus the gate reductions; here the forward reads each branch output once and writes ``o``,
the backward reads ``dO`` and the branch outputs once and writes each ``dO_c = g_c * dO`` and ``dg``
(``sum_d dO * o_c``). fp32 arithmetic, outputs in the inputs' dtypes.

For the fused NSA backward (:mod:`.nsa`) the backward pass also writes each branch's attention term
``delta_c = sum_d dO_c * o_c`` (``dO_c`` as stored, so it equals what :func:`.delta.attention_delta` would compute
from it): the branch backward kernels then skip their own pass over ``o_c`` and ``dO_c``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..validation import check_gate_combine_inputs
from .utils import new_output

BLOCK_ROWS = 16  # (token, head) rows per program


@triton.jit
def _rows(X, r64, offs_d, ok, D: tl.constexpr):
    return tl.load(X + r64[:, None] * D + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def gate_combine_fwd_kernel(GATES, OC, OS, OW, O, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                            HAS_WINDOW: tl.constexpr):
    """``o = g_cmp * o_cmp + g_slc * o_slc (+ g_win * o_win)`` for ``BLOCK_R`` (token, head) rows per program."""
    r64 = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = r64 < n_rows
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    g0 = tl.load(GATES + r64 * 3, mask=row_ok, other=0.0).to(tl.float32)
    g1 = tl.load(GATES + r64 * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    o = g0[:, None] * _rows(OC, r64, offs_d, ok, D) + g1[:, None] * _rows(OS, r64, offs_d, ok, D)
    if HAS_WINDOW:
        g2 = tl.load(GATES + r64 * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        o += g2[:, None] * _rows(OW, r64, offs_d, ok, D)
    tl.store(O + r64[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=ok)


@triton.jit
def _branch_bwd(X, DX, DELTA, do, GATES, c: tl.constexpr, r64, row_ok, n_rows, offs_d, ok, D: tl.constexpr,
                WITH_DELTA: tl.constexpr):
    """Branch ``c``: store ``dO_c = g_c * dO`` and return ``sum_d dO * o_c`` per row; with ``WITH_DELTA`` also
    store ``delta_c = sum_d dO_c * o_c`` (``dO_c`` rounded to its stored dtype) in row ``c`` of ``DELTA``."""
    g = tl.load(GATES + r64 * 3 + c, mask=row_ok, other=0.0).to(tl.float32)
    d_branch = (g[:, None] * do).to(DX.dtype.element_ty)
    tl.store(DX + r64[:, None] * D + offs_d[None, :], d_branch, mask=ok)
    x = _rows(X, r64, offs_d, ok, D)
    if WITH_DELTA:
        tl.store(DELTA + c * n_rows + r64, tl.sum(d_branch.to(tl.float32) * x, 1), mask=row_ok)
    return tl.sum(do * x, 1)


@triton.jit
def gate_combine_bwd_kernel(GATES, OC, OS, OW, DO, DG, DOC, DOS, DOW, DELTA, n_rows, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_WINDOW: tl.constexpr,
                            WITH_DELTA: tl.constexpr):
    """Each branch's ``dO_c = g_c * dO``, the gate gradient ``dg_c = sum_d dO * o_c`` and, with ``WITH_DELTA``,
    each branch's ``delta_c`` (:func:`_branch_bwd`), ``BLOCK_R`` (token, head) rows per program."""
    r64 = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = r64 < n_rows
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    do = _rows(DO, r64, offs_d, ok, D)
    dg0 = _branch_bwd(OC, DOC, DELTA, do, GATES, 0, r64, row_ok, n_rows, offs_d, ok, D, WITH_DELTA)
    dg1 = _branch_bwd(OS, DOS, DELTA, do, GATES, 1, r64, row_ok, n_rows, offs_d, ok, D, WITH_DELTA)
    dg2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_WINDOW:
        dg2 = _branch_bwd(OW, DOW, DELTA, do, GATES, 2, r64, row_ok, n_rows, offs_d, ok, D, WITH_DELTA)
    tl.store(DG + r64 * 3, dg0.to(DG.dtype.element_ty), mask=row_ok)
    tl.store(DG + r64 * 3 + 1, dg1.to(DG.dtype.element_ty), mask=row_ok)
    tl.store(DG + r64 * 3 + 2, dg2.to(DG.dtype.element_ty), mask=row_ok)


def _launch_meta(o: torch.Tensor):
    n_rows = o.numel() // o.shape[-1]
    return n_rows, (triton.cdiv(n_rows, BLOCK_ROWS),), dict(D=o.shape[-1], BLOCK_D=triton.next_power_of_2(
        o.shape[-1]), BLOCK_R=BLOCK_ROWS, num_warps=4)


def combine_forward(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                    o_win: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum_c g_c * o_c`` of contiguous ``gates [B, T, HQ, 3]`` and branch outputs ``[B, T, HQ, Dv]``."""
    out = new_output(o_cmp.shape, o_cmp.dtype, o_cmp.device)
    n_rows, grid, meta = _launch_meta(o_cmp)
    gate_combine_fwd_kernel[grid](GATES=gates, OC=o_cmp, OS=o_slc, OW=o_cmp if o_win is None else o_win, O=out,
                                  n_rows=n_rows, HAS_WINDOW=o_win is not None, **meta)
    return out


def combine_backward(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: Optional[torch.Tensor],
                     do: torch.Tensor, with_delta: bool = False):
    """``(dgates, [dO_cmp, dO_slc, dO_win or None], delta)`` for the output gradient ``do`` (contiguous inputs as
    :func:`combine_forward`). ``delta``: fp32 ``[3, B, T, HQ]``, ``delta[c] = sum_d dO_c * o_c`` (row 2 unwritten
    without the window branch) with ``with_delta``, else ``None``."""
    has_win = o_win is not None
    dg = new_output(gates.shape, gates.dtype, gates.device)
    d_outs = [new_output(o_cmp.shape, o_cmp.dtype, o_cmp.device) for _ in range(3 if has_win else 2)]
    delta = new_output((3, *o_cmp.shape[:-1]), torch.float32, o_cmp.device) if with_delta else None
    n_rows, grid, meta = _launch_meta(o_cmp)
    gate_combine_bwd_kernel[grid](GATES=gates, OC=o_cmp, OS=o_slc, OW=o_win if has_win else o_cmp, DO=do, DG=dg,
                                  DOC=d_outs[0], DOS=d_outs[1], DOW=d_outs[-1], DELTA=dg if delta is None else delta,
                                  n_rows=n_rows, HAS_WINDOW=has_win, WITH_DELTA=with_delta, **meta)
    return dg, d_outs + ([] if has_win else [None]), delta


class _GateCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, o_cmp, o_slc, o_win):
        ctx.save_for_backward(gates, o_cmp, o_slc, o_win)
        return combine_forward(gates, o_cmp, o_slc, o_win)

    @staticmethod
    def backward(ctx, do):
        dg, d_outs, _ = combine_backward(*ctx.saved_tensors, do.contiguous())
        return (dg, *d_outs)


def gate_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                 o_win: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``o = g_cmp * o_cmp + g_slc * o_slc (+ g_win * o_win)`` in one Triton pass (backward: one pass).

    Same contract and checks as :func:`nsa_kernels.reference.gate_combine`: ``gates [B, T, HQ, 3]``, branch
    outputs ``[B, T, HQ, Dv]`` of one shape, dtype and device (the kernel indexes every branch by ``o_cmp``'s
    rows); returns ``[B, T, HQ, Dv]`` in that dtype.
    """
    check_gate_combine_inputs(gates, o_cmp, o_slc, o_win)
    gates, o_cmp, o_slc = gates.contiguous(), o_cmp.contiguous(), o_slc.contiguous()
    return _GateCombine.apply(gates, o_cmp, o_slc, None if o_win is None else o_win.contiguous())
