"""Triton per-block maximum logit (:func:`nsa_kernels.reference.block_max_logits` is the reference).

One program per (query tile, batch row and KV head) stacks the group's ``G`` query heads over ``BLOCK_Q`` queries
into the rows of one ``[G_PAD * BLOCK_Q, Dk]`` tile, so each selection block's keys are loaded once for the
whole group; :func:`_block_max` is the key loop: one ``q . k^T`` dot per block, causal mask, row maximum.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.tiles import default_scale
from ..validation import check_block_max_inputs
from .range_attention import prepare_inputs
from .utils import scoring_dot_precision, stride_args

ROWS_PER_PROGRAM = 128  # stacked (head, query) rows per program


@triton.jit
def _block_max(q, k_base, stride_kt, pos, j, L, scale, PREC: tl.constexpr, SELECT_LEN: tl.constexpr,
               SELECT_PAD: tl.constexpr, DK: tl.constexpr, D_PAD: tl.constexpr):
    """fp32 ``[rows]``: the maximum over block ``j``'s keys at or before each row's position ``pos`` of
    ``scale * q . k``; ``-inf`` where none."""
    key_pos = j * SELECT_LEN + tl.arange(0, SELECT_PAD)
    offs_d = tl.arange(0, D_PAD)
    key_ok = (tl.arange(0, SELECT_PAD) < SELECT_LEN) & (key_pos < L)
    k = tl.load(k_base + key_pos[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d < DK)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(key_ok[None, :] & (key_pos[None, :] <= pos[:, None]), s, float("-inf"))
    return tl.max(s, axis=1)


@triton.jit
def block_max_logits_kernel(Q, K, OUT, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                            tq, L, num_sel, first_pos, scale, H: tl.constexpr, G: tl.constexpr,
                            BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, SELECT_LEN: tl.constexpr,
                            SELECT_PAD: tl.constexpr, DK: tl.constexpr, D_PAD: tl.constexpr, PREC: tl.constexpr):
    """Rows ``r = g * BLOCK_Q + i``: query ``pid_q * BLOCK_Q + i`` of head ``h * G + g``; writes every block up
    to the tile's last causal one (the host fills the rest with ``-inf``)."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = tl.arange(0, ROWS)
    g = rows // BLOCK_Q
    t = pid_q * BLOCK_Q + rows % BLOCK_Q
    row_ok = (g < G) & (t < tq)
    offs_d = tl.arange(0, D_PAD)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + t[:, None].to(tl.int64) * stride_qt
              + (h * G + g)[:, None].to(tl.int64) * stride_qh + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < DK)[None, :], other=0.0)
    pos = first_pos + t
    last_pos = first_pos + tl.minimum((pid_q + 1) * BLOCK_Q, tq) - 1
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    out_rows = OUT + ((b * H + h) * G + g).to(tl.int64) * tq * num_sel + t.to(tl.int64) * num_sel
    for j in range(0, tl.minimum(last_pos // SELECT_LEN + 1, num_sel)):
        m = _block_max(q, k_base, stride_kt, pos, j, L, scale, PREC, SELECT_LEN, SELECT_PAD, DK, D_PAD)
        tl.store(out_rows + j, m, mask=row_ok)


@torch.no_grad()
def block_max_logits(q: torch.Tensor, k: torch.Tensor, select_len: int, scale: Optional[float] = None,
                     first_pos: int = 0) -> torch.Tensor:
    """Triton version of :func:`nsa_kernels.reference.block_max_logits` (same arguments and float32
    ``[B, H, G, tq, ceil(L / l')]`` result)."""
    dims = check_block_max_inputs(q, k, select_len, first_pos)
    scale = default_scale(scale, dims.Dk)
    q, k = prepare_inputs(q, k)
    L = k.shape[1]
    num_sel = -(-L // select_len)
    out = torch.full((dims.B, dims.H, dims.G, dims.T, num_sel), float("-inf"), dtype=torch.float32, device=q.device)
    if dims.T == 0:
        return out
    g_pad = triton.next_power_of_2(dims.G)
    block_q = max(1, ROWS_PER_PROGRAM // g_pad)
    grid = (triton.cdiv(dims.T, block_q), dims.B * dims.H)
    block_max_logits_kernel[grid](
        Q=q, K=k, OUT=out, **stride_args(q, "stride_qb", "stride_qt", "stride_qh"),
        **stride_args(k, "stride_kb", "stride_kt", "stride_kh"), tq=dims.T, L=L, num_sel=num_sel,
        first_pos=first_pos, scale=scale, H=dims.H, G=dims.G, BLOCK_Q=block_q, ROWS=g_pad * block_q,
        SELECT_LEN=select_len, SELECT_PAD=max(16, triton.next_power_of_2(select_len)), DK=dims.Dk,
        D_PAD=max(16, triton.next_power_of_2(dims.Dk)),
        PREC=scoring_dot_precision(q.dtype),
        num_warps=4, num_stages=2)
    return out
