"""Range attention: flash attention where query ``t`` sees one contiguous range of key rows.

One kernel family serves two NSA branches; the constexpr ``MODE`` says which key rows a query token
``t`` (global row of q, in the query segment ``[q_start, q_end)``) sees. Its position in its key segment is
``p = t - q_start + shift`` (bottom-right aligned, see :mod:`.utils`; ``shift = 0`` and the key segment is the
document without ``cu_seqlens_k``), and the raw key row of that position is ``kr = t + koff``,
``koff = k_start + shift - q_start``:

* ``WINDOW`` (sliding window, keys = raw tokens): rows ``[max(k_start, kr - w + 1), kr]``.
* ``COMPRESSED`` (keys = the key segment's packed compressed rows, starting at ``cmp_start``): rows
  ``cmp_start + i`` for ``i < nvis``, ``nvis = 0 if p < l - 1 else (p - l + 1) // d + 1`` (block ``i``
  ends at ``i*d + l - 1 <= p``). A query that sees nothing gets ``o = 0`` and ``lse = -inf``.

GQA: a program owns ``BLOCK_T`` query tokens of one KV head and ``GB`` query heads of its group
(all ``G`` heads unless ``G`` is large), i.e. ``BLOCK_M = BLOCK_T * GB`` rows ordered
``row = token * GB + head``, so every K/V tile is loaded once for the whole group. A program visits
only the key tiles that intersect the union of its rows' ranges; tiles inside every row's range skip the
per-element mask (``MASKED=False``), only the boundary tiles are masked: each pass's loop is one helper
(:func:`_fwd_inner`, :func:`_dq_inner`, :func:`_dkdv_inner`) called for the masked, unmasked and masked parts.

Kernels (all grids 1-D, ``program_id = tile * (B * H * chunks) + head``, heads fastest so the programs
running together share K/V in L2); each runs both branches, compressed and window, picked by ``MODE``:

* ``range_attention_fwd_kernel``: online softmax in the log2 domain; writes ``o`` and ``lse`` (natural log,
  fp32).
* ``delta = rowsum(dO * O)`` comes from :func:`.delta.attention_delta`, or from the caller (the fused NSA's gate
  pass, :mod:`.nsa`).
* ``range_attention_bwd_dq_kernel``: same tiling as forward, recomputes ``P`` from ``lse``,
  ``dq = scale * dS K``.
* ``range_attention_bwd_dkdv_kernel``: one program per (work item, KV head) loops over query tokens whose
  ranges can include the item's key tile (the inverse map, clipped to the segment's queries: window: positions
  ``[s, s + w - 1]``, one item per tile; compressed: positions ``>= i*d + l - 1`` up to the segment end, cut
  into chunks of tokens, one item each: :func:`dkdv_work_items`), all ``G`` heads, accumulating
  ``dk``/``dv`` in fp32 registers. Window items store their rows; compressed items store fp32 partials that
  ``range_attention_bwd_reduce_kernel`` sums per key tile in item order: no atomics, deterministic.

Host side: :func:`range_attention_forward` / :func:`range_attention_backward`, used by the autograd
Functions of :mod:`.window_attention` and :mod:`.compressed_attention`. Inputs whose last dim is not contiguous
are copied (``.contiguous()``); any other strides are passed to the kernels. Offsets are 64-bit.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .delta import attention_delta
from .tile_loads import load_rows, load_tile, store_rows, tile_row
from .utils import (LN2_CONSTEXPR, LOG2E, LOG2E_CONSTEXPR, dot_precision, host_table_to, kernel_dtype, new_output,
                    pow2, query_tile_table, stride_args, tile_table)

WINDOW = 0
COMPRESSED = 1



# ----------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _visible_rows(kr, k_start, cmp_start, MODE: tl.constexpr, WINDOW_SIZE: tl.constexpr, BLOCK_LEN: tl.constexpr,
                  STRIDE: tl.constexpr):
    """``[lo, hi)``: the key rows a query sees whose own position is raw key row ``kr`` (scalar or tensor,
    ``t + koff``) of the key segment starting at row ``k_start``."""
    if MODE == 0:
        lo = tl.maximum(kr - WINDOW_SIZE + 1, k_start)
        hi = kr + 1
    else:
        p = kr - k_start
        nvis = tl.where(p >= BLOCK_LEN - 1, tl.maximum(p - BLOCK_LEN + 1, 0) // STRIDE + 1, 0)
        lo = cmp_start + 0 * kr
        hi = cmp_start + nvis
    return lo, hi


@triton.jit
def _seeing_queries(s, q_start, q_end, k_start, koff, cmp_start, MODE: tl.constexpr, WINDOW_SIZE: tl.constexpr,
                    BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr):
    """``[qlo, qhi)``: the query tokens (rows of q) that see key row ``s`` of their key segment: the inverse of
    :func:`_visible_rows` (query row ``t`` has position row ``t + koff``), clipped to ``[q_start, q_end)``; empty
    (``qhi <= qlo``) when no query of the segment sees it."""
    if MODE == 0:
        qlo = tl.maximum(s - koff, q_start)
        qhi = tl.minimum(s - koff + WINDOW_SIZE, q_end)
    else:
        qlo = tl.maximum(k_start - koff + (s - cmp_start) * STRIDE + BLOCK_LEN - 1, q_start)
        qhi = q_end + 0 * s
    return qlo, qhi


@triton.jit
def _split_range(u0, u1, i0, i1, STEP: tl.constexpr):
    """Split the union ``[u0, u1)`` of the rows' ranges into masked ``[u0, a)``, unmasked ``[a, b)`` (steps
    that lie inside the intersection ``[i0, i1)`` of all ranges) and masked ``[b, u1)``."""
    a = tl.minimum(u0 + tl.cdiv(tl.maximum(i0 - u0, 0), STEP) * STEP, u1)
    b = a + tl.maximum(i1 - a, 0) // STEP * STEP
    return a, b


@triton.jit
def _program_ids(n_tiles, BHC, H, NGC, REVERSE: tl.constexpr):
    """``program_id(0) = tile * BHC + head-chunk``: returns (tile, b, h, chunk)."""
    pid = tl.program_id(0)
    tile = pid // BHC
    bhc = pid % BHC
    if REVERSE:  # heaviest tiles first (compressed: later queries see more rows)
        tile = n_tiles - 1 - tile
    gc = bhc % NGC
    bh = bhc // NGC
    return tile, bh // H, bh % H, gc


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _key_tile_scores(q, k_base, v_base, s_start, stride_ks, stride_vs, kv_end, lo, hi, qk_scale, offs_s, offs_dk,
                     offs_dv, MASKED: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                     BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """K and V of the key tile starting at row ``s_start`` and the rows' scores ``q k^T * qk_scale`` (log2
    domain); ``MASKED``: rows past ``kv_end`` read 0 and scores outside each row's range ``[lo, hi)`` are
    ``-inf``."""
    s = s_start + offs_s
    s64 = s.to(tl.int64)
    kv_ok = s < kv_end
    k = load_rows(k_base + s64[:, None] * stride_ks + offs_dk[None, :], kv_ok, offs_dk, DK, BLOCK_DK, MASKED)
    v = load_rows(v_base + s64[:, None] * stride_vs + offs_dv[None, :], kv_ok, offs_dv, DV, BLOCK_DV, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        vis = (s[None, :] >= lo[:, None]) & (s[None, :] < hi[:, None])
        qk = tl.where(vis, qk, float("-inf"))
    return k, v, qk


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_lo, s_hi, stride_ks, stride_vs, kv_end, lo, hi, qk_scale,
               offs_s, offs_dk, offs_dv, MASKED: tl.constexpr, BLOCK_S: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """The forward's key loop over the ``BLOCK_S``-key tiles starting in ``[s_lo, s_hi)``: one online-softmax
    step (log2 domain) of the rows ``q`` per tile. ``MASKED``: boundary tiles, whose keys are masked to each
    row's range ``[lo, hi)`` and to ``kv_end``; else interior tiles that every row sees whole."""
    for s_start in range(s_lo, s_hi, BLOCK_S):
        k, v, qk = _key_tile_scores(q, k_base, v_base, s_start, stride_ks, stride_vs, kv_end, lo, hi, qk_scale, offs_s,
                                    offs_dk, offs_dv, MASKED, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet: no -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile(TILES, n_tiles, BHC, H, NGC, REVERSE: tl.constexpr, MODE: tl.constexpr, WINDOW_SIZE: tl.constexpr,
                BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, G: tl.constexpr, GB: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's rows (``BLOCK_T`` tokens x ``GB`` heads of one KV head) and the key rows they visit.

    Returns int64 batch ``b64`` and KV head ``h64``, per-row token ``t64``, query head ``hq64``, ``row_ok``,
    per-row visible range ``[lo, hi)``, and the tile's key range ``[u0, u1)`` split at ``a <= bnd`` into
    masked ``[u0, a)``, unmasked ``[a, bnd)`` and masked ``[bnd, u1)`` (see :func:`_split_range`)."""
    tile, b, h, gc = _program_ids(n_tiles, BHC, H, NGC, REVERSE)
    q_start, q_end, t0, cmp_start, k_start, shift = tile_row(TILES, tile)
    koff = k_start + shift - q_start  # query row t -> raw key row of its position
    offs_m = tl.arange(0, BLOCK_T * GB)
    t = t0 + offs_m // GB
    g = gc * GB + offs_m % GB
    row_ok = (t < q_end) & (g < G)
    lo, hi = _visible_rows(t + koff, k_start, cmp_start, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE)
    t_last = tl.minimum(t0 + BLOCK_T, q_end) - 1
    u0, i1 = _visible_rows(t0 + koff, k_start, cmp_start, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE)
    i0, u1 = _visible_rows(t_last + koff, k_start, cmp_start, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE)
    u1 = tl.maximum(u1, u0)
    a, bnd = _split_range(u0, u1, i0, i1, BLOCK_S)
    return (b.to(tl.int64), h.to(tl.int64), t.to(tl.int64), (h * G + g).to(tl.int64), row_ok, lo, hi, u0, u1,
            a, bnd)


@triton.jit
def range_attention_fwd_kernel(Q, K, V, O, LSE, TILES, n_tiles, BHC, H, T,
                               sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_t, so_h,
                               qk_scale,
                               MODE: tl.constexpr, WINDOW_SIZE: tl.constexpr, BLOCK_LEN: tl.constexpr,
                               STRIDE: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, NGC: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
                               REVERSE: tl.constexpr):
    """Forward of both range branches, compressed attention and sliding-window attention (``MODE``): the
    program's ``BLOCK_T`` query tokens x ``GB`` heads against the key rows they see; writes ``o`` and ``lse``
    (natural log, ``-inf`` for a row that sees nothing)."""
    BLOCK_M: tl.constexpr = BLOCK_T * GB
    offs_s = tl.arange(0, BLOCK_S)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64, h64, t64, hq64, row_ok, lo, hi, u0, u1, a, bnd = _query_tile(
        TILES, n_tiles, BHC, H, NGC, REVERSE, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE, G, GB, BLOCK_T, BLOCK_S)

    q = load_rows(Q + b64 * sq_b + t64[:, None] * sq_t + hq64[:, None] * sq_h + offs_dk[None, :], row_ok,
                   offs_dk, DK, BLOCK_DK, True)

    k_base = K + b64 * sk_b + h64 * sk_h
    v_base = V + b64 * sv_b + h64 * sv_h
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # boundary tiles [u0, a) masked, interior tiles [a, bnd) unmasked, boundary tiles [bnd, u1) masked
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, u0, a, sk_s, sv_s, u1, lo, hi, qk_scale, offs_s,
                               offs_dk, offs_dv, True, BLOCK_S, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, a, bnd, sk_s, sv_s, u1, lo, hi, qk_scale, offs_s,
                               offs_dk, offs_dv, False, BLOCK_S, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bnd, u1, sk_s, sv_s, u1, lo, hi, qk_scale, offs_s,
                               offs_dk, offs_dv, True, BLOCK_S, DK, DV, BLOCK_DK, BLOCK_DV, PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2_CONSTEXPR)
    store_rows(O + b64 * so_b + t64[:, None] * so_t + hq64[:, None] * so_h + offs_dv[None, :],
                o.to(O.dtype.element_ty), row_ok, offs_dv, DV, BLOCK_DV)
    tl.store(LSE + (b64 * T + t64) * (H * G) + hq64, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _load_lse2(LSE, DELTA, offs, ok):
    """``lse * log2(e)`` with ``+inf`` for padded rows and rows that see nothing (so ``P = 0``), and delta."""
    lse2 = tl.load(LSE + offs, mask=ok, other=float("inf")) * LOG2E_CONSTEXPR
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + offs, mask=ok, other=0.0)
    return lse2, delta


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_lo, s_hi, stride_ks, stride_vs, kv_end, lo, hi, qk_scale,
              offs_s, offs_dk, offs_dv, MASKED: tl.constexpr, BLOCK_S: tl.constexpr, DK: tl.constexpr,
              DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """The dq pass's key loop over the ``BLOCK_S``-key tiles starting in ``[s_lo, s_hi)``: ``P`` recomputed from
    ``lse2``, ``dq += dS K`` per tile (``MASKED`` as in :func:`_fwd_inner`)."""
    for s_start in range(s_lo, s_hi, BLOCK_S):
        k, v, qk = _key_tile_scores(q, k_base, v_base, s_start, stride_ks, stride_vs, kv_end, lo, hi, qk_scale, offs_s,
                                    offs_dk, offs_dv, MASKED, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
        p = tl.exp2(qk - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def range_attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, TILES, n_tiles, BHC, H, T,
                                  sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_t, sdo_h,
                                  sdq_b, sdq_t, sdq_h, qk_scale, scale,
                                  MODE: tl.constexpr, WINDOW_SIZE: tl.constexpr, BLOCK_LEN: tl.constexpr,
                                  STRIDE: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, NGC: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, DK: tl.constexpr,
                                  DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                                  PREC: tl.constexpr, REVERSE: tl.constexpr):
    """dq of both range branches (``MODE``), with the forward's query tiling: ``P`` recomputed from ``lse``,
    ``dq = scale * dS K`` over the key rows the program's rows see."""
    BLOCK_M: tl.constexpr = BLOCK_T * GB
    offs_s = tl.arange(0, BLOCK_S)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64, h64, t64, hq64, row_ok, lo, hi, u0, u1, a, bnd = _query_tile(
        TILES, n_tiles, BHC, H, NGC, REVERSE, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE, G, GB, BLOCK_T, BLOCK_S)

    q = load_rows(Q + b64 * sq_b + t64[:, None] * sq_t + hq64[:, None] * sq_h + offs_dk[None, :], row_ok,
                   offs_dk, DK, BLOCK_DK, True)
    do = load_rows(DO + b64 * sdo_b + t64[:, None] * sdo_t + hq64[:, None] * sdo_h + offs_dv[None, :], row_ok,
                    offs_dv, DV, BLOCK_DV, True)
    lse2, delta = _load_lse2(LSE, DELTA, (b64 * T + t64) * (H * G) + hq64, row_ok)

    k_base = K + b64 * sk_b + h64 * sk_h
    v_base = V + b64 * sv_b + h64 * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    # boundary tiles [u0, a) masked, interior tiles [a, bnd) unmasked, boundary tiles [bnd, u1) masked
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, u0, a, sk_s, sv_s, u1, lo, hi, qk_scale, offs_s, offs_dk,
                   offs_dv, True, BLOCK_S, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, a, bnd, sk_s, sv_s, u1, lo, hi, qk_scale, offs_s, offs_dk,
                   offs_dv, False, BLOCK_S, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bnd, u1, sk_s, sv_s, u1, lo, hi, qk_scale, offs_s, offs_dk,
                   offs_dv, True, BLOCK_S, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    store_rows(DQ + b64 * sdq_b + t64[:, None] * sdq_t + hq64[:, None] * sdq_h + offs_dk[None, :],
                (dq * scale).to(DQ.dtype.element_ty), row_ok, offs_dk, DK, BLOCK_DK)


@triton.jit
def _dkdv_inner(dk, dv, k, v, s, Q, DO, LSE, DELTA, b64, T, H, hq64, g_ok, tq, t_lo, t_hi, q_end, koff, k_start,
                cmp_start, sq_b, sq_t, sq_h, sdo_b, sdo_t, sdo_h, qk_scale, offs_dk, offs_dv,
                MODE: tl.constexpr, WINDOW_SIZE: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
                G: tl.constexpr, MASKED: tl.constexpr, BLOCK_TQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """The dK/dV pass's query loop over the ``BLOCK_TQ``-token query tiles starting in ``[t_lo, t_hi)``: the key
    rows ``s`` (``k``, ``v``) against each tile's rows, ``dv += P^T dO`` and ``dk += dS^T q``. ``MASKED``:
    boundary tiles, whose scores are masked to each query's visible range; else every key is visible."""
    for t_start in range(t_lo, t_hi, BLOCK_TQ):
        t = t_start + tq
        row_ok = (t < q_end) & g_ok
        t64 = t.to(tl.int64)
        q = load_rows(Q + b64 * sq_b + t64[:, None] * sq_t + hq64[:, None] * sq_h + offs_dk[None, :], row_ok,
                       offs_dk, DK, BLOCK_DK, True)
        do = load_rows(DO + b64 * sdo_b + t64[:, None] * sdo_t + hq64[:, None] * sdo_h + offs_dv[None, :], row_ok,
                        offs_dv, DV, BLOCK_DV, True)
        lse2, delta = _load_lse2(LSE, DELTA, (b64 * T + t64) * (H * G) + hq64, row_ok)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_S, BLOCK_M]
        if MASKED:
            lo, hi = _visible_rows(t + koff, k_start, cmp_start, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE)
            vis = (s[:, None] >= lo[None, :]) & (s[:, None] < hi[None, :])
            qk_t = tl.where(vis, qk_t, float("-inf"))
        p_t = tl.exp2(qk_t - lse2[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _key_rows_end(q_start, q_end, cmp_start, k_start, shift, MODE: tl.constexpr, BLOCK_LEN: tl.constexpr,
                  STRIDE: tl.constexpr):
    """End row of the key segment (``L_k = q_end - q_start + shift`` rows): its raw rows (WINDOW) or its
    packed compressed blocks (COMPRESSED, ``max(0, (L_k - l) // d + 1)`` of them)."""
    n = q_end - q_start + shift
    if MODE == 0:
        end = k_start + n
    else:
        end = cmp_start + tl.where(n >= BLOCK_LEN, tl.maximum(n - BLOCK_LEN, 0) // STRIDE + 1, 0)
    return end


@triton.jit
def _store_kv_grads(DK_OUT, DV_OUT, dk, dv, b64, h64, s64, s_ok, sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, scale,
                    offs_dk, offs_dv, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    """Store fp32 accumulators ``dk * scale`` and ``dv`` into rows ``s64`` of the gradient tensors."""
    store_rows(DK_OUT + b64 * sdk_b + h64 * sdk_h + s64[:, None] * sdk_s + offs_dk[None, :],
                (dk * scale).to(DK_OUT.dtype.element_ty), s_ok, offs_dk, DK, BLOCK_DK)
    store_rows(DV_OUT + b64 * sdv_b + h64 * sdv_h + s64[:, None] * sdv_s + offs_dv[None, :],
                dv.to(DV_OUT.dtype.element_ty), s_ok, offs_dv, DV, BLOCK_DV)


@triton.jit
def range_attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, ITEMS, n_items, BH, H, T,
                                    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_t, sdo_h,
                                    sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, qk_scale, scale,
                                    MODE: tl.constexpr, WINDOW_SIZE: tl.constexpr, BLOCK_LEN: tl.constexpr,
                                    STRIDE: tl.constexpr, G: tl.constexpr, GB: tl.constexpr, NGC: tl.constexpr,
                                    BLOCK_TQ: tl.constexpr, BLOCK_S: tl.constexpr, DK: tl.constexpr,
                                    DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                                    PREC: tl.constexpr, PARTIAL: tl.constexpr):
    """dK/dV of both range branches (``MODE``).

    One program per (work item, batch x KV head): the item's ``BLOCK_S`` key rows against the query tokens
    ``[q_lo, q_hi)`` of their seeing range. ``PARTIAL``: store the unscaled fp32 sums in the item's slot of
    ``DK_OUT``/``DV_OUT`` (``[n_items * BH, BLOCK_S, BLOCK_D]``, summed by
    ``range_attention_bwd_reduce_kernel``), else the final ``dk``/``dv`` rows."""
    BLOCK_M: tl.constexpr = BLOCK_TQ * GB
    item, b, h, _ = _program_ids(n_items, BH, H, 1, False)
    row = ITEMS + item * 8  # the key tile's row, then q_lo, q_hi (see dkdv_work_items)
    q_start, q_end, s0, cmp_start, k_start, shift = load_tile(row)
    q_lo = tl.load(row + 6)
    q_hi = tl.load(row + 7)
    koff = k_start + shift - q_start
    s_end = _key_rows_end(q_start, q_end, cmp_start, k_start, shift, MODE, BLOCK_LEN, STRIDE)

    offs_s = tl.arange(0, BLOCK_S)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    s = s0 + offs_s
    s_ok = s < s_end
    s64 = s.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    k = load_rows(K + b64 * sk_b + h64 * sk_h + s64[:, None] * sk_s + offs_dk[None, :], s_ok, offs_dk, DK,
                   BLOCK_DK, True)
    v = load_rows(V + b64 * sv_b + h64 * sv_h + s64[:, None] * sv_s + offs_dv[None, :], s_ok, offs_dv, DV,
                   BLOCK_DV, True)

    s_last = tl.minimum(s0 + BLOCK_S, s_end) - 1
    u0, i1 = _seeing_queries(s0, q_start, q_end, k_start, koff, cmp_start, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE)
    i0, u1 = _seeing_queries(s_last, q_start, q_end, k_start, koff, cmp_start, MODE, WINDOW_SIZE, BLOCK_LEN, STRIDE)
    # the item's share of the queries: clamp the union and the intersection of the rows' ranges
    u0 = tl.maximum(u0, q_lo)
    u1 = tl.maximum(tl.minimum(u1, q_hi), u0)
    a, bnd = _split_range(u0, u1, tl.maximum(i0, u0), tl.minimum(i1, u1), BLOCK_TQ)

    tq = offs_m // GB
    dk = tl.zeros([BLOCK_S, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], dtype=tl.float32)
    for gc in range(NGC):  # chunks of the group's query heads, one after the other (no atomics)
        g = gc * GB + offs_m % GB
        g_ok = g < G
        hq64 = (h * G + g).to(tl.int64)
        # boundary tiles [u0, a) masked, interior tiles [a, bnd) unmasked, boundary tiles [bnd, u1) masked
        dk, dv = _dkdv_inner(dk, dv, k, v, s, Q, DO, LSE, DELTA, b64, T, H, hq64, g_ok, tq, u0, a, u1, koff, k_start,
                             cmp_start, sq_b, sq_t, sq_h, sdo_b, sdo_t, sdo_h, qk_scale, offs_dk, offs_dv, MODE,
                             WINDOW_SIZE, BLOCK_LEN, STRIDE, G, True, BLOCK_TQ, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, s, Q, DO, LSE, DELTA, b64, T, H, hq64, g_ok, tq, a, bnd, u1, koff, k_start,
                             cmp_start, sq_b, sq_t, sq_h, sdo_b, sdo_t, sdo_h, qk_scale, offs_dk, offs_dv, MODE,
                             WINDOW_SIZE, BLOCK_LEN, STRIDE, G, False, BLOCK_TQ, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, s, Q, DO, LSE, DELTA, b64, T, H, hq64, g_ok, tq, bnd, u1, u1, koff, k_start,
                             cmp_start, sq_b, sq_t, sq_h, sdo_b, sdo_t, sdo_h, qk_scale, offs_dk, offs_dv, MODE,
                             WINDOW_SIZE, BLOCK_LEN, STRIDE, G, True, BLOCK_TQ, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    if PARTIAL:
        slot = (item * BH + b * H + h).to(tl.int64) * BLOCK_S + offs_s
        tl.store(DK_OUT + slot[:, None] * BLOCK_DK + offs_dk[None, :], dk)
        tl.store(DV_OUT + slot[:, None] * BLOCK_DV + offs_dv[None, :], dv)
    else:
        _store_kv_grads(DK_OUT, DV_OUT, dk, dv, b64, h64, s64, s_ok, sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, scale,
                        offs_dk, offs_dv, DK, DV, BLOCK_DK, BLOCK_DV)


@triton.jit
def range_attention_bwd_reduce_kernel(PK, PV, DK_OUT, DV_OUT, KTILES, TILE_ITEMS, BH, H,
                                      sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, scale,
                                      BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, BLOCK_S: tl.constexpr,
                                      DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                                      BLOCK_DV: tl.constexpr):
    """Compressed branch only: ``dk``/``dv`` of one key tile and (batch, KV head), the sum of its work items'
    partials in item order (deterministic), times ``scale`` for ``dk``."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    q_start, q_end, s0, cmp_start, k_start, shift = tile_row(KTILES, tile)
    s_end = _key_rows_end(q_start, q_end, cmp_start, k_start, shift, 1, BLOCK_LEN, STRIDE)  # MODE = COMPRESSED
    offs_s = tl.arange(0, BLOCK_S)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_S, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], dtype=tl.float32)
    for item in range(tl.load(TILE_ITEMS + tile), tl.load(TILE_ITEMS + tile + 1)):
        slot = (item * BH + bh).to(tl.int64) * BLOCK_S + offs_s
        dk += tl.load(PK + slot[:, None] * BLOCK_DK + offs_dk[None, :])
        dv += tl.load(PV + slot[:, None] * BLOCK_DV + offs_dv[None, :])
    s = s0 + offs_s
    s_ok = s < s_end
    s64 = s.to(tl.int64)
    _store_kv_grads(DK_OUT, DV_OUT, dk, dv, b64, h64, s64, s_ok, sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, scale,
                    offs_dk, offs_dv, DK, DV, BLOCK_DK, BLOCK_DV)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------

class RangeGeometry(NamedTuple):
    """Which key rows each query sees: ``mode`` (WINDOW / COMPRESSED) and its parameters."""
    mode: int
    window: int = 1
    block_len: int = 1
    stride: int = 1


class RangeConfig(NamedTuple):
    """Block sizes and launch parameters of the three main kernels (see :func:`pick_config`)."""
    fwd_rows: int      # BLOCK_M of forward and dq: BLOCK_T query tokens * GB heads
    fwd_keys: int      # BLOCK_S of forward
    fwd_warps: int
    fwd_stages: int
    dq_keys: int       # BLOCK_S of dq (dq uses the forward query tiling)
    dq_warps: int
    dq_stages: int
    dkdv_keys: int     # BLOCK_S of dk/dv
    dkdv_rows: int     # query rows per dk/dv step: BLOCK_TQ tokens * GB heads
    dkdv_warps: int
    dkdv_stages: int


#: Set to a dict of :class:`RangeConfig` fields to override the heuristic (tests, tuning).
CONFIG_OVERRIDE: Optional[dict] = None
#: Compressed dK/dV: query tokens per work item (at least), and at most this many items per key tile.
DKDV_QUERY_CHUNK = 4096
DKDV_MAX_CHUNKS = 16


def pick_config(geom: RangeGeometry, dk: int, dv: int, dtype: torch.dtype = torch.bfloat16) -> RangeConfig:
    """Block sizes for H100-class GPUs, no autotuning.

    Half inputs, head dims <= 128: 128-row query tiles (BLOCK_T * GB) with 128-key (compressed) or 32-key
    (window) tiles for forward and dq; dk/dv: 128-key tiles and 64 query rows (G = 16: 4 tokens) per step;
    8 warps. Head dims above 128 halve the tiles; fp32 inputs (4-byte operands, tf32x3 dots) use smaller
    tiles so shared memory fits. The half-precision tiles are the fastest measured on an H100
    (``benchmarks/RESULTS.md``, "Tuning notes behind the kernels' heuristics"); they were not checked on GPUs
    with less shared memory per block than Hopper's 227 KB, where an out-of-resource launch error asks for a
    smaller ``CONFIG_OVERRIDE``.
    """
    big = max(dk, dv) > 128
    if dtype == torch.float32:
        cfg = RangeConfig(fwd_rows=32 if big else 64, fwd_keys=32, fwd_warps=8, fwd_stages=1 if big else 2,
                          dq_keys=32, dq_warps=8, dq_stages=1, dkdv_keys=32, dkdv_rows=32, dkdv_warps=8,
                          dkdv_stages=1 if big else 2)
    else:
        # compressed keys in 128-key tiles, window keys (a 512-token range) in 32-key tiles for forward and dq;
        # dK/dV in 128-key tiles x 64 query rows, 8 warps, 3 stages (timings: benchmarks/RESULTS.md, "Tuning notes
        # behind the kernels' heuristics")
        keys = 64 if big else (128 if geom.mode == COMPRESSED else 32)
        cfg = RangeConfig(
            fwd_rows=64 if big else 128,
            fwd_keys=keys, fwd_warps=8, fwd_stages=2 if big else 3,
            dq_keys=32 if big else keys, dq_warps=8, dq_stages=2,
            dkdv_keys=32 if big else 128, dkdv_rows=64, dkdv_warps=8, dkdv_stages=2 if big else 3,
        )
    if CONFIG_OVERRIDE:
        cfg = cfg._replace(**CONFIG_OVERRIDE)
    return cfg


def _group_split(G: int, rows: int):
    """``(GB, BLOCK_T, chunks)``: a program holds ``GB`` heads (power of two, ``<= rows``) of ``BLOCK_T``
    tokens, ``BLOCK_T * GB == rows``; the group's ``G`` heads need ``chunks`` programs/passes."""
    gb = min(triton.next_power_of_2(G), rows)
    return gb, rows // gb, triton.cdiv(G, gb)


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _qkv_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The batch, row and head strides of ``q``, ``k`` and ``v`` as the kernels' keyword arguments."""
    return dict(**stride_args(q, "sq_b", "sq_t", "sq_h"), **stride_args(k, "sk_b", "sk_s", "sk_h"),
                **stride_args(v, "sv_b", "sv_s", "sv_h"))


def _mode_constexprs(geom: RangeGeometry) -> dict:
    if geom.mode == WINDOW:
        return dict(MODE=WINDOW, WINDOW_SIZE=geom.window, BLOCK_LEN=1, STRIDE=1)
    return dict(MODE=COMPRESSED, WINDOW_SIZE=1, BLOCK_LEN=geom.block_len, STRIDE=geom.stride)


def key_tile_table(geom: RangeGeometry, cu_seqlens: Optional[torch.Tensor], seq_len: int, block_s: int,
                   cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CPU int64 ``[num_tiles, 6]`` key tiles (rows as in :mod:`.utils`, ``tile_start`` = the tile's first key
    row) that never cross a key segment: raw key rows (WINDOW) or packed compressed rows (COMPRESSED)."""
    over = "compressed" if geom.mode == COMPRESSED else "keys"
    return tile_table(cu_seqlens, seq_len, block_s, cu_seqlens_k=cu_seqlens_k, block_len=geom.block_len,
                      stride=geom.stride, over=over)[0]


def dkdv_work_items(geom: RangeGeometry, k_tiles: torch.Tensor, seq_len: int):
    """Split the dK/dV work of each key tile over the query tokens that see it.

    Returns CPU int64 ``items [n_items, 8]`` = the tile's row (:func:`key_tile_table`) plus the query tokens
    ``[q_lo, q_hi)`` the item covers, and ``tile_items [num_tiles + 1]`` (tile
    ``i``'s items are ``tile_items[i]:tile_items[i+1]``), or ``tile_items = None`` when every tile is one item.
    A window tile is seen by at most ``BLOCK_S + w - 1`` queries: one item each. A compressed tile is seen by
    every later query of its segment (the first tiles by almost all ``T``): its range is cut into chunks of
    ``max(DKDV_QUERY_CHUNK, T / DKDV_MAX_CHUNKS)`` tokens, so the programs carry similar work and a long
    sequence fills the GPU; the partial sums are reduced in a fixed order (deterministic, no atomics)."""
    n_tiles = k_tiles.shape[0]
    if geom.mode == WINDOW:
        everything = torch.tensor([[0, 2 ** 31 - 1]], dtype=torch.long, device="cpu").expand(n_tiles, 2)
        return torch.cat([k_tiles, everything], 1), None
    q_start, q_end, row_start, cmp_start, _, shift = k_tiles.unbind(1)
    # the first query row whose position i*d + l - 1 (i: the tile's first block) sees the tile
    first_query = torch.maximum(q_start - shift + (row_start - cmp_start) * geom.stride + geom.block_len - 1,
                                q_start)
    chunk = max(DKDV_QUERY_CHUNK, -(-seq_len // DKDV_MAX_CHUNKS))
    chunks = torch.clamp(-torch.div(first_query - q_end, chunk, rounding_mode="floor"), min=1)
    # host tables: explicit CPU devices (a user's torch.set_default_device must not move them)
    tile = torch.repeat_interleave(torch.arange(n_tiles, device="cpu"), chunks)
    tile_items = torch.zeros(n_tiles + 1, dtype=torch.long, device="cpu")
    tile_items[1:] = torch.cumsum(chunks, 0)
    q_lo = first_query[tile] + (torch.arange(tile.numel(), device="cpu") - tile_items[:-1][tile]) * chunk
    items = torch.cat([k_tiles[tile], torch.stack([q_lo, q_lo + chunk], 1)], 1)
    return items, tile_items


def range_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom: RangeGeometry, scale: float,
                            cu_seqlens: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor] = None):
    """``(o, lse, q_tiles)``: ``o [B, T, HQ, Dv]`` in q's dtype, ``lse [B, T, HQ]`` fp32 (natural log, -inf for
    queries that see nothing) and the query tile table (reused by backward). Inputs validated by the caller;
    ``cu_seqlens_k``: optional key segments (see :mod:`.utils`)."""
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = HQ // H
    cfg = pick_config(geom, Dk, Dv, q.dtype)
    gb, block_t, ngc = _group_split(G, cfg.fwd_rows)
    o = new_output((B, T, HQ, Dv), q.dtype, q.device)
    lse = new_output((B, T, HQ), torch.float32, q.device)
    tiles = query_tile_table(cu_seqlens, T, block_t, q.device, geom.block_len, geom.stride, cu_seqlens_k)
    n_tiles = tiles.shape[0]
    if n_tiles == 0 or B * H == 0:
        return o, lse, tiles
    bhc = B * H * ngc
    range_attention_fwd_kernel[(n_tiles * bhc,)](
        Q=q, K=k, V=v, O=o, LSE=lse, TILES=tiles, n_tiles=n_tiles, BHC=bhc, H=H, T=T, **_qkv_strides(q, k, v),
        **stride_args(o, "so_b", "so_t", "so_h"), qk_scale=scale * LOG2E, **_mode_constexprs(geom), G=G, GB=gb,
        NGC=ngc, BLOCK_T=block_t, BLOCK_S=cfg.fwd_keys, DK=Dk, DV=Dv, BLOCK_DK=pow2(Dk, 16), BLOCK_DV=pow2(Dv, 16),
        PREC=dot_precision(q.dtype), REVERSE=geom.mode == COMPRESSED, num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages)
    return o, lse, tiles


def range_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, q_tiles: torch.Tensor, geom: RangeGeometry, scale: float,
                             cu_seqlens: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor] = None,
                             delta: Optional[torch.Tensor] = None):
    """``(dq, dk, dv)`` of :func:`range_attention_forward`'s ``o`` for the output gradient ``do``; ``delta``: fp32
    ``[B, T, HQ]`` ``rowsum(do * o)`` when the caller already has it (else computed here)."""
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = HQ // H
    cfg = pick_config(geom, Dk, Dv, q.dtype)
    do = _lastdim_contiguous(do)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    bdk, bdv, prec = pow2(Dk, 16), pow2(Dv, 16), dot_precision(q.dtype)
    modes = _mode_constexprs(geom)
    qkv_strides = _qkv_strides(q, k, v)
    kv_grad_strides = dict(**stride_args(dk, "sdk_b", "sdk_s", "sdk_h"),
                           **stride_args(dv, "sdv_b", "sdv_s", "sdv_h"))

    n_rows = B * T * HQ
    if n_rows == 0:
        return dq, dk.zero_(), dv.zero_()
    if delta is None:
        delta = attention_delta(o, do)

    gb, block_t, ngc = _group_split(G, cfg.fwd_rows)
    n_tiles = q_tiles.shape[0]
    bhc = B * H * ngc
    range_attention_bwd_dq_kernel[(n_tiles * bhc,)](
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DQ=dq, TILES=q_tiles, n_tiles=n_tiles, BHC=bhc, H=H, T=T,
        **qkv_strides, **stride_args(do, "sdo_b", "sdo_t", "sdo_h"), **stride_args(dq, "sdq_b", "sdq_t", "sdq_h"),
        qk_scale=scale * LOG2E, scale=scale, **modes, G=G, GB=gb, NGC=ngc, BLOCK_T=block_t, BLOCK_S=cfg.dq_keys,
        DK=Dk, DV=Dv, BLOCK_DK=bdk, BLOCK_DV=bdv, PREC=prec, REVERSE=geom.mode == COMPRESSED,
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages)

    k_tiles = key_tile_table(geom, cu_seqlens, T, cfg.dkdv_keys, cu_seqlens_k)
    if k_tiles.shape[0] == 0:  # no key rows at all (e.g. every document shorter than a compressed block)
        return dq, dk, dv
    items, tile_items = dkdv_work_items(geom, k_tiles, T)
    partial = tile_items is not None
    if partial:  # fp32 partial sums per (item, batch x KV head), reduced per key tile below
        dk_out = torch.empty((items.shape[0] * B * H, cfg.dkdv_keys, bdk), dtype=torch.float32, device=q.device)
        dv_out = torch.empty((items.shape[0] * B * H, cfg.dkdv_keys, bdv), dtype=torch.float32, device=q.device)
    else:
        dk_out, dv_out = dk, dv
    gb2, block_tq, ngc2 = _group_split(G, cfg.dkdv_rows)
    range_attention_bwd_dkdv_kernel[(items.shape[0] * B * H,)](
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DK_OUT=dk_out, DV_OUT=dv_out, ITEMS=host_table_to(items, q.device),
        n_items=items.shape[0], BH=B * H, H=H, T=T, **qkv_strides, **stride_args(do, "sdo_b", "sdo_t", "sdo_h"),
        **kv_grad_strides, qk_scale=scale * LOG2E, scale=scale, **modes, G=G, GB=gb2, NGC=ngc2, BLOCK_TQ=block_tq,
        BLOCK_S=cfg.dkdv_keys, DK=Dk, DV=Dv, BLOCK_DK=bdk, BLOCK_DV=bdv, PREC=prec, PARTIAL=partial,
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages)
    if partial:
        range_attention_bwd_reduce_kernel[(k_tiles.shape[0], B * H)](
            PK=dk_out, PV=dv_out, DK_OUT=dk, DV_OUT=dv, KTILES=host_table_to(k_tiles, q.device),
            TILE_ITEMS=host_table_to(tile_items, q.device), BH=B * H, H=H, **kv_grad_strides, scale=scale,
            BLOCK_LEN=geom.block_len, STRIDE=geom.stride, BLOCK_S=cfg.dkdv_keys, DK=Dk, DV=Dv, BLOCK_DK=bdk,
            BLOCK_DV=bdv, num_warps=4)
    return dq, dk, dv


def prepare_inputs(*xs: torch.Tensor):
    """Inputs in the kernel dtype (:func:`.utils.kernel_dtype`) with a unit-stride last dim (a copy only where
    needed); other strides go to the kernels."""
    return tuple(_lastdim_contiguous(x.to(kernel_dtype(x.dtype))) for x in xs)


__all__ = ["WINDOW", "COMPRESSED", "RangeGeometry", "RangeConfig", "CONFIG_OVERRIDE", "pick_config",
           "key_tile_table", "dkdv_work_items", "range_attention_forward", "range_attention_backward", "prepare_inputs"]
