"""``delta = rowsum(dO * O)``: the per-row term every flash-style attention backward needs (dS = P * (dP - delta))."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import new_output, stride_args

BLOCK_ROWS = 64  # (batch, token, head) rows per program


@triton.jit
def attention_delta_kernel(O, DO, DELTA, n_rows, T, HQ, so_b, so_t, so_h, sdo_b, sdo_t, sdo_h,
                           DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    """``delta[b, t, hq] = sum_d dO * O`` (fp32), rows flattened as ``(b * T + t) * HQ + hq``; 64-bit offsets."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n_rows
    hq = r % HQ
    bt = r // HQ
    t = bt % T
    b = bt // T
    offs_d = tl.arange(0, BLOCK_DV)
    mask = ok[:, None] & (offs_d[None, :] < DV)
    o = tl.load(O + (b * so_b + t * so_t + hq * so_h)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + (b * sdo_b + t * sdo_t + hq * sdo_h)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + r, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


def attention_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """``delta [B, T, HQ]`` fp32 ``= sum_d do * o`` for ``o``, ``do`` of shape ``[B, T, HQ, Dv]`` (any strides with
    a unit-stride last dim)."""
    B, T, HQ, Dv = o.shape
    delta = new_output((B, T, HQ), torch.float32, o.device)
    n_rows = B * T * HQ
    if n_rows:
        attention_delta_kernel[(triton.cdiv(n_rows, BLOCK_ROWS),)](
            O=o, DO=do, DELTA=delta, n_rows=n_rows, T=T, HQ=HQ, **stride_args(o, "so_b", "so_t", "so_h"),
            **stride_args(do, "sdo_b", "sdo_t", "sdo_h"), DV=Dv, BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
            BLOCK_R=BLOCK_ROWS, num_warps=4)
    return delta
