"""Host side of the Triton NSA decode step (kernels in :mod:`.nsa_decode_compressed` and :mod:`.nsa_decode_kernels`):
``nsa_decode``, the kernel version of ``nsa_dist.inference.nsa_decode_reference``; split counts from
:func:`decode_splits`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ..geometry import NSAGeometry
from ..reference.tiles import default_scale
from .nsa_decode_compressed import (TOKENS, nsa_decode_compressed_kernel, nsa_decode_scores_kernel,
                                    nsa_decode_top_kernel)
from .nsa_decode_kernels import nsa_decode_combine_kernel, nsa_decode_selected_kernel, nsa_decode_window_kernel
from .select_blocks import selection_config
from .utils import LOG2E, dot_precision, kernel_dtype, new_output, pow2

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
    """fp32 buffers of one branch's partial outputs ``[rows, splits, dv]`` and their lse ``[rows, splits]``."""
    return (new_output((rows, splits, dv), torch.float32, device), new_output((rows, splits), torch.float32, device))


def _check(q: torch.Tensor, positions: torch.Tensor, kv, gates: torch.Tensor, scoring: str,
           block_idx: Optional[torch.Tensor], geometry: NSAGeometry) -> None:
    B, S, HQ, _ = q.shape
    H = kv.k_slc.shape[2]
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
        q: ``[B, S, HQ, Dk]`` rotated queries (``S > 1``: speculative steps; more than 16 take one launch per 16);
            ``hq`` reads KV head ``hq // G``.
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
    if q.shape[1] > TOKENS:  # the kernels stack TOKENS queries per sequence: launch per group of them
        parts = [nsa_decode(q[:, s:s + TOKENS], positions[:, s:s + TOKENS], kv, gates[:, s:s + TOKENS], geometry,
                            scoring, scale, None if block_idx is None else block_idx[:, s:s + TOKENS], True)
                 for s in range(0, q.shape[1], TOKENS)]
        out, idx = (torch.cat(x, 1) for x in zip(*parts))
        return (out, idx) if return_indices else out
    B, S, HQ, Dk = q.shape
    H, Dv = kv.k_slc.shape[2], kv.v_slc.shape[3]
    G = HQ // H
    kd = kernel_dtype(q.dtype)
    q_ = q.to(kd).contiguous()
    base = dict(Q=q_, POS=positions.to(device=q.device, dtype=torch.int64).contiguous(), H=H, G=G, S=S,
                sq_b=q_.stride(0), sq_s=q_.stride(1), sq_h=q_.stride(2), qk_scale=default_scale(scale, Dk) * LOG2E,
                DK=Dk, BLOCK_DK=pow2(Dk, 16), PREC=dot_precision(kd))
    dims = dict(DV=Dv, BLOCK_DV=pow2(Dv, 16))
    cmp, idx = _compressed(base, dims, kv, geometry, block_idx)
    branches = dict(C=cmp, S=_selected(base, dims, kv, geometry, idx))
    if geometry.window:
        branches["W"] = _window(base, dims, kv, geometry.window)
    out = new_output((B, S, HQ, Dv), q.dtype, q.device)
    rows = B * S * HQ
    partials = {}
    for name in "CSW":  # an absent window branch: the selected branch's buffers, never read
        op, lp, splits = branches.get(name, branches["S"])
        partials.update({f"OP{name}": op, f"LP{name}": lp, f"SPLITS_{name}": splits,
                         f"SPLITS_{name}_P2": triton.next_power_of_2(splits)})
    nsa_decode_combine_kernel[(triton.cdiv(rows, COMBINE_ROWS),)](
        **partials, GATES=gates.to(torch.float32).contiguous(), O=out, n_rows=rows, **dims,
        HAS_WINDOW=bool(geometry.window), BLOCK_R=COMBINE_ROWS)
    return (out, idx) if return_indices else out


