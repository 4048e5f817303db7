"""Host side of the Triton NSA decode step (:mod:`.nsa_decode_kernels`): ``nsa_decode``, the kernel version of
``nsa_dist.inference.nsa_decode_reference``."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..geometry import NSAGeometry
from ..reference.tiles import default_scale
from .nsa_decode_compressed import (TOKENS, nsa_decode_compressed_kernel, nsa_decode_scores_kernel,
                                    nsa_decode_top_kernel)
from .nsa_decode_kernels import nsa_decode_combine_kernel, nsa_decode_selected_kernel, nsa_decode_window_kernel
from .range_attention import _dot_precision, _pow2
from .selection import LOG2E, selection_config
from .utils import kernel_dtype, new_output

INTERPRETER_PROGRAMS = 8  # programs to aim for under the CPU interpreter, so that small tests split too
PROGRAMS_PER_SM = 4
COMBINE_ROWS = 16


def decode_splits(programs: int, work: int, device: torch.device) -> int:
    """How many splits (each a program) to cut ``work`` units into when ``programs`` programs already run: enough
    for ``PROGRAMS_PER_SM`` programs per streaming multiprocessor, at most one unit per split."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    return max(1, min(work, -(-target // max(programs, 1))))


def _partials(rows: int, splits: int, dv: int, device):
    return (new_output((rows, splits, dv), torch.float32, device), new_output((rows, splits), torch.float32, device))


def _check(q: torch.Tensor, positions: torch.Tensor, kv, gates: torch.Tensor, scoring: str,
           block_idx: Optional[torch.Tensor], geometry: NSAGeometry) -> None:
    B, S, HQ, _ = q.shape
    H = kv.k_slc.shape[2]
    if S > TOKENS:
        raise ValueError(f"the Triton decode step takes at most {TOKENS} queries per sequence, got S={S}")
    if HQ % H:
        raise ValueError(f"query heads HQ={HQ} are not a multiple of the cache's KV heads H={H}")
    if positions.shape != (B, S) or gates.shape != (B, S, HQ, 3):
        raise ValueError(f"positions {tuple(positions.shape)} / gates {tuple(gates.shape)} do not match q "
                         f"{tuple(q.shape)}: expected ({B}, {S}) and ({B}, {S}, {HQ}, 3)")
    if scoring != "compressed" and block_idx is None:
        raise ValueError(f"selection_scoring={scoring!r} is not scored by the Triton decode kernels: pass block_idx "
                         "(the reference's selection, nsa_dist.inference.decode_reference.decode_block_indices)")
    if block_idx is not None and block_idx.shape != (B, S, H, geometry.top_n):
        raise ValueError(f"block_idx has shape {tuple(block_idx.shape)}, expected ({B}, {S}, {H}, {geometry.top_n})")


