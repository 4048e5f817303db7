"""Triton kernels of one NSA decode step: a few new queries per sequence against an NSA layer's cache.

Same contract as ``nsa_dist.inference.nsa_decode_reference`` (the cache's layout is its ``DecodeKV``: every
sequence padded to the cache's capacity, rows a query may not see masked by position). GQA group-centric: a
program owns the ``G`` query heads of one KV head (rows padded to a power of two, at least 16 for ``tl.dot``), so
each K/V row is read once per group. The kernels:

* the compressed branch and the block selection: :mod:`.nsa_decode_compressed` (split over the compressed rows,
  block scores and top-n of the paper's scoring); other scorings (``key_bound``, ``max_logit``) are not computed
  here: the caller passes ``block_idx`` from the reference's selection.
* ``nsa_decode_selected_kernel``, grid ``(B * S * H, splits)``: split ``k`` attends the top-n slots
  ``[k * slots, (k + 1) * slots)`` (keys ``<= t`` of each chosen block) and writes a partial ``o`` and ``lse``.
* ``nsa_decode_window_kernel``, grid ``(B * S * H, splits)``: split ``k`` attends its share of the window rows,
  keys at positions ``t - w + 1 ... t`` (rows = positions for shared K/V; the ring's ``win_positions`` otherwise).
* ``nsa_decode_combine_kernel``: merges each branch's partials by their log-sum-exp (flash-decoding) and applies
  the gates.

The host side is :mod:`.nsa_decode`; the split counts come from the problem size
(:func:`.nsa_decode.decode_splits`: enough programs to fill the GPU). Partials are fp32, their ``lse`` in the log2
domain; positions are int64 and row offsets 64-bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tile_loads import load_rows, store_rows


@triton.jit
def _attend(acc, l_i, m_i, q, k_base, v_base, rows, row_ok, visible, stride_ks, stride_vs, qk_scale, offs_dk,
            offs_dv, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
            PREC: tl.constexpr):
    """One online-softmax step (log2 domain) of query rows ``q [M, BLOCK_DK]`` over key rows ``rows`` (those with
    ``row_ok`` are read) where ``visible`` (broadcast to ``[M, len(rows)]``)."""
    r64 = rows.to(tl.int64)
    k = load_rows(k_base + r64[:, None] * stride_ks + offs_dk[None, :], row_ok, offs_dk, DK, BLOCK_DK, True)
    v = load_rows(v_base + r64[:, None] * stride_vs + offs_dv[None, :], row_ok, offs_dv, DV, BLOCK_DV, True)
    qk = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet: no -inf - -inf
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _empty_state(HEADS: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The online-softmax state before any key: ``acc [HEADS, BLOCK_DV]`` and ``l_i`` zero, ``m_i`` ``-inf``."""
    return (tl.zeros([HEADS, BLOCK_DV], dtype=tl.float32), tl.zeros([HEADS], dtype=tl.float32),
            tl.full([HEADS], float("-inf"), dtype=tl.float32))


