"""NSA with the Triton branch kernels as one autograd Function: the gated sum of compressed, selected and window
attention.

Forward: the kernels the branch ops run (compressed attention with its ``lse``, ``select_blocks`` on that ``lse``,
selected attention, window attention) and the gate combination. Backward: one gate-combination pass writes each
branch's output gradient ``dO_c = g_c * dO``, the gate gradient and each branch's ``delta_c = rowsum(dO_c * o_c)``,
so the three branch backwards skip their own pass over ``o_c`` and ``dO_c`` (three fewer full-size reads of two
tensors; composed from the branch ops' autograd Functions they each ran one); then each branch's dq and dK/dV
kernels, and the branches' dq are summed in place. Same numbers as composing the branch ops
(:func:`nsa_kernels.composition.gated_nsa`, which the reference uses): the deltas are computed from the rounded
``dO_c`` exactly as :func:`.delta.attention_delta` would.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..composition import check_nsa_inputs
from ..geometry import NSAGeometry
from ..reference.tiles import default_scale
from .gate_combine import combine_backward, combine_forward
from .range_attention import (COMPRESSED, WINDOW, RangeGeometry, prepare_inputs, range_attention_backward,
                              range_attention_forward)
from .selected_attention import SelectedState, selected_backward, selected_forward
from .select_blocks import select_blocks
from .utils import host_offsets
from .window_attention import clamped_window

N_SLC = SelectedState.N_TENSORS  # the selected branch's saved tensors


class _NSAFunction(torch.autograd.Function):
    """Inputs in the kernel dtype with unit-stride last dims (:func:`.range_attention.prepare_inputs`), contiguous
    gates, the offsets twice (on q's device for ``select_blocks``, which checks that, and on the CPU for the host
    tables of the other kernels); ``geo.window = 0`` drops the window branch."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, geo: NSAGeometry, scale: float,
                cu_seqlens_q_device, cu_seqlens):
        cmp_geom = RangeGeometry(COMPRESSED, block_len=geo.block_len, stride=geo.stride)
        o_cmp, lse_cmp, cmp_tiles = range_attention_forward(q, k_cmp, v_cmp, cmp_geom, scale, cu_seqlens)
        block_idx = select_blocks(q, k_cmp, lse_cmp, geo.block_len, geo.stride, geo.select_len, geo.top_n,
                                  geo.init_blocks, geo.local_blocks, scale, cu_seqlens_q_device)
        o_slc, slc = selected_forward(q.contiguous(), k_slc.contiguous(), v_slc.contiguous(), block_idx,
                                      geo.select_len, scale, cu_seqlens, None)
        win = []
        if geo.window > 0:
            win_geom = RangeGeometry(WINDOW, window=clamped_window(geo.window, k_win.shape[1]))
            o_win, lse_win, win_tiles = range_attention_forward(q, k_win, v_win, win_geom, scale, cu_seqlens)
            win = [o_win, lse_win, win_tiles]
            ctx.win_geom = win_geom
        ctx.save_for_backward(q, k_cmp, v_cmp, k_win, v_win, gates, o_cmp, lse_cmp, cmp_tiles, *slc[:N_SLC], *win)
        ctx.cmp_geom, ctx.scale, ctx.cu_seqlens, ctx.slc_meta = cmp_geom, scale, cu_seqlens, slc[N_SLC:]
        ctx.has_win = geo.window > 0
        return combine_forward(gates, o_cmp, o_slc, win[0] if win else None)

    @staticmethod
    def backward(ctx, do):
        q, k_cmp, v_cmp, k_win, v_win, gates, o_cmp, lse_cmp, cmp_tiles, *rest = ctx.saved_tensors
        slc = SelectedState(*rest[:N_SLC], *ctx.slc_meta)
        o_win, lse_win, win_tiles = rest[N_SLC:] if ctx.has_win else (None, None, None)
        dg, (d_cmp, d_slc, d_win), delta = combine_backward(gates, o_cmp, slc.o, o_win,
                                                            do.to(o_cmp.dtype).contiguous(), with_delta=True)
        dq, dk_cmp, dv_cmp = range_attention_backward(d_cmp, q, k_cmp, v_cmp, o_cmp, lse_cmp, cmp_tiles,
                                                      ctx.cmp_geom, ctx.scale, ctx.cu_seqlens, delta=delta[0])
        dq_slc, dk_slc, dv_slc = selected_backward(slc, d_slc, delta=delta[1], fp32_dq_ok=True)
        dq.add_(dq_slc)
        dk_win = dv_win = None
        if ctx.has_win:
            dq_win, dk_win, dv_win = range_attention_backward(d_win, q, k_win, v_win, o_win, lse_win, win_tiles,
                                                              ctx.win_geom, ctx.scale, ctx.cu_seqlens,
                                                              delta=delta[2])
            dq.add_(dq_win)
        return dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dg, None, None, None, None


def nsa_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor, v_slc: torch.Tensor,
                  k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, block_len: int = 32,
                  stride: int = 16, select_len: int = 64, top_n: int = 16, window: int = 512, init_blocks: int = 1,
                  local_blocks: int = 2, scale: Optional[float] = None,
                  cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton NSA; same contract as :func:`nsa_kernels.reference.nsa_attention`: ``q [B, T, HQ, Dk]``, compressed
    K/V ``[B, Nc, H, Dk|Dv]``, selection and window K/V ``[B, T, H, Dk|Dv]``, ``gates [B, T, HQ, 3]``; returns
    ``o [B, T, HQ, Dv]`` in q's dtype, differentiable in every tensor argument (blocks are selected without
    gradient)."""
    dims = check_nsa_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_len=block_len, stride=stride,
                            select_len=select_len, top_n=top_n, window=window, init_blocks=init_blocks,
                            local_blocks=local_blocks, cu_seqlens=cu_seqlens)
    scale = default_scale(scale, dims.Dk)
    if dims.T == 0:  # nothing to attend: an empty output, differentiable in q and the gates (empty gradients)
        return (q[..., :1] * 0).expand(dims.B, 0, dims.HQ, dims.Dv) + gates[..., :1] * 0
    dtype = q.dtype
    geo = NSAGeometry(block_len, stride, select_len, top_n, window, init_blocks, local_blocks)
    o = _NSAFunction.apply(*prepare_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win),
                           prepare_inputs(gates)[0].contiguous(), geo, scale, cu_seqlens,
                           *host_offsets(cu_seqlens))
    return o.to(dtype)
