"""Triton kernels of the compressed branch and the block selection of one NSA decode step (:mod:`.nsa_decode`).

Program ``(b * H + h, split)`` owns the step's ``S`` tokens x the ``G`` heads of KV head ``h`` as stacked rows
``token * HEADS + head`` (the layout of :mod:`.select_blocks`), and split ``k`` the compressed rows of the selection
chunks ``[k * CPS, (k + 1) * CPS)`` (a chunk: ``CHUNK`` selection blocks, the ``CHUNK * l'/d`` compressed rows that
start in them), so that one sequence fills the GPU:

* ``nsa_decode_compressed_kernel``: attention over the visible rows of the split (``i*d + l - 1 <= t``), partial
  ``o`` and log2-domain ``lse`` (the rows number ``TOKENS_ATT * HEADS >= 16``).
* ``nsa_decode_scores_kernel``: the paper's block scores (``selection_scoring="compressed"``) of the split's chunks
  from the probabilities ``exp2(q k_i - lse)`` (``lse`` merged from the first kernel's partials) summed over the
  group, with the forced initial/local blocks, kept in the running top list of
  :func:`.select_blocks._merge_chunk` (16 stacked tokens: its block-score dots need 16); a split first walks the chunk
  before its own for the Eq. 9 weights that compressed rows at a chunk's end give the next chunk's blocks.
* ``nsa_decode_top_kernel``, grid ``(B * H,)``: merges the splits' top lists and writes the top-n indices
  (ascending, -1 padded).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .bitonic import bitonic_merge, sort_rows
from .nsa_decode_kernels import _attend, _store_partial, merged_lse
from .select_blocks import _merge_chunk, _overlap_weights
from .tile_loads import load_rows

TOKENS = 16  # stacked tokens of the scoring kernel (its tl.dot needs 16): the most queries per sequence and launch


@triton.jit
def _stacked_rows(POS, b, h, G, S, TOKENS_: tl.constexpr, HEADS: tl.constexpr, BLOCK_LEN: tl.constexpr,
                  STRIDE: tl.constexpr):
    """``TOKENS_`` tokens x ``HEADS`` heads of KV head ``h`` as stacked rows: per row the token, head, validity,
    query head and the number of compressed rows its query sees."""
    offs_m = tl.arange(0, TOKENS_ * HEADS)
    tok = offs_m // HEADS
    g = offs_m % HEADS
    row_ok = (tok < S) & (g < G)
    pos = tl.load(POS + b * S + tok, mask=tok < S, other=0)
    nvis = tl.where(row_ok & (pos >= BLOCK_LEN - 1), (tl.maximum(pos - BLOCK_LEN + 1, 0)) // STRIDE + 1, 0)
    return tok, g, row_ok, h * G + g, nvis


@triton.jit
def nsa_decode_compressed_kernel(Q, POS, KC, VC, OP, LP, H, G, S,
                                 sq_b, sq_s, sq_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk_scale,
                                 BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SPLIT_ROWS: tl.constexpr,
                                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                                 TOKENS_ATT: tl.constexpr, HEADS: tl.constexpr, BLOCK_S: tl.constexpr,
                                 PREC: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    tok, g, row_ok, hq, nvis = _stacked_rows(POS, b, h, G, S, TOKENS_ATT, HEADS, BLOCK_LEN, STRIDE)
    q = load_rows(Q + b * sq_b + tok.to(tl.int64)[:, None] * sq_s + hq[:, None] * sq_h + offs_dk[None, :], row_ok,
                   offs_dk, DK, BLOCK_DK, True)
    acc = tl.zeros([TOKENS_ATT * HEADS, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([TOKENS_ATT * HEADS], dtype=tl.float32)
    m_i = tl.full([TOKENS_ATT * HEADS], float("-inf"), dtype=tl.float32)
    r0 = split * SPLIT_ROWS
    r1 = tl.minimum(r0 + SPLIT_ROWS, tl.max(nvis, 0))
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(r0, r1, BLOCK_S):
        rows = s0 + offs_s
        ok = rows < r1
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, KC + b * skc_b + h * skc_h, VC + b * svc_b + h * svc_h, rows, ok,
                                ok[None, :] & (rows[None, :] < nvis[:, None]), skc_s, svc_s, qk_scale, offs_dk,
                                offs_dv, DK, DV, BLOCK_DK, BLOCK_DV, PREC)
    _store_partial(OP, LP, acc, l_i, m_i, (b * S + tok) * H * G + hq, row_ok, split, offs_dv, DV, BLOCK_DV)


@triton.jit
def nsa_decode_scores_kernel(Q, POS, KC, LP, TOPS, H, G, S, sq_b, sq_s, sq_h, skc_b, skc_s, skc_h, qk_scale,
                             BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr,
                             INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, DK: tl.constexpr,
                             BLOCK_DK: tl.constexpr, HEADS: tl.constexpr, CHUNK: tl.constexpr,
                             LOG_CHUNK: tl.constexpr, KSPLIT: tl.constexpr, CPS: tl.constexpr,
                             SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, TOKENS: tl.constexpr,
                             PREC: tl.constexpr):
    P: tl.constexpr = SELECT_LEN // STRIDE
    R: tl.constexpr = BLOCK_LEN // STRIDE
    BN: tl.constexpr = CHUNK * P // KSPLIT
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    tok, g, row_ok, hq, nvis = _stacked_rows(POS, b, h, G, S, TOKENS, HEADS, BLOCK_LEN, STRIDE)
    q = load_rows(Q + b * sq_b + tok.to(tl.int64)[:, None] * sq_s + hq[:, None] * sq_h + offs_dk[None, :], row_ok,
                   offs_dk, DK, BLOCK_DK, True)
    lse2 = merged_lse(LP, (b * S + tok) * H * G + hq, row_ok, SPLITS, SPLITS_P2)
    lse0 = tl.where(row_ok, lse2, float("inf"))  # padded rows: probability 0
    offs_t = tl.arange(0, TOKENS)
    last_blk = tl.load(POS + b * S + offs_t, mask=offs_t < S, other=0) // SELECT_LEN
    kc_base = KC + b * skc_b + h * skc_h
    w_cur = _overlap_weights(0, 0, BN, CHUNK, P, R)
    w_next = _overlap_weights(0, CHUNK, BN, CHUNK, P, R)
    n_max = tl.max(nvis, 0)
    c0 = split * CPS
    c1 = tl.minimum(c0 + CPS, tl.cdiv(tl.max(last_blk, 0) + 1, CHUNK))
    top = tl.full([TOKENS, CHUNK], -1, tl.int64)
    carry = tl.zeros([TOKENS, CHUNK], dtype=tl.float32)
    if c0 > 0:  # the previous split's last chunk: only what its rows give this split's first blocks (carry)
        top, carry = _merge_chunk(top, carry, c0 - 1, q, lse0, Q, Q, kc_base, sq_h, skc_s, h, G, qk_scale, nvis, row_ok,
                                g, offs_dk, n_max, last_blk, w_cur, w_next, BLOCK_LEN, STRIDE, SELECT_LEN,
                                INIT_BLOCKS, LOCAL_BLOCKS, DK, TOKENS, HEADS, 1, CHUNK, LOG_CHUNK, KSPLIT, PREC)
        top = tl.full([TOKENS, CHUNK], -1, tl.int64)  # its blocks are the previous split's
    for c in range(c0, c1):
        top, carry = _merge_chunk(top, carry, c, q, lse0, Q, Q, kc_base, sq_h, skc_s, h, G, qk_scale, nvis, row_ok,
                                  g, offs_dk, n_max, last_blk, w_cur, w_next, BLOCK_LEN, STRIDE, SELECT_LEN,
                                  INIT_BLOCKS, LOCAL_BLOCKS, DK, TOKENS, HEADS, 1, CHUNK, LOG_CHUNK, KSPLIT, PREC)
    offs_c = tl.arange(0, CHUNK)
    tl.store(TOPS + ((pid * SPLITS + split) * TOKENS + offs_t[:, None]) * CHUNK + offs_c[None, :], top)


@triton.jit
def nsa_decode_top_kernel(TOPS, IDX, H, S, si_b, si_s, si_h, TOP_N: tl.constexpr, CHUNK: tl.constexpr,
                          LOG_CHUNK: tl.constexpr, SPLITS: tl.constexpr, TOKENS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_t = tl.arange(0, TOKENS)
    offs_c = tl.arange(0, CHUNK)
    top = tl.full([TOKENS, CHUNK], -1, tl.int64)
    for k in range(0, SPLITS):
        part = tl.load(TOPS + ((pid * SPLITS + k) * TOKENS + offs_t[:, None]) * CHUNK + offs_c[None, :])
        # top CHUNK of the union: the max of a descending and an ascending list is the top half, bitonic
        top = bitonic_merge(tl.maximum(top, sort_rows(part, LOG_CHUNK, 0)), LOG_CHUNK, 1, LOG_CHUNK)
    SENTINEL: tl.constexpr = 0x7FFFFFFF
    idx = tl.where(top >= 0, 0x7FFFFFFF - (top & 0x7FFFFFFF), SENTINEL).to(tl.int32)
    idx = sort_rows(tl.where(offs_c[None, :] < TOP_N, idx, SENTINEL), LOG_CHUNK, 0)  # the first TOP_N keys
    tl.store(IDX + b * si_b + offs_t.to(tl.int64)[:, None] * si_s + h * si_h + offs_c[None, :],
             tl.where(idx == SENTINEL, -1, idx), mask=(offs_t < S)[:, None] & (offs_c < TOP_N)[None, :])