@triton.jit
def _finish(acc, l_i, m_i):
    """Normalised ``o`` and ``lse`` (log2 domain, ``-inf`` for a row that saw no key; ``o = 0`` there)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))


@triton.jit
def _group_rows(Q, POS, pid_row, H, G, S, sq_b, sq_s, sq_h, offs_dk, DK: tl.constexpr, BLOCK_DK: tl.constexpr,
                HEADS: tl.constexpr):
    """Program ``pid_row = (b * S + s) * H + h``: batch ``b``, KV head ``h``, the query position ``t``, query heads
    ``hq`` of the group (``HEADS`` rows, ``row_ok`` for the ``G`` real ones) and their queries."""
    h = pid_row % H
    bs = pid_row // H
    b = bs // S
    s = bs % S
    g = tl.arange(0, HEADS)
    row_ok = g < G
    hq = (h * G + g).to(tl.int64)
    t = tl.load(POS + bs.to(tl.int64))
    q = load_rows(Q + b.to(tl.int64) * sq_b + s.to(tl.int64) * sq_s + hq[:, None] * sq_h + offs_dk[None, :],
                   row_ok, offs_dk, DK, BLOCK_DK, True)
    return b.to(tl.int64), h.to(tl.int64), t, bs.to(tl.int64) * H * G + hq, row_ok, q


@triton.jit
def _store_partial(OP, LP, acc, l_i, m_i, out_rows, row_ok, split, offs_dv, DV: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """Partial ``o`` (``OP [rows, splits, DV]``) and log2-domain ``lse`` (``LP [rows, splits]``) of one split."""
    splits = tl.num_programs(1)
    o, lse2 = _finish(acc, l_i, m_i)
    store_rows(OP + (out_rows * splits + split)[:, None] * DV + offs_dv[None, :], o, row_ok, offs_dv, DV, BLOCK_DV)
    tl.store(LP + out_rows * splits + split, lse2, mask=row_ok)


@triton.jit
def nsa_decode_selected_kernel(Q, POS, K, V, IDX, OP, LP, H, G, S,
                               sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, si_b, si_s, si_h,
                               qk_scale, SELECT_LEN: tl.constexpr, TOP_N: tl.constexpr, SLOTS: tl.constexpr,
                               DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                               HEADS: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b, h, t, out_rows, row_ok, q = _group_rows(Q, POS, pid, H, G, S, sq_b, sq_s, sq_h, offs_dk, DK, BLOCK_DK, HEADS)
    idx_row = IDX + b * si_b + ((pid // H) % S).to(tl.int64) * si_s + h * si_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    acc, l_i, m_i = _empty_state(HEADS, BLOCK_DV)
    for n in range(split * SLOTS, tl.minimum(split * SLOTS + SLOTS, TOP_N)):
        blk = tl.load(idx_row + n).to(tl.int64)
        start = blk * SELECT_LEN
        end = tl.where(blk >= 0, tl.minimum(start + SELECT_LEN, t + 1), start)  # causal inside the block
        for s0 in range(start, end, BLOCK_S):
            rows = s0 + offs_s
            ok = rows < end
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, rows, ok, ok[None, :], sk_s, sv_s, qk_scale,
                                    offs_dk, offs_dv, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    _store_partial(OP, LP, acc, l_i, m_i, out_rows, row_ok, split, offs_dv, DV, BLOCK_DV)


@triton.jit
def nsa_decode_window_kernel(Q, POS, K, V, KPOS, OP, LP, H, G, S, n_rows,
                             sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, skp_b,
                             qk_scale, WINDOW_SIZE: tl.constexpr, ROW_IS_POSITION: tl.constexpr,
                             SPLIT_ROWS: tl.constexpr,
                             DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                             HEADS: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b, h, t, out_rows, row_ok, q = _group_rows(Q, POS, pid, H, G, S, sq_b, sq_s, sq_h, offs_dk, DK, BLOCK_DK, HEADS)
    if ROW_IS_POSITION:  # rows are positions: only the window's own rows
        lo = tl.maximum(t - WINDOW_SIZE + 1, 0)
        hi = t + 1
    else:  # a ring and the step's tokens, in any order: every row, masked by its position
        lo = t * 0
        hi = t * 0 + n_rows
    r0 = lo + split * SPLIT_ROWS
    r1 = tl.minimum(r0 + SPLIT_ROWS, hi)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    acc, l_i, m_i = _empty_state(HEADS, BLOCK_DV)
    for s0 in range(r0, r1, BLOCK_S):
        rows = s0 + offs_s
        ok = rows < r1
        if ROW_IS_POSITION:
            kp = rows
        else:
            kp = tl.load(KPOS + b * skp_b + rows, mask=ok, other=-1)
        visible = ok & (kp >= 0) & (kp <= t) & (kp > t - WINDOW_SIZE)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, rows, ok, visible[None, :], sk_s, sv_s, qk_scale,
                                offs_dk, offs_dv, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    _store_partial(OP, LP, acc, l_i, m_i, out_rows, row_ok, split, offs_dv, DV, BLOCK_DV)


@triton.jit
def _split_lses(LP, rows, ok, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    """The splits' log2-domain ``lse`` of ``rows`` (``LP [rows, SPLITS]``), ``[BLOCK_R, SPLITS_P2]`` padded with
    -inf."""
    offs_k = tl.arange(0, SPLITS_P2)
    return tl.load(LP + rows[:, None] * SPLITS + offs_k[None, :], mask=ok[:, None] & (offs_k < SPLITS)[None, :],
                   other=float("-inf"))


@triton.jit
def _safe_max(lse):
    """The largest ``lse`` of each row of ``lse [BLOCK_R, K]``, 0 where all are -inf."""
    m = tl.max(lse, 1)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def merged_lse(LP, rows, ok, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    """log2-domain log-sum-exp of the splits' partials of ``rows`` (``-inf`` where no split saw a key)."""
    lse = _split_lses(LP, rows, ok, SPLITS, SPLITS_P2)
    m = _safe_max(lse)
    denom = tl.sum(tl.exp2(lse - m[:, None]), 1)
    return tl.where(denom == 0.0, float("-inf"), m + tl.log2(tl.where(denom == 0.0, 1.0, denom)))


