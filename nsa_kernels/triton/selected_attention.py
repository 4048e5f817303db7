"""Triton selected-block attention (NSA Sec. 3.3.2): forward, dq and dK/dV kernels.

Semantics: :func:`nsa_kernels.reference.selected_attention` (query ``t`` of KV group ``h`` attends to the keys
``s <= t`` of the selection blocks listed in ``block_idx[b, t, h, :]``; positions and blocks count from the start
of the query's key segment, ``t`` = query row ``- q_start + shift`` and key position ``p`` = K row
``k_start + p``, see :mod:`.utils`; without ``cu_seqlens_k`` the key segment is the document). ``block_idx`` may be
any integer tensor:
negative entries, duplicates, blocks past the query (``j * l' > t``) and unsorted rows are all handled exactly as
the reference does, because every row is first canonicalised (see :func:`.block_lists.canonical_rows`).

Design
------
* **Forward and dq** (``selected_fwd_kernel``, ``selected_bwd_dq_kernel``): program = (query tile, batch x KV
  head). A tile holds ``BQ`` consecutive queries of one segment (``query_tile_table``) and the tile's
  ``ROWS = BQ * G`` rows (padded to a power of two >= 16) are the rows of every ``tl.dot``: query ``t`` and its
  G query heads. The program walks the *union* of the tile's selected blocks (sorted, deduplicated, built on
  the device by :func:`.block_lists.tile_unions`), loads each selection block's K/V once for all rows, and
  masks each row to the blocks its query selected and to causality. ``G >= 16`` gives ``BQ = 1`` (the paper's
  group-centric kernel: one query, its G heads, n blocks; the union is the query's own list and no membership
  test runs); ``G = 1, 2, 4`` give ``BQ = 16, 8, 4`` queries per program, so a block shared by neighbouring queries
  (forced init/local blocks, and in trained models most top-n blocks) is read once for all of them, and the
  tensor-core tiles stay 16 rows tall instead of being padded from G to 16. Online softmax in base 2 with the
  log2(e)-scaled scale; the forward stores ``lse`` (base 2, fp32) for backward.
* **Backward**: ``delta = rowsum(dO * O)`` (:func:`.delta.attention_delta`, or the fused NSA's gate pass); dq
  recomputes ``P`` from ``lse`` with the forward's structure. dK/dV use the inverted selection: a CSR
  ``(batch, KV head, block) -> queries`` built with one stable sort of the flattened keys (O(T * H * n) memory,
  :func:`_invert_selection`); a program per work item (KV head, selection block, chunk of its query list) keeps
  the block's K/V in registers, loops over its queries in batches (rows = queries x G) and accumulates
  ``dK [l', Dk]``, ``dV [l', Dv]`` in fp32 registers. No atomics: a block whose list fits in one chunk writes its
  rows once; a block chosen by more queries than one chunk (block 0 is chosen by every query) is split into
  chunks whose fp32 partials a second kernel (``selected_bwd_reduce_kernel``) sums in a fixed order, so the
  result is deterministic and no program processes a whole document's queries alone. Bytes: per (query, KV head,
  selected block) the forward and dq read the block's K/V (``l' * (Dk + Dv)``), the dK/dV kernel reads the
  query's q/dO rows (``G * (Dk + Dv)``).
* **Small G** (``<= ATOMIC_DQ_MAX_G``, :func:`_dq_in_dkdv`): the dq kernel would read as many K/V bytes as at
  G = 16 for a quarter of the work, so the dK/dV pass also adds each (query, block) term ``dS K`` to an fp32
  dq with atomics and the dq kernel does not run. Off under ``torch.use_deterministic_algorithms(True)``. (A
  forward done the same way, an lse-only pass over K then a block pass adding ``P V`` with atomics, was
  slower on the H100: ``benchmarks/RESULTS.md``, "Tuning notes behind the kernels' heuristics".)
* Host side: inputs are made contiguous (``.contiguous()``), strides are passed, and every batch, token and
  row index is cast to int64 before it multiplies a stride. fp64 inputs (and bf16 under the CPU interpreter,
  whose bf16 ``tl.dot`` is wrong) run in fp32. Block sizes come from small heuristics (:func:`_config`), no
  autotuning; the module constants below are the knobs to sweep on a GPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..reference.tiles import default_scale
from ..validation import check_selected_attention_inputs
from .block_lists import EMPTY, canonical_rows, tile_unions
from .delta import attention_delta
from .tile_loads import tile_row
from .utils import (LOG2E, dot_precision, host_offsets, host_table_to, kernel_dtype, new_output, pow2,
                    query_tile_table, segment_offsets, stride_args, tile_table)

# Tunables (host heuristics; see _config)
FWD_MIN_ROWS = 16  # forward / dq: rows per program (queries x G) at least this (tensor-core tile height)
BWD_ROWS = 64  # dK/dV: rows per batch of queries (queries x G)
ATOMIC_DQ_ROWS = 32  # the same when the dK/dV pass also computes dq (one more [rows, Dk] fp32 tile live)
MAX_BLOCK_S = 64  # keys per K/V tile; a longer selection block is walked in chunks
CHUNK_FACTOR = 2  # dK/dV: a work item takes at most CHUNK_FACTOR * n * l' queries (n * l' = mean per block)
BWD_STAGES = 2  # dK/dV kernel's pipeline stages
ATOMIC_DQ_MAX_G = 4  # dq from the dK/dV pass (fp32 atomics) for G up to this, see _dq_in_dkdv


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _row_indices(IDX, b, T, t64, H, h, N_IDX, row_ok, BQ: tl.constexpr, ROWS: tl.constexpr, NP: tl.constexpr):
    """``[ROWS, NP]`` selected block numbers of each row's query, needed only when a program packs several
    queries (``BQ > 1``; otherwise a placeholder the compiler drops)."""
    ci = tl.arange(0, NP)
    if BQ > 1:
        idx = tl.load(IDX + ((b * T + t64) * H + h)[:, None] * N_IDX + ci[None, :],
                      mask=row_ok[:, None] & (ci[None, :] < N_IDX), other=-1)
    else:
        idx = tl.zeros([ROWS, NP], dtype=tl.int32)
    return idx


@triton.jit
def _key_slice(k_base, v_base, blocks, i, cs, ck, cv, k_start, last, pos, idx, s_kt, s_vt,
               SELECT_LEN: tl.constexpr, BS: tl.constexpr, NCH: tl.constexpr, BQ: tl.constexpr,
               DK: tl.constexpr, DV: tl.constexpr):
    """Step ``i`` of a program's walk over its selected blocks (``blocks``, ascending): K ``[BS, BK]`` and V
    ``[BS, BV]`` of slice ``i % NCH`` of block ``blocks[i // NCH]`` of the key segment starting at K row
    ``k_start``, and the ``[ROWS, BS]`` visibility (key up to the tile's last position ``last`` and causal for
    the row's query at position ``pos``, and, when queries are packed, selected by that query)."""
    j = tl.load(blocks + i // NCH)
    c = (i % NCH) * BS + cs
    kp = j * SELECT_LEN + c
    k_ok = (c < SELECT_LEN) & (kp <= last)
    krow = (k_start + kp).to(tl.int64)
    kt = tl.load(k_base + krow[:, None] * s_kt + ck[None, :], mask=k_ok[:, None] & (ck[None, :] < DK), other=0.0)
    vt = tl.load(v_base + krow[:, None] * s_vt + cv[None, :], mask=k_ok[:, None] & (cv[None, :] < DV), other=0.0)
    vis = k_ok[None, :] & (kp[None, :] <= pos[:, None])
    if BQ > 1:
        vis = vis & (tl.sum((idx == j).to(tl.int32), 1) > 0)[:, None]
    return kt, vt, vis


@triton.jit
def _tile_queries(TILES, H, BQ: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr):
    """The rows of a forward / dq program (query tile ``program_id(0)``, batch x KV head ``program_id(1)``): the
    ``tile``, its batch ``b`` (int64) and KV head ``h``, query ``t = tile_start + r // G``, head ``hq`` (int64),
    ``row_ok``, the query's position ``pos`` in its key segment, the tile's last position ``last`` and the key
    segment's first K row ``k_start``."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q_start, q_end, tile_start, _, k_start, shift = tile_row(TILES, tile)
    last = tl.minimum(tile_start + BQ, q_end) - 1 - q_start + shift  # position of the tile's last query
    r = tl.arange(0, ROWS)
    t = tile_start + r // G
    hq = (h * G + r % G).to(tl.int64)
    row_ok = (r < BQ * G) & (t < q_end)
    return tile, b, h, t.to(tl.int64), hq, row_ok, t - q_start + shift, last, k_start


@triton.jit
def selected_fwd_kernel(Q, K, V, O, LSE, IDX, UNI, UCNT, TILES,
                        s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                        T, H, NT, N_IDX, UL, qk_scale,
                        G: tl.constexpr, BQ: tl.constexpr, ROWS: tl.constexpr, NP: tl.constexpr,
                        SELECT_LEN: tl.constexpr, BS: tl.constexpr, NCH: tl.constexpr,
                        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Forward: program (query tile, batch x KV head) walks the union of its ``BQ`` queries' selected blocks;
    writes ``o`` and ``lse`` (base 2, fp32)."""
    tile, b, h, t64, hq, row_ok, pos, last, k_start = _tile_queries(TILES, H, BQ, ROWS, G)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    cs = tl.arange(0, BS)
    q = tl.load(Q + b * s_qb + t64[:, None] * s_qt + hq[:, None] * s_qh + ck[None, :],
                mask=row_ok[:, None] & (ck[None, :] < DK), other=0.0)
    idx = _row_indices(IDX, b, T, t64, H, h, N_IDX, row_ok, BQ, ROWS, NP)
    ubase = (b * NT + tile) * H + h
    cnt = tl.load(UCNT + ubase)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BV], dtype=tl.float32)
    for i in range(0, cnt * NCH):
        kt, vt, vis = _key_slice(k_base, v_base, UNI + ubase * UL, i, cs, ck, cv, k_start, last, pos, idx, s_kt,
                                 s_vt, SELECT_LEN, BS, NCH, BQ, DK, DV)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new

    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + b * s_ob + t64[:, None] * s_ot + hq[:, None] * s_oh + cv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (cv[None, :] < DV))
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(LSE + (b * T + t64) * (H * G) + hq, lse, mask=row_ok)