@torch.no_grad()
def nsa_decode(q: torch.Tensor, positions: torch.Tensor, kv, gates: torch.Tensor, geometry: NSAGeometry,
               scoring: str = "compressed", scale: Optional[float] = None, block_idx: Optional[torch.Tensor] = None,
               return_indices: bool = False):
    """Gated NSA output of decode queries against an NSA cache, in Triton (the contract of
    ``nsa_dist.inference.nsa_decode_reference``, same arguments).

    Args:
        q: ``[B, S, HQ, Dk]`` rotated queries, ``S <= 16`` per sequence (speculative steps); ``hq`` reads KV head
            ``hq // G``.
        positions: int64 ``[B, S]`` query positions, consecutive per sequence; sequences may differ in length.
        kv: the cache's ``DecodeKV`` (``k_cmp, v_cmp [B, Nc, H, D]``, ``k_slc, v_slc [B, N, H, D]`` row = position,
            ``k_win, v_win [B, Nw, H, D]`` with ``win_positions [B, Nw]``; a window that is the selection buffers
            themselves, shared K/V, is read by position).
        gates: ``[B, S, HQ, 3]`` gates after the sigmoid (compressed, selected, window).
        geometry: ``NSAGeometry`` (``window = 0``: no window branch).
        scoring: ``"compressed"`` is scored in the compressed kernel (paper Eq. 8-9, forced init/local blocks,
            ties to the lower index); for ``"key_bound"`` / ``"max_logit"`` pass ``block_idx``.
        scale: softmax scale, default ``1 / sqrt(Dk)``.
        block_idx: optional int32 ``[B, S, H, top_n]`` selection (sorted or not, -1 = empty) that replaces the
            kernel's own; required for scorings other than ``"compressed"``.
        return_indices: also return the block indices used.
    Returns:
        ``o [B, S, HQ, Dv]`` in q's dtype (fp32 accumulation), and with ``return_indices`` the int32
        ``[B, S, H, top_n]`` indices (ascending, -1 padded, where the kernel scored them).
    """
    _check(q, positions, kv, gates, scoring, block_idx, geometry)
    B, S, HQ, Dk = q.shape
    H, Dv = kv.k_slc.shape[2], kv.v_slc.shape[3]
    G = HQ // H
    scale = default_scale(scale, Dk)
    device, dtype = q.device, q.dtype
    kd = kernel_dtype(dtype)
    q_, k_cmp, v_cmp, k_slc, v_slc = (x.to(kd).contiguous() for x in (q, kv.k_cmp, kv.v_cmp, kv.k_slc, kv.v_slc))
    if k_cmp.shape[1] == 0:  # no compressed block yet: valid (never read) pointers
        k_cmp, v_cmp = k_cmp.new_zeros(B, 1, H, Dk), v_cmp.new_zeros(B, 1, H, Dv)
    pos = positions.to(device=device, dtype=torch.int64).contiguous()
    rows = B * S * HQ
    common = dict(DK=Dk, DV=Dv, BLOCK_DK=_pow2(Dk), BLOCK_DV=_pow2(Dv), HEADS=_pow2(G), PREC=_dot_precision(kd))
    strides_q = dict(sq_b=q_.stride(0), sq_s=q_.stride(1), sq_h=q_.stride(2))
    qk_scale = scale * LOG2E

    heads = triton.next_power_of_2(G)
    sel = selection_config(G, Dk, geometry.block_len, geometry.stride, geometry.select_len, geometry.top_n)
    chunk_rows = sel["S"] * geometry.select_len // geometry.stride  # compressed rows of one chunk of blocks
    chunks = triton.cdiv(k_cmp.shape[1], chunk_rows)
    splits_c = decode_splits(B * H, chunks, device)
    cps = triton.cdiv(chunks, splits_c)  # chunks per split
    op_c, lp_c = _partials(rows, splits_c, Dv, device)
    kc = dict(Q=q_, POS=pos, KC=k_cmp, H=H, G=G, S=S, **strides_q, skc_b=k_cmp.stride(0), skc_s=k_cmp.stride(1),
              skc_h=k_cmp.stride(2), qk_scale=qk_scale, BLOCK_LEN=geometry.block_len, STRIDE=geometry.stride,
              DK=Dk, BLOCK_DK=common["BLOCK_DK"], HEADS=heads, PREC=common["PREC"])
    nsa_decode_compressed_kernel[(B * H, splits_c)](
        **kc, VC=v_cmp, OP=op_c, LP=lp_c, svc_b=v_cmp.stride(0), svc_s=v_cmp.stride(1), svc_h=v_cmp.stride(2),
        SPLIT_ROWS=cps * chunk_rows, DV=Dv, BLOCK_DV=common["BLOCK_DV"], BLOCK_S=64,
        TOKENS_ATT=max(triton.next_power_of_2(S), triton.cdiv(16, heads)))
    if block_idx is None:
        idx = new_output((B, S, H, geometry.top_n), torch.int32, device)
        tops = new_output((B * H, splits_c, TOKENS, sel["S"]), torch.int64, device)
        log_chunk = sel["S"].bit_length() - 1
        nsa_decode_scores_kernel[(B * H, splits_c)](
            **kc, LP=lp_c, TOPS=tops, SELECT_LEN=geometry.select_len, INIT_BLOCKS=geometry.init_blocks,
            LOCAL_BLOCKS=geometry.local_blocks, CHUNK=sel["S"], LOG_CHUNK=log_chunk, KSPLIT=sel["KSPLIT"], CPS=cps,
            SPLITS=splits_c, SPLITS_P2=triton.next_power_of_2(splits_c),
            num_warps=8 if TOKENS * heads >= 128 else 4)
        nsa_decode_top_kernel[(B * H,)](
            TOPS=tops, IDX=idx, H=H, S=S, si_b=idx.stride(0), si_s=idx.stride(1), si_h=idx.stride(2),
            TOP_N=geometry.top_n, CHUNK=sel["S"], LOG_CHUNK=log_chunk, SPLITS=splits_c)
    else:
        idx = block_idx.to(torch.int32)

    programs = B * S * H
    splits_s = decode_splits(programs, geometry.top_n, device)
    op_s, lp_s = _partials(rows, splits_s, Dv, device)
    nsa_decode_selected_kernel[(programs, splits_s)](
        Q=q_, POS=pos, K=k_slc, V=v_slc, IDX=idx, OP=op_s, LP=lp_s, H=H, G=G, S=S, **strides_q,
        sk_b=k_slc.stride(0), sk_s=k_slc.stride(1), sk_h=k_slc.stride(2),
        sv_b=v_slc.stride(0), sv_s=v_slc.stride(1), sv_h=v_slc.stride(2),
        si_b=idx.stride(0), si_s=idx.stride(1), si_h=idx.stride(2), qk_scale=qk_scale,
        SELECT_LEN=geometry.select_len, TOP_N=geometry.top_n, SLOTS=triton.cdiv(geometry.top_n, splits_s),
        BLOCK_S=max(16, min(64, triton.next_power_of_2(geometry.select_len))), **common)

    op_w, lp_w, splits_w = op_s, lp_s, 1
    if geometry.window:
        op_w, lp_w, splits_w = _window(q_, pos, kv, geometry.window, qk_scale, strides_q, common, kd)
    out = new_output((B, S, HQ, Dv), dtype, device)
    nsa_decode_combine_kernel[(triton.cdiv(rows, COMBINE_ROWS),)](
        OPC=op_c, LPC=lp_c, OPS=op_s, LPS=lp_s, OPW=op_w, LPW=lp_w, GATES=gates.to(torch.float32).contiguous(), O=out,
        n_rows=rows, DV=Dv, BLOCK_DV=common["BLOCK_DV"], SPLITS_C=splits_c,
        SPLITS_C_P2=triton.next_power_of_2(splits_c), SPLITS_S=splits_s,
        SPLITS_S_P2=triton.next_power_of_2(splits_s), SPLITS_W=splits_w, SPLITS_W_P2=triton.next_power_of_2(splits_w), HAS_WINDOW=bool(geometry.window),
        BR=COMBINE_ROWS)
    return (out, idx) if return_indices else out