@triton.jit
def _merge_partials(OP, LP, rows, ok, offs_dv, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, DV: tl.constexpr):
    """fp32 ``[BLOCK_R, BLOCK_DV]``: the splits' partial outputs of ``rows`` (``OP [rows, SPLITS, DV]``) weighted by
    ``exp2(lse_k)`` (0 where no split saw a key), one split at a time."""
    m = _safe_max(_split_lses(LP, rows, ok, SPLITS, SPLITS_P2))
    o = tl.zeros([rows.shape[0], offs_dv.shape[0]], dtype=tl.float32)
    denom = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for k in range(0, SPLITS):
        w = tl.exp2(tl.load(LP + rows * SPLITS + k, mask=ok, other=float("-inf")) - m)
        o += w[:, None] * load_rows(OP + (rows * SPLITS + k)[:, None] * DV + offs_dv[None, :], ok, offs_dv, DV,
                                     offs_dv.shape[0], True)
        denom += w
    return o / tl.where(denom == 0.0, 1.0, denom)[:, None]


@triton.jit
def nsa_decode_combine_kernel(OPC, LPC, OPS, LPS, OPW, LPW, GATES, O, n_rows, DV: tl.constexpr,
                              BLOCK_DV: tl.constexpr, SPLITS_C: tl.constexpr, SPLITS_C_P2: tl.constexpr,
                              SPLITS_S: tl.constexpr, SPLITS_S_P2: tl.constexpr, SPLITS_W: tl.constexpr,
                              SPLITS_W_P2: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ok = rows < n_rows
    offs_dv = tl.arange(0, BLOCK_DV)
    gate = GATES + rows * 3
    o = (tl.load(gate, mask=ok, other=0.0)[:, None] * _merge_partials(OPC, LPC, rows, ok, offs_dv, SPLITS_C,
                                                                       SPLITS_C_P2, DV)
         + tl.load(gate + 1, mask=ok, other=0.0)[:, None] * _merge_partials(OPS, LPS, rows, ok, offs_dv, SPLITS_S,
                                                                           SPLITS_S_P2, DV))
    if HAS_WINDOW:
        o += tl.load(gate + 2, mask=ok, other=0.0)[:, None] * _merge_partials(OPW, LPW, rows, ok, offs_dv, SPLITS_W,
                                                                              SPLITS_W_P2, DV)
    store_rows(O + rows[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty), ok, offs_dv, DV, BLOCK_DV)