@triton.jit
def selected_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, IDX, UNI, UCNT, TILES,
                           s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                           T, H, NT, N_IDX, UL, qk_scale, scale,
                           G: tl.constexpr, BQ: tl.constexpr, ROWS: tl.constexpr, NP: tl.constexpr,
                           SELECT_LEN: tl.constexpr, BS: tl.constexpr, NCH: tl.constexpr,
                           DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           PREC: tl.constexpr):
    """dq with the forward's tiling: ``P`` recomputed from ``lse``, ``dq = scale * dS K`` over the selected
    blocks' keys."""
    # q/dq share strides (contiguous [B, T, HQ, Dk]); do shares o's strides ([B, T, HQ, Dv])
    tile, b, h, t64, hq, row_ok, pos, last, k_start = _tile_queries(TILES, H, BQ, ROWS, G)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    cs = tl.arange(0, BS)
    q_off = b * s_qb + t64[:, None] * s_qt + hq[:, None] * s_qh + ck[None, :]
    q_mask = row_ok[:, None] & (ck[None, :] < DK)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + b * s_ob + t64[:, None] * s_ot + hq[:, None] * s_oh + cv[None, :],
                 mask=row_ok[:, None] & (cv[None, :] < DV), other=0.0)
    lrow = (b * T + t64) * (H * G) + hq
    lse = tl.load(LSE + lrow, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # such rows see no key: every p below is masked to 0
    delta = tl.load(DELTA + lrow, mask=row_ok, other=0.0)
    idx = _row_indices(IDX, b, T, t64, H, h, N_IDX, row_ok, BQ, ROWS, NP)
    ubase = (b * NT + tile) * H + h
    cnt = tl.load(UCNT + ubase)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    dq = tl.zeros([ROWS, BK], dtype=tl.float32)
    for i in range(0, cnt * NCH):
        kt, vt, vis = _key_slice(k_base, v_base, UNI + ubase * UL, i, cs, ck, cv, k_start, last, pos, idx, s_kt,
                                 s_vt, SELECT_LEN, BS, NCH, BQ, DK, DV)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _block_rows(BLK, gb, SELECT_LEN: tl.constexpr):
    """Selection block ``gb`` (a row of the key-tile table of :func:`_block_table`): its K rows
    ``[blk_start, blk_end)`` (clipped to its key segment) and ``koff``, which maps a query row ``t`` of its
    segment to the K row of the query's position (``t + koff``)."""
    q_start, q_end, blk_start, _, k_start, shift = tile_row(BLK, gb)
    blk_end = tl.minimum(blk_start + SELECT_LEN, k_start + q_end - q_start + shift)
    return blk_start, blk_end, k_start + shift - q_start


@triton.jit
def _item_block(ITEMS, BLK, K, V, item, chunk, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, H, NB,
                SELECT_LEN: tl.constexpr, BS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    """Work item ``item`` of the inverted selection (see :func:`_invert_selection`) and key slice ``chunk`` of its
    selection block: batch ``b``, KV head ``h``, the item's query-list range ``[start, end)`` and partial slot,
    the keys (positions ``kpos``, validity ``k_ok``, ``koff`` mapping a query row to its K row), their K
    ``[BS, BK]`` and V ``[BS, BV]`` tiles and the tiles' offsets (dK / dV have K / V's layout)."""
    key = tl.load(ITEMS + item * 4)
    start = tl.load(ITEMS + item * 4 + 1)
    end = tl.load(ITEMS + item * 4 + 2)
    slot = tl.load(ITEMS + item * 4 + 3)
    bh = key // NB
    b = (bh // H).to(tl.int64)
    h = bh % H
    blk_start, blk_end, koff = _block_rows(BLK, key % NB, SELECT_LEN)
    cs = chunk * BS + tl.arange(0, BS)  # key rows of this program inside the selection block
    kpos = blk_start + cs
    k_ok = (cs < SELECT_LEN) & (kpos < blk_end)
    krow = kpos.to(tl.int64)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    k_off = b * s_kb + h * s_kh + krow[:, None] * s_kt + ck[None, :]
    v_off = b * s_vb + h * s_vh + krow[:, None] * s_vt + cv[None, :]
    kt = tl.load(K + k_off, mask=k_ok[:, None] & (ck[None, :] < DK), other=0.0)
    vt = tl.load(V + v_off, mask=k_ok[:, None] & (cv[None, :] < DV), other=0.0)
    return b, h, start, end, slot, cs, kpos, k_ok, koff, kt, vt, k_off, v_off


@triton.jit
def _batch_probs(Q, LSE, QLIST, kt, qs, end, b, h, kpos, k_ok, koff, s_qb, s_qt, s_qh, T, H, qk_scale,
                 G: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr,
                 PREC: tl.constexpr):
    """The batch of queries ``QLIST[qs : qs + QB]`` (``< end``) of a work item, as ``ROWS`` rows (query x its G
    heads): row validity ``ok``, query tokens ``t64``, heads ``hq``, q ``[ROWS, BK]`` and its offsets, the
    rows' lse offsets ``lrow`` and ``P^T [BS, ROWS]`` of the item's keys (0 where not causal)."""
    r = tl.arange(0, ROWS)
    hq = (h * G + r % G).to(tl.int64)
    n = qs + r // G
    ok = (r < QB * G) & (n < end)
    t = tl.load(QLIST + n, mask=ok, other=0)
    t64 = t.to(tl.int64)
    ck = tl.arange(0, BK)
    q_off = b * s_qb + t64[:, None] * s_qt + hq[:, None] * s_qh + ck[None, :]
    q = tl.load(Q + q_off, mask=ok[:, None] & (ck[None, :] < DK), other=0.0)
    lrow = (b * T + t64) * (H * G) + hq
    lse = tl.load(LSE + lrow, mask=ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # such rows see no key: every p below is masked to 0
    st = tl.dot(kt, tl.trans(q), input_precision=PREC) * qk_scale  # [BS, ROWS]
    vis = k_ok[:, None] & ok[None, :] & (kpos[:, None] <= t[None, :] + koff)  # causal in positions
    pt = tl.where(vis, tl.exp2(st - lse[None, :]), 0.0)
    return ok, t64, hq, q, q_off, lrow, pt


@triton.jit
def selected_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, PK, PV, DQ, ITEMS, QLIST, BLK,
                             s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                             T, H, NB, qk_scale, scale,
                             G: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr, SELECT_LEN: tl.constexpr,
                             SLOT_ROWS: tl.constexpr, BS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, WITH_DQ: tl.constexpr, PREC: tl.constexpr):
    """dK/dV: one program per (work item of the inverted selection, key slice of its block) loops over the
    item's queries; stores the block's rows, or fp32 partials (``PK``/``PV``) when the block has several items.
    ``WITH_DQ``: also adds each query's ``dS K`` to the fp32 dq with atomics."""
    # dk/dv share k/v's strides (contiguous); do shares o's strides; DQ (fp32, WITH_DQ only) shares q's
    b, h, start, end, slot, cs, kpos, k_ok, koff, kt, vt, k_off, v_off = _item_block(
        ITEMS, BLK, K, V, tl.program_id(0).to(tl.int64), tl.program_id(1), s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, H,
        NB, SELECT_LEN, BS, DK, DV, BK, BV)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    dk = tl.zeros([BS, BK], dtype=tl.float32)
    dv = tl.zeros([BS, BV], dtype=tl.float32)
    for qs in range(start, end, QB):
        ok, t64, hq, q, q_off, lrow, p = _batch_probs(Q, LSE, QLIST, kt, qs, end, b, h, kpos, k_ok, koff, s_qb, s_qt,
                                                      s_qh, T, H, qk_scale, G, QB, ROWS, DK, BK, PREC)
        do = tl.load(DO + b * s_ob + t64[:, None] * s_ot + hq[:, None] * s_oh + cv[None, :],
                     mask=ok[:, None] & (cv[None, :] < DV), other=0.0)
        delta = tl.load(DELTA + lrow, mask=ok, other=0.0)
        dv += tl.dot(p.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(vt, tl.trans(do), input_precision=PREC)
        ds = (p * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds, q, input_precision=PREC)
        if WITH_DQ:  # these rows' dq from this block's keys, added in fp32 (see selected_backward)
            dq = tl.dot(tl.trans(ds), kt, input_precision=PREC) * scale
            tl.atomic_add(DQ + q_off, dq, mask=ok[:, None] & (ck[None, :] < DK), sem="relaxed")
    dk = dk * scale
    if slot < 0:
        tl.store(DK_OUT + k_off, dk.to(DK_OUT.dtype.element_ty), mask=k_ok[:, None] & (ck[None, :] < DK))
        tl.store(DV_OUT + v_off, dv.to(DV_OUT.dtype.element_ty), mask=k_ok[:, None] & (cv[None, :] < DV))
    else:
        prow = (slot * SLOT_ROWS + cs).to(tl.int64)
        tl.store(PK + prow[:, None] * DK + ck[None, :], dk, mask=(cs < SELECT_LEN)[:, None] & (ck[None, :] < DK))
        tl.store(PV + prow[:, None] * DV + cv[None, :], dv, mask=(cs < SELECT_LEN)[:, None] & (cv[None, :] < DV))


@triton.jit
def selected_bwd_reduce_kernel(DK_OUT, DV_OUT, PK, PV, MULTI, BLK,
                               s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, H, NB,
                               SELECT_LEN: tl.constexpr, SLOT_ROWS: tl.constexpr, BS: tl.constexpr, DK: tl.constexpr,
                               DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dK/dV of a block split into several work items: the sum of their fp32 partials in slot order
    (deterministic)."""
    m = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    key = tl.load(MULTI + m * 3)
    p0 = tl.load(MULTI + m * 3 + 1)
    p1 = tl.load(MULTI + m * 3 + 2)
    bh = key // NB
    gb = key % NB
    b = (bh // H).to(tl.int64)
    h = bh % H
    blk_start, blk_end, _ = _block_rows(BLK, gb, SELECT_LEN)
    cs = chunk * BS + tl.arange(0, BS)
    kpos = blk_start + cs
    k_ok = (cs < SELECT_LEN) & (kpos < blk_end)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    dk = tl.zeros([BS, BK], dtype=tl.float32)
    dv = tl.zeros([BS, BV], dtype=tl.float32)
    for p in range(p0, p1):  # fixed order: deterministic
        prow = (p * SLOT_ROWS + cs).to(tl.int64)
        dk += tl.load(PK + prow[:, None] * DK + ck[None, :], mask=k_ok[:, None] & (ck[None, :] < DK), other=0.0)
        dv += tl.load(PV + prow[:, None] * DV + cv[None, :], mask=k_ok[:, None] & (cv[None, :] < DV), other=0.0)
    krow = kpos.to(tl.int64)
    tl.store(DK_OUT + b * s_kb + h * s_kh + krow[:, None] * s_kt + ck[None, :], dk.to(DK_OUT.dtype.element_ty),
             mask=k_ok[:, None] & (ck[None, :] < DK))
    tl.store(DV_OUT + b * s_vb + h * s_vh + krow[:, None] * s_vt + cv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=k_ok[:, None] & (cv[None, :] < DV))


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
class _Config(NamedTuple):
    BQ: int  # queries per forward / dq program
    ROWS: int  # forward / dq rows (power of two >= BQ * G)
    QB: int  # queries per dK/dV batch
    BROWS: int  # dK/dV rows (power of two >= QB * G)
    BS: int  # keys per K/V tile (forward / dq)
    NCH: int  # K/V tiles per selection block (forward / dq)
    BSB: int  # keys per dK/dV program
    NCHB: int  # dK/dV programs per selection block
    BK: int
    BV: int
    fwd_warps: int
    fwd_stages: int  # forward kernel's pipeline stages
    bwd_warps: int


def _config(G: int, Dk: int, Dv: int, select_len: int, dq_in_dkdv: bool = False) -> _Config:
    """Host heuristic (register counts from ptxas for sm_90 at Dk = Dv = 128: forward ~100, dq ~85-136,
    dK/dV ~240 with 8 warps, no spills).

    Forward/dq: rows = max(FWD_MIN_ROWS, pow2(G)), BQ = rows // G queries (1 for G >= 16), K/V tiles of
    min(pow2(l'), MAX_BLOCK_S) keys, 4 warps (8 from 64 rows of 128-wide heads); the forward pipelines 3
    stages when it packs several queries (G < 16), 2 for one. dK/dV: BWD_ROWS rows per query batch
    (ATOMIC_DQ_ROWS when it also computes dq), the whole 64-key block per program (32 keys for Dk > 128, where
    64 spills), 4 warps for heads up to 128 wide, 8 above. Each choice was the fastest measured on an H100
    (``benchmarks/RESULTS.md``, "Tuning notes behind the kernels' heuristics")."""
    rows = max(FWD_MIN_ROWS, pow2(G))
    BK, BV = pow2(Dk, 16), pow2(Dv, 16)
    brows = max(ATOMIC_DQ_ROWS if dq_in_dkdv else BWD_ROWS, pow2(G))
    BS = max(16, min(pow2(select_len), MAX_BLOCK_S))
    BSB = min(BS, 32) if BK > 128 else BS
    wide = max(BK, BV) >= 128
    return _Config(BQ=rows // G, ROWS=rows, QB=brows // G, BROWS=brows, BS=BS, NCH=-(-select_len // BS),
                   BSB=BSB, NCHB=-(-select_len // BSB), BK=BK, BV=BV,
                   fwd_warps=8 if rows >= 64 and wide else 4, fwd_stages=3 if rows // G > 1 else 2,
                   bwd_warps=8 if max(BK, BV) > 128 else 4)


def _block_table(cu_seqlens: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], T: int, select_len: int,
                 device):
    """Global selection blocks of one batch row: the key tiles of ``select_len`` rows (:func:`.utils.tile_table`,
    int32 ``[NB, 6]``; key segments in order, block ``j`` of a segment = its K rows ``[j*l', (j+1)*l')``
    clipped to the segment, see :func:`_block_rows`), int64 ``[T]`` the global number of each query's key
    segment's block 0, and ``NB``."""
    blk, seg = tile_table(cu_seqlens, T, select_len, cu_seqlens_k=cu_seqlens_k, over="keys")
    q_bounds = segment_offsets(cu_seqlens, T)[0]
    per_seg = torch.bincount(seg, minlength=len(q_bounds) - 1)
    first = torch.cumsum(per_seg, 0) - per_seg  # global number of each key segment's block 0
    tok_base = host_table_to(torch.repeat_interleave(first, q_bounds[1:] - q_bounds[:-1], output_size=T), device,
                             torch.long)
    return host_table_to(blk, device), tok_base, blk.shape[0]


def _invert_selection(canon: torch.Tensor, tok_base: torch.Tensor, NB: int, chunk_q: int):
    """CSR of the selection by block: which queries picked ``(b, h, global block)``.

    Returns ``items`` int32 ``[n_items, 4]`` = (key, start, end, slot) with ``key = (b * H + h) * NB + block``,
    ``qlist[start:end]`` the item's query tokens (ascending, at most ``chunk_q``; every key, even one nobody
    picked, has at least one item so every dK/dV row is written), ``slot`` the item's partial-sum row or -1
    when the key has a single item; ``multi`` int32 ``[n_multi, 3]`` = (key, first slot, end slot) of the keys
    split into several items; ``qlist`` int32; the number of partial slots.
    """
    B, T, H, n = canon.shape
    dev = canon.device
    n_keys = B * H * NB
    valid = canon < EMPTY
    bh = (torch.arange(B, device=dev)[:, None, None, None] * H + torch.arange(H, device=dev)[None, None, :, None])
    key_dtype = torch.int32 if n_keys < 2 ** 31 - 1 else torch.long  # int32 keys: half the radix-sort passes
    key = torch.where(valid, bh * NB + tok_base[None, :, None, None] + canon.long(),
                      torch.full_like(canon, n_keys, dtype=torch.long)).to(key_dtype)
    sorted_keys, order = torch.sort(key.reshape(-1), stable=True)  # stable: queries stay ascending per key
    qlist = torch.div(order, H * n, rounding_mode="floor").remainder(T).to(torch.int32)
    off = torch.searchsorted(sorted_keys, torch.arange(n_keys + 1, device=dev, dtype=key_dtype))
    count = off[1:] - off[:-1]
    nch = torch.div(count + chunk_q - 1, chunk_q, rounding_mode="floor").clamp_min(1)
    multi = nch > 1
    slots = torch.where(multi, nch, torch.zeros_like(nch))
    n_items, n_slots, n_multi = torch.stack([nch.sum(), slots.sum(), multi.sum()]).tolist()  # one host sync
    keys = torch.arange(n_keys, device=dev)
    item_key = torch.repeat_interleave(keys, nch, output_size=n_items)
    first_item = torch.cumsum(nch, 0) - nch
    chunk = torch.arange(n_items, device=dev) - first_item[item_key]
    start = off[item_key] + chunk * chunk_q
    end = torch.minimum(start + chunk_q, off[item_key + 1])
    slot_base = torch.cumsum(slots, 0) - slots
    slot = torch.where(multi[item_key], slot_base[item_key] + chunk, torch.full_like(chunk, -1))
    items = torch.stack([item_key, start, end, slot], 1).to(torch.int32).contiguous()
    mkeys = torch.sort(torch.where(multi, keys, torch.full_like(keys, n_keys))).values[:n_multi]
    multi_tab = torch.stack([mkeys, slot_base[mkeys], slot_base[mkeys] + nch[mkeys]], 1).to(torch.int32).contiguous()
    return items, multi_tab, qlist, n_slots


def _qkv_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The batch, token and head strides of ``q``, ``k`` and ``v`` as the kernels' keyword arguments."""
    return dict(**stride_args(q, "s_qb", "s_qt", "s_qh"), **stride_args(k, "s_kb", "s_kt", "s_kh"),
                **stride_args(v, "s_vb", "s_vt", "s_vh"))


def _query_tile_constexprs(cfg: _Config, G: int, n: int, select_len: int, Dk: int, Dv: int) -> dict:
    """The constexprs the forward and dq kernels share: query tiling, selection-block walk and head dims."""
    return dict(G=G, BQ=cfg.BQ, ROWS=cfg.ROWS, NP=pow2(n), SELECT_LEN=select_len, BS=cfg.BS, NCH=cfg.NCH, DK=Dk, DV=Dv,
                BK=cfg.BK, BV=cfg.BV)


def _dq_in_dkdv(G: int, need_dq: bool, need_dkdv: bool) -> bool:
    """Whether dq comes from the block-centric dK/dV pass (fp32 ``atomic_add`` of each (query, block) term
    ``dS K``) instead of the query-centric ``selected_bwd_dq_kernel``.

    The dq kernel reads every selected K/V block once per (query, KV head): ``l' * (Dk + Dv)`` bytes whatever G
    is, so at small G it costs as much as at G = 16 for a quarter of the work. The dK/dV pass already holds the
    block and each query's ``dS``; adding ``dS K`` costs one more dot and ``G * Dk`` fp32 atomics per pair
    (faster on an H100 at G = 4, slower at G = 16: ``benchmarks/RESULTS.md``, "Tuning notes behind the
    kernels' heuristics"). Used for ``G <= ATOMIC_DQ_MAX_G`` when both gradients are wanted, unless
    ``torch.use_deterministic_algorithms(True)`` is on: fp32 atomics add in a run-dependent order, so dq may
    differ in the last bits between runs (dK/dV stay deterministic either way)."""
    return (need_dq and need_dkdv and G <= ATOMIC_DQ_MAX_G
            and not torch.are_deterministic_algorithms_enabled())


class SelectedState(NamedTuple):
    """What :func:`selected_backward` needs from :func:`selected_forward`: its (kernel-dtype, contiguous) inputs,
    outputs and tables (the first ``N_TENSORS`` fields), and the call's parameters."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor
    canon: torch.Tensor
    uni: torch.Tensor
    ucnt: torch.Tensor
    tiles: torch.Tensor
    select_len: int
    scale: float
    cu_seqlens: Optional[torch.Tensor]
    cu_seqlens_k: Optional[torch.Tensor]


SelectedState.N_TENSORS = 9


def selected_forward(q, k, v, block_idx, select_len: int, scale: float, cu_seqlens, cu_seqlens_k):
    """``(o, state)``: the forward kernel on contiguous kernel-dtype ``q, k, v``, ``block_idx`` on their device and
    CPU ``cu_seqlens``/``cu_seqlens_k`` (see :func:`selected_attention`); ``state`` feeds :func:`selected_backward`."""
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = HQ // H
    cfg = _config(G, Dk, Dv, select_len)
    dev = q.device
    canon = canonical_rows(block_idx, select_len, cu_seqlens, cu_seqlens_k)
    tiles = query_tile_table(cu_seqlens, T, cfg.BQ, dev, cu_seqlens_k=cu_seqlens_k)
    uni, ucnt = tile_unions(canon, tiles, cfg.BQ)
    NT, n, UL = tiles.shape[0], canon.shape[-1], uni.shape[-1]
    o = new_output((B, T, HQ, Dv), q.dtype, dev)
    lse = new_output((B, T, HQ), torch.float32, dev)
    selected_fwd_kernel[(NT, B * H)](
        Q=q, K=k, V=v, O=o, LSE=lse, IDX=canon, UNI=uni, UCNT=ucnt, TILES=tiles, **_qkv_strides(q, k, v),
        **stride_args(o, "s_ob", "s_ot", "s_oh"), T=T, H=H, NT=NT, N_IDX=n, UL=UL, qk_scale=scale * LOG2E,
        **_query_tile_constexprs(cfg, G, n, select_len, Dk, Dv), PREC=dot_precision(q.dtype), num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages)
    return o, SelectedState(q, k, v, o, lse, canon, uni, ucnt, tiles, select_len, scale, cu_seqlens, cu_seqlens_k)


def selected_backward(state: SelectedState, do: torch.Tensor, delta: Optional[torch.Tensor] = None,
                      need_dq: bool = True, need_dkdv: bool = True, fp32_dq_ok: bool = False):
    """``(dq, dk, dv)`` (``None`` where not needed) of :func:`selected_forward`'s ``o`` for the output gradient
    ``do``; ``delta``: fp32 ``[B, T, HQ]`` ``rowsum(do * o)`` when the caller already has it. dq comes from the
    dq kernel or, at small G with dK/dV wanted too, from the dK/dV pass (:func:`_dq_in_dkdv`) in an fp32
    buffer, returned as is when ``fp32_dq_ok`` (a caller that adds it to another dq saves the cast), else in
    q's dtype."""
    q, k, v, o, lse, canon, uni, ucnt, tiles, select_len, scale, cu_seqlens, cu_seqlens_k = state
    B, T, HQ, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = HQ // H
    dq_in_dkdv = _dq_in_dkdv(G, need_dq, need_dkdv)
    cfg = _config(G, Dk, Dv, select_len, dq_in_dkdv)
    dev = q.device
    do = do.to(q.dtype).contiguous()
    NT, n, UL = tiles.shape[0], canon.shape[-1], uni.shape[-1]
    prec = dot_precision(q.dtype)
    if delta is None:
        delta = attention_delta(o, do)

    dq = dk = dv = None
    dq_acc = None
    if dq_in_dkdv:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev)
    elif need_dq:
        dq = new_output(q.shape, q.dtype, dev)
        selected_bwd_dq_kernel[(NT, B * H)](
            Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DQ=dq, IDX=canon, UNI=uni, UCNT=ucnt, TILES=tiles,
            **_qkv_strides(q, k, v), **stride_args(do, "s_ob", "s_ot", "s_oh"), T=T, H=H, NT=NT, N_IDX=n, UL=UL,
            qk_scale=scale * LOG2E, scale=scale, **_query_tile_constexprs(cfg, G, n, select_len, Dk, Dv),
            PREC=prec, num_warps=cfg.fwd_warps, num_stages=2)
    if need_dkdv:
        blk, tok_base, NB = _block_table(cu_seqlens, cu_seqlens_k, T, select_len, dev)
        chunk_q = max(cfg.QB, int(math.ceil(CHUNK_FACTOR * n * select_len / cfg.QB)) * cfg.QB)
        items, multi, qlist, n_slots = _invert_selection(canon, tok_base, NB, chunk_q)
        slot_rows = cfg.NCHB * cfg.BSB
        dk = new_output(k.shape, k.dtype, dev)
        dv = new_output(v.shape, v.dtype, dev)
        pk = torch.empty((max(n_slots, 1), slot_rows, Dk), dtype=torch.float32, device=dev)
        pv = torch.empty((max(n_slots, 1), slot_rows, Dv), dtype=torch.float32, device=dev)
        if items.shape[0] > 0:
            selected_bwd_dkdv_kernel[(items.shape[0], cfg.NCHB)](
                Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, DK_OUT=dk, DV_OUT=dv, PK=pk, PV=pv,
                DQ=dk if dq_acc is None else dq_acc, ITEMS=items, QLIST=qlist, BLK=blk, **_qkv_strides(q, k, v),
                **stride_args(do, "s_ob", "s_ot", "s_oh"), T=T, H=H, NB=NB, qk_scale=scale * LOG2E, scale=scale,
                G=G, QB=cfg.QB, ROWS=cfg.BROWS, SELECT_LEN=select_len, SLOT_ROWS=slot_rows, BS=cfg.BSB, DK=Dk, DV=Dv,
                BK=cfg.BK, BV=cfg.BV, WITH_DQ=dq_in_dkdv, PREC=prec, num_warps=cfg.bwd_warps,
                num_stages=BWD_STAGES)
        if multi.shape[0] > 0:
            selected_bwd_reduce_kernel[(multi.shape[0], cfg.NCHB)](
                DK_OUT=dk, DV_OUT=dv, PK=pk, PV=pv, MULTI=multi, BLK=blk, **stride_args(dk, "s_kb", "s_kt", "s_kh"),
                **stride_args(dv, "s_vb", "s_vt", "s_vh"), H=H, NB=NB, SELECT_LEN=select_len, SLOT_ROWS=slot_rows,
                BS=cfg.BSB, DK=Dk, DV=Dv, BK=cfg.BK, BV=cfg.BV, num_warps=cfg.bwd_warps)
    if dq_acc is not None:
        dq = dq_acc if fp32_dq_ok else dq_acc.to(q.dtype)
    return dq, dk, dv


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, select_len, scale, cu_seqlens, cu_seqlens_k):
        # cu_seqlens / cu_seqlens_k: CPU copies (host tables only)
        o, state = selected_forward(q, k, v, block_idx, select_len, scale, cu_seqlens, cu_seqlens_k)
        ctx.save_for_backward(*state[:SelectedState.N_TENSORS])
        ctx.meta = state[SelectedState.N_TENSORS:]
        return o

    @staticmethod
    def backward(ctx, do):
        state = SelectedState(*ctx.saved_tensors, *ctx.meta)
        dq, dk, dv = selected_backward(state, do, need_dq=ctx.needs_input_grad[0],
                                       need_dkdv=ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        return dq, dk, dv, None, None, None, None, None


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, select_len: int,
                       scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                       cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each query over the keys of its selected blocks (Triton forward and backward).

    Same contract as :func:`nsa_kernels.reference.selected_attention`:

    Args:
        q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (fp16 / bf16 / fp32; fp64, and bf16
            under the interpreter, run in fp32).
        block_idx: int ``[B, T, H, n]`` document-relative block numbers (block ``j`` = the document's tokens
            ``[j*select_len, (j+1)*select_len)``), shared by the G = HQ / H query heads of KV head ``h``;
            negative entries are empty, a repeated index counts once, blocks past the query hold no visible key;
            any order is accepted.
        select_len: selection block length ``l'``; scale: default ``Dk ** -0.5``;
        cu_seqlens: optional int32 ``[N + 1]`` packed documents (``B = 1``).
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments (needs ``cu_seqlens``, which then describes N query
            segments; ``L_k[n] >= L_q[n]``): k, v are ``[1, T_k, H, D]``, ``T_k = cu_seqlens_k[-1]``, the key
            segments packed one after another; block_idx stays ``[1, T, H, n]`` with blocks numbered from the key
            segment start, and query ``j`` of segment ``n`` sits at position ``L_k[n] - L_q[n] + j`` of key
            segment ``n`` (causality uses these positions). Default: the key segments are the documents.
    Returns:
        ``o [B, T, HQ, Dv]`` in q's dtype: softmax over the selected blocks' keys ``s <= t`` (fp32 accumulation);
        ``o = 0`` (and zero gradients) for a query whose selection holds no such key. Differentiable in q, k, v.
    """
    dims = check_selected_attention_inputs(q, k, v, block_idx, select_len, cu_seqlens, cu_seqlens_k)
    scale = default_scale(scale, dims.Dk)
    if dims.T == 0:
        return q.new_zeros(dims.B, 0, dims.HQ, dims.Dv)
    cu_seqlens, cu_seqlens_k = host_offsets(cu_seqlens, cu_seqlens_k)
    block_idx = block_idx.to(q.device)
    if block_idx.shape[-1] == 0:
        block_idx = torch.full((*block_idx.shape[:3], 1), -1, dtype=torch.int32, device=q.device)
    dtype = q.dtype
    q, k, v = (x.to(kernel_dtype(dtype)) for x in (q, k, v))
    o = _SelectedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), block_idx, select_len, scale,
                                 cu_seqlens, cu_seqlens_k)
    return o.to(dtype)
