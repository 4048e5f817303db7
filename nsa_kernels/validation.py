"""Input checks shared by every op: each failure names the offending value.

Each implementation of an op, reference and Triton alike, calls the same check of this module first (the
Triton one before launching anything), so a direct call of either backend is checked as well as a call
through :mod:`nsa_kernels.dispatch`, which only routes; both backends therefore raise the same errors.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .layout import compressed_cu_seqlens, total_compressed_blocks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttnDims(NamedTuple):
    """Sizes of an attention call: batch, query length, query heads, KV heads, group, key/value dims."""
    B: int
    T: int
    HQ: int
    H: int
    G: int
    Dk: int
    Dv: int


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_scale(scale) -> None:
    """``scale`` (softmax scale) must be ``None`` (the default ``1 / sqrt(Dk)``) or a finite positive ``int`` or
    ``float``: TypeError for any other type (``bool``, ``str``, a tensor), ValueError for nan, inf or ``<= 0``."""
    if scale is None:
        return
    message = f"scale must be None or a finite positive real number (int or float), got {scale!r}"
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(message)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(message)


def check_multiple(name: str, value: int, of_name: str, of: int) -> None:
    if value % of != 0:
        raise ValueError(f"{name}={value} must be a multiple of {of_name}={of}")


def check_compression_geometry(block_len, stride) -> None:
    check_positive_int("block_len", block_len)
    check_positive_int("stride", stride)
    check_multiple("block_len", block_len, "stride", stride)


def check_selection_geometry(block_len, stride, select_len, top_n, init_blocks, local_blocks) -> None:
    check_compression_geometry(block_len, stride)
    check_positive_int("select_len", select_len)
    check_multiple("select_len", select_len, "stride", stride)
    check_positive_int("top_n", top_n)
    check_non_negative_int("init_blocks", init_blocks)
    check_non_negative_int("local_blocks", local_blocks)
    if init_blocks + local_blocks > top_n:
        raise ValueError(
            f"init_blocks={init_blocks} + local_blocks={local_blocks} exceeds top_n={top_n}: "
            "the forced blocks must fit in the selection")


def _check_offsets(name: str, offsets, end_name: str, end: Optional[int]) -> None:
    """``offsets`` must be int32 ``[N + 1]`` (N >= 1), start at 0, end at ``end`` (unless None), never decrease."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int32 or offsets.dim() != 1:
        got = f"{offsets.dtype} tensor of shape {tuple(offsets.shape)}" if isinstance(
            offsets, torch.Tensor) else type(offsets).__name__
        raise ValueError(f"{name} must be a 1-D int32 tensor [N + 1], got {got}")
    if offsets.numel() < 2:
        raise ValueError(f"{name} needs at least 2 entries (one segment), got {offsets.tolist()}")
    first, last = int(offsets[0]), int(offsets[-1])
    if end is None and first != 0:
        raise ValueError(f"{name} must start at 0, got start {first}")
    if end is not None and (first != 0 or last != end):
        raise ValueError(f"{name} must start at 0 and end at {end_name}={end}, got start {first} and end {last}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {offsets.tolist()}")


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, seq_len: int) -> None:
    """``cu_seqlens`` must be int32 ``[N + 1]``, start at 0, end at ``T``, never decrease, with ``B = 1``."""
    if cu_seqlens is None:
        return
    _check_offsets("cu_seqlens", cu_seqlens, "T", seq_len)
    if batch != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size B = 1, got B={batch}")


def check_cu_seqlens_k(cu_seqlens_k: torch.Tensor, cu_seqlens: Optional[torch.Tensor], key_rows: Optional[int],
                       device: torch.device) -> None:
    """Key segments of a call whose ``cu_seqlens`` (already checked) describes the query segments.

    ``cu_seqlens_k`` must be int32 ``[N + 1]`` like ``cu_seqlens`` (same ``N``, so ``B = 1``), on q's device,
    start at 0, end at ``key_rows`` (the raw key axis length; ``None`` for the compressed ops, whose row
    count is checked by the caller) and never decrease; key segment ``n`` must be at least as long as
    query segment ``n`` (queries are bottom-right aligned in their key segment).
    """
    if cu_seqlens is None:
        raise ValueError("cu_seqlens_k (key segments) needs cu_seqlens (the query segments, B = 1), got "
                         "cu_seqlens=None")
    _check_offsets("cu_seqlens_k", cu_seqlens_k, "T_k", key_rows)
    if cu_seqlens_k.numel() != cu_seqlens.numel():
        raise ValueError(f"cu_seqlens_k has {cu_seqlens_k.numel()} entries but cu_seqlens has "
                         f"{cu_seqlens.numel()}: one key segment per query segment")
    if cu_seqlens_k.device != device:
        raise ValueError(f"cu_seqlens_k is on {cu_seqlens_k.device} but q is on {device}")
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    len_q = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    for n, (lk, lq) in enumerate(zip(len_k, len_q)):
        if lk < lq:
            raise ValueError(f"key segment n={n} has length L_k={lk} < query segment length L_q={lq}: every "
                             "key segment must hold its queries (cu_seqlens_k vs cu_seqlens)")