def _window(q: torch.Tensor, pos: torch.Tensor, kv, window: int, qk_scale: float, strides_q: dict, common: dict,
            kd: torch.dtype):
    """Window partials ``(o [rows, splits, Dv], lse [rows, splits], splits)``. With shared K/V the window is the
    selection buffers (rows = positions) and only the window's ``w`` rows are read; a ring is read whole, each row
    masked by its ``win_positions``."""
    B, S, HQ, _ = q.shape
    H, Dv = kv.k_win.shape[2], kv.v_win.shape[3]
    by_position = kv.k_win.data_ptr() == kv.k_slc.data_ptr()
    k_win, v_win = (x.to(kd).contiguous() for x in (kv.k_win, kv.v_win))
    kpos = kv.win_positions.to(device=q.device, dtype=torch.int64).contiguous()
    span = window if by_position else k_win.shape[1]
    block_s = max(16, min(64, triton.next_power_of_2(span)))
    programs = B * S * H
    splits = decode_splits(programs, triton.cdiv(span, block_s), q.device)
    op, lp = _partials(B * S * HQ, splits, Dv, q.device)
    nsa_decode_window_kernel[(programs, splits)](
        Q=q, POS=pos, K=k_win, V=v_win, KPOS=kpos, OP=op, LP=lp, H=H, G=HQ // H, S=S, n_rows=k_win.shape[1],
        **strides_q, sk_b=k_win.stride(0), sk_s=k_win.stride(1), sk_h=k_win.stride(2),
        sv_b=v_win.stride(0), sv_s=v_win.stride(1), sv_h=v_win.stride(2), skp_b=kpos.stride(0), qk_scale=qk_scale,
        WINDOW=window, ROW_IS_POSITION=by_position, CHUNK=triton.cdiv(triton.cdiv(span, splits), block_s) * block_s,
        BLOCK_S=block_s, **common)
    return op, lp, splits