def _kv(kv, name: str, kd: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """Keys and values ``kv.k_<name>``, ``kv.v_<name>`` in the kernel dtype, and their strides as the kernels take
    them (``sk_b, sk_s, sk_h, sv_b, sv_s, sv_h``)."""
    k, v = (getattr(kv, f"{x}_{name}").to(kd).contiguous() for x in "kv")
    strides = dict(zip(("sk_b", "sk_s", "sk_h", "sv_b", "sv_s", "sv_h"), (*k.stride()[:3], *v.stride()[:3])))
    return k, v, strides


def _compressed(base: dict, dims: dict, kv, geometry: NSAGeometry, block_idx: Optional[torch.Tensor]):
    """Compressed partials ``(o, lse, splits)`` and the block indices: the kernels' own top-n when ``block_idx`` is
    None (splits over chunks of ``CHUNK`` selection blocks, as :func:`.select_blocks.selection_config` sizes them)."""
    B, H, G, S = base["Q"].shape[0], base["H"], base["G"], base["S"]
    device = base["Q"].device
    k, v, strides = _kv(kv, "cmp", base["Q"].dtype)
    if k.shape[1] == 0:  # no compressed block yet: valid (never read) pointers
        k, v = k.new_zeros(B, 1, H, k.shape[3]), v.new_zeros(B, 1, H, v.shape[3])
    sel = selection_config(G, base["DK"], geometry.block_len, geometry.stride, geometry.select_len, geometry.top_n)
    chunk_rows = sel["CHUNK"] * geometry.select_len // geometry.stride  # compressed rows of one chunk of blocks
    chunks = triton.cdiv(k.shape[1], chunk_rows)
    splits = decode_splits(B * H, chunks, device)
    cps = triton.cdiv(chunks, splits)  # chunks per split
    heads = triton.next_power_of_2(G)
    op, lp = _partials(B * S * H * G, splits, dims["DV"], device)
    args = dict(base, KC=k, skc_b=strides["sk_b"], skc_s=strides["sk_s"], skc_h=strides["sk_h"],
                BLOCK_LEN=geometry.block_len, STRIDE=geometry.stride, HEADS=heads)
    nsa_decode_compressed_kernel[(B * H, splits)](
        **args, VC=v, OP=op, LP=lp, svc_b=strides["sv_b"], svc_s=strides["sv_s"], svc_h=strides["sv_h"],
        SPLIT_ROWS=cps * chunk_rows, **dims, BLOCK_S=64, TOKENS_ATT=max(triton.next_power_of_2(S),
                                                                        triton.cdiv(16, heads)))
    if block_idx is not None:
        return (op, lp, splits), block_idx.to(torch.int32)
    idx = new_output((B, S, H, geometry.top_n), torch.int32, device)
    tops = new_output((B * H, splits, TOKENS, sel["CHUNK"]), torch.int64, device)
    chunk = dict(CHUNK=sel["CHUNK"], LOG_CHUNK=sel["CHUNK"].bit_length() - 1, SPLITS=splits, TOKENS=TOKENS)
    nsa_decode_scores_kernel[(B * H, splits)](
        **args, LP=lp, TOPS=tops, SELECT_LEN=geometry.select_len, INIT_BLOCKS=geometry.init_blocks,
        LOCAL_BLOCKS=geometry.local_blocks, KSPLIT=sel["KSPLIT"], CPS=cps, **chunk,
        SPLITS_P2=triton.next_power_of_2(splits), num_warps=8 if TOKENS * heads >= 128 else 4)
    nsa_decode_top_kernel[(B * H,)](TOPS=tops, IDX=idx, H=H, S=S, si_b=idx.stride(0), si_s=idx.stride(1),
                                    si_h=idx.stride(2), TOP_N=geometry.top_n, **chunk)
    return (op, lp, splits), idx


def _selected(base: dict, dims: dict, kv, geometry: NSAGeometry, idx: torch.Tensor):
    """Selected-branch partials ``(o, lse, splits)``, split over the top-n slots."""
    B, S, HQ = base["Q"].shape[:3]
    programs = B * S * base["H"]
    splits = decode_splits(programs, geometry.top_n, base["Q"].device)
    k, v, strides = _kv(kv, "slc", base["Q"].dtype)
    op, lp = _partials(B * S * HQ, splits, dims["DV"], base["Q"].device)
    nsa_decode_selected_kernel[(programs, splits)](
        **base, **dims, **strides, K=k, V=v, IDX=idx, OP=op, LP=lp, si_b=idx.stride(0), si_s=idx.stride(1),
        si_h=idx.stride(2), SELECT_LEN=geometry.select_len, TOP_N=geometry.top_n,
        SLOTS=triton.cdiv(geometry.top_n, splits), HEADS=pow2(base["G"], 16),
        BLOCK_S=max(16, min(64, triton.next_power_of_2(geometry.select_len))))
    return op, lp, splits


def _window(base: dict, dims: dict, kv, window: int):
    """Window partials ``(o, lse, splits)``, split over the window's rows. With shared K/V the window is the
    selection buffers (rows = positions) and only the window's ``w`` rows are read; a ring is read whole, each row
    masked by its ``win_positions``."""
    B, S, HQ = base["Q"].shape[:3]
    device = base["Q"].device
    by_position = kv.k_win.data_ptr() == kv.k_slc.data_ptr()
    k, v, strides = _kv(kv, "win", base["Q"].dtype)
    kpos = kv.win_positions.to(device=device, dtype=torch.int64).contiguous()
    span = window if by_position else k.shape[1]
    block_s = max(16, min(64, triton.next_power_of_2(span)))
    programs = B * S * base["H"]
    splits = decode_splits(programs, triton.cdiv(span, block_s), device)
    op, lp = _partials(B * S * HQ, splits, dims["DV"], device)
    nsa_decode_window_kernel[(programs, splits)](
        **base, **dims, **strides, K=k, V=v, KPOS=kpos, OP=op, LP=lp, n_rows=k.shape[1], skp_b=kpos.stride(0),
        WINDOW_SIZE=window, ROW_IS_POSITION=by_position,
        SPLIT_ROWS=triton.cdiv(triton.cdiv(span, splits), block_s) * block_s,
        HEADS=pow2(base["G"], 16), BLOCK_S=block_s)
    return op, lp, splits