def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def _check_floating(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")


def _check_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must have ``ref``'s dtype and device."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}.dtype {x.dtype} differs from {ref_name}.dtype {ref.dtype}")
    _check_device(name, x, ref_name, ref)


def check_attention_inputs(q, k, v, cu_seqlens=None, *, cu_seqlens_k: Optional[torch.Tensor] = None,
                           compression: Optional[Tuple[int, int]] = None, k_name: str = "k",
                           v_name: str = "v") -> AttnDims:
    """Validate ``q [B, T, HQ, Dk]``, ``k [B, S, H, Dk]``, ``v [B, S, H, Dv]``, ``cu_seqlens`` and ``cu_seqlens_k``.

    Without ``cu_seqlens_k`` the key segments are the query segments: ``S`` must equal ``T``, or with
    ``compression=(block_len, stride)`` the number of compressed blocks of the batch. With ``cu_seqlens_k``
    (see :func:`check_cu_seqlens_k`) ``S`` must equal ``cu_seqlens_k[-1]``, or with ``compression`` the
    compressed rows of the key segments, ``compressed_cu_seqlens(cu_seqlens_k, block_len, stride)[-1]``.
    Returns the sizes (``T`` is the query length).
    """
    _check_tensor("q", q, 4, "[B, T, HQ, Dk]")
    _check_tensor(k_name, k, 4, "[B, S, H, Dk]")
    _check_tensor(v_name, v, 4, "[B, S, H, Dv]")
    _check_floating("q", q)
    for name, x in ((k_name, k), (v_name, v)):
        _check_like(name, x, "q", q)
    B, T, HQ, Dk = q.shape
    Bk, S, H, Dk2 = k.shape
    if Bk != B:
        raise ValueError(f"{k_name} has shape {tuple(k.shape)}: expected batch {B} as in q")
    if compression is None and cu_seqlens_k is None and S != T:
        raise ValueError(f"{k_name} has shape {tuple(k.shape)}: expected length T={T} on dim 1 as in q")
    if Dk2 != Dk:
        raise ValueError(f"{k_name} head dim {Dk2} differs from q head dim {Dk}")
    if tuple(v.shape[:3]) != (Bk, S, H):
        raise ValueError(f"{v_name} has shape {tuple(v.shape)}: its first three dims must match "
                         f"{k_name}'s {(Bk, S, H)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of KV heads H={H} (GQA group G = HQ / H)")
    check_cu_seqlens(cu_seqlens, B, T)
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if cu_seqlens_k is not None:
        check_cu_seqlens_k(cu_seqlens_k, cu_seqlens, S if compression is None else None, q.device)
    if compression is not None:
        _check_compressed_rows(k_name, k, T, cu_seqlens, cu_seqlens_k, compression)
    return AttnDims(B, T, HQ, H, HQ // H, Dk, v.shape[-1])


def check_block_max_inputs(q, k, select_len, first_pos) -> AttnDims:
    """Validate ``q [B, tq, HQ, Dk]`` at positions ``first_pos ..`` against keys ``k [B, L, H, Dk]`` for
    :func:`nsa_kernels.block_max_logits` (``L >= first_pos + tq``). Returns the sizes (``T = tq``, ``Dv = Dk``)."""
    _check_tensor("q", q, 4, "[B, tq, HQ, Dk]")
    _check_tensor("k", k, 4, "[B, L, H, Dk]")
    _check_floating("q", q)
    _check_like("k", k, "q", q)
    check_positive_int("select_len", select_len)
    check_non_negative_int("first_pos", first_pos)
    B, T, HQ, Dk = q.shape
    Bk, L, H, Dk2 = k.shape
    if Bk != B or Dk2 != Dk:
        raise ValueError(f"k has shape {tuple(k.shape)}: expected batch {B} and head dim {Dk} as in q")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of KV heads H={H} (GQA group G = HQ / H)")
    if L < first_pos + T:
        raise ValueError(f"k holds {L} keys but the last query sits at position first_pos + tq - 1 = "
                         f"{first_pos + T - 1}: every query must see its own key")
    return AttnDims(B, T, HQ, H, HQ // H, Dk, Dk)


def _check_compressed_rows(k_name: str, k: torch.Tensor, T: int, cu_seqlens, cu_seqlens_k,
                           compression: Tuple[int, int]) -> None:
    """Compressed K's dim 1 must hold the compressed blocks of the key segments (or of the query layout)."""
    block_len, stride = compression
    if cu_seqlens_k is None:
        expected = total_compressed_blocks(T, block_len, stride, cu_seqlens)
        layout = f"T={T}"
    else:
        expected = int(compressed_cu_seqlens(cu_seqlens_k, block_len, stride)[-1])
        layout = f"key segments cu_seqlens_k={cu_seqlens_k.tolist()}"
    if k.shape[1] != expected:
        raise ValueError(f"{k_name} has shape {tuple(k.shape)}: {layout} with block_len={block_len}, "
                         f"stride={stride} gives {expected} compressed blocks on dim 1")


def check_block_idx(block_idx, dims: AttnDims) -> None:
    """``block_idx`` must be an integer tensor ``[B, T, H, n]`` (``T`` = query rows, also with key segments)."""
    _check_tensor("block_idx", block_idx, 4, "[B, T, H, n]")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_idx must be int32 or int64, got {block_idx.dtype}")
    if tuple(block_idx.shape[:3]) != (dims.B, dims.T, dims.H):
        raise ValueError(f"block_idx has shape {tuple(block_idx.shape)}: expected [B, T, H, n] with "
                         f"B={dims.B}, T={dims.T}, H={dims.H}")


def _check_gates_shape(gates, B: int, T: int, HQ: int) -> None:
    _check_tensor("gates", gates, 4, "[B, T, HQ, 3]")
    if tuple(gates.shape) != (B, T, HQ, 3):
        raise ValueError(f"gates has shape {tuple(gates.shape)}: expected [B, T, HQ, 3] = [{B}, {T}, {HQ}, 3]")


def check_gates(gates, dims: AttnDims) -> None:
    """``gates`` must be ``[B, T, HQ, 3]`` (compressed, selected, window), in q's dtype."""
    _check_gates_shape(gates, dims.B, dims.T, dims.HQ)


def check_gate_combine_inputs(gates, o_cmp, o_slc, o_win) -> None:
    """Arguments of ``gate_combine``: ``o_cmp [B, T, HQ, Dv]`` floating; ``o_slc`` and ``o_win`` (``None`` allowed:
    no window branch) exactly ``o_cmp``'s shape (no broadcasting), dtype and device; ``gates [B, T, HQ, 3]``
    floating (any float dtype: it is cast for the sum), on ``o_cmp``'s device."""
    _check_tensor("o_cmp", o_cmp, 4, "[B, T, HQ, Dv]")
    _check_floating("o_cmp", o_cmp)
    branches = (("o_slc", o_slc),) if o_win is None else (("o_slc", o_slc), ("o_win", o_win))
    for name, x in branches:
        _check_tensor(name, x, 4, "[B, T, HQ, Dv]")
        _check_like(name, x, "o_cmp", o_cmp)
        if x.shape != o_cmp.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected o_cmp's shape {tuple(o_cmp.shape)}")
    _check_gates_shape(gates, *o_cmp.shape[:3])
    _check_floating("gates", gates)
    _check_device("gates", gates, "o_cmp", o_cmp)


def check_lse(lse, dims: AttnDims) -> None:
    """``lse`` (from ``compressed_attention``) must be a tensor ``[B, T, HQ]``."""
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (dims.B, dims.T, dims.HQ):
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be [B, T, HQ] = [{dims.B}, {dims.T}, {dims.HQ}], got {got}")


def check_compressed_attention_inputs(q, k_cmp, v_cmp, block_len, stride, cu_seqlens=None,
                                     cu_seqlens_k=None) -> AttnDims:
    """The inputs of ``compressed_attention`` (both backends): the compression geometry and
    :func:`check_attention_inputs` with ``k_cmp``/``v_cmp`` holding the compressed blocks. Returns the sizes."""
    check_compression_geometry(block_len, stride)
    return check_attention_inputs(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                  compression=(block_len, stride), k_name="k_cmp", v_name="v_cmp")


def check_select_blocks_inputs(q, k_cmp, lse, block_len, stride, select_len, top_n, init_blocks, local_blocks,
                               cu_seqlens=None, cu_seqlens_k=None) -> AttnDims:
    """The inputs of ``select_blocks`` (both backends): the selection geometry, ``q`` against the compressed keys
    ``k_cmp`` (:func:`check_attention_inputs`) and the compressed branch's ``lse`` (:func:`check_lse`)."""
    check_selection_geometry(block_len, stride, select_len, top_n, init_blocks, local_blocks)
    dims = check_attention_inputs(q, k_cmp, k_cmp, cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                  compression=(block_len, stride), k_name="k_cmp", v_name="k_cmp")
    check_lse(lse, dims)
    return dims


def check_selected_attention_inputs(q, k, v, block_idx, select_len, cu_seqlens=None, cu_seqlens_k=None) -> AttnDims:
    """The inputs of ``selected_attention`` (both backends): ``select_len``, :func:`check_attention_inputs` and
    the block indices (:func:`check_block_idx`). Returns the sizes."""
    check_positive_int("select_len", select_len)
    dims = check_attention_inputs(q, k, v, cu_seqlens, cu_seqlens_k=cu_seqlens_k)
    check_block_idx(block_idx, dims)
    return dims


def check_window_attention_inputs(q, k, v, window, cu_seqlens=None, cu_seqlens_k=None) -> AttnDims:
    """The inputs of ``window_attention`` (both backends): a positive ``window`` and
    :func:`check_attention_inputs`. Returns the sizes."""
    check_positive_int("window", window)
    return check_attention_inputs(q, k, v, cu_seqlens, cu_seqlens_k=cu_seqlens_k)
