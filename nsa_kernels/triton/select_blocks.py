"""Triton top-n block selection (NSA Sec. 3.3.2, Eq. 8-10): fused scoring and top-n, nothing [T, T/d] in memory.

Same contract as :func:`nsa_kernels.reference.select_blocks`. One program handles a tile of ``BLOCK_T``
queries of one query segment (document) and one KV head ``h``, together with the ``G`` query heads of its
group. Positions (candidates, visible compressed rows) are counted in the segment's key segment: query row
``t`` sits at ``t - q_start + shift`` (:mod:`.utils`; ``shift = 0`` without ``cu_seqlens_k``), and the
compressed rows are the key segment's, from ``cmp_start``:

* The tile's queries for all heads of the group are stacked into ``M = BLOCK_T * HEADS`` rows
  (row ``r`` = token ``r // HEADS``, head ``r % HEADS``), so one ``tl.dot`` scores every head of the group
  against a tile of compressed keys (the keys are read once per KV head, as in fla's NSA kernels).
* The selection blocks are walked in chunks of ``CHUNK`` blocks. For chunk ``[j0, j0 + CHUNK)`` the kernel reads the
  ``CHUNK * l'/d`` compressed rows that start in it (one key tile of ``BN`` rows, or ``KSPLIT`` of them when the
  tile would be too large or ``l'/d`` is not a power of two), recomputes ``p_i = exp(q k_i * scale - lse)`` for the
  rows the query sees (``i*d + l - 1 <= t``), sums them over the heads of the group (a reshape to
  ``[BLOCK_T, HEADS, BN]`` and a sum) and turns them into block scores with the Eq. 9 overlap weights, which
  are computed arithmetically: ``score = psum @ W_cur + carry`` where ``W_cur[r, c]`` counts the stride-d
  chunks row ``j0*l'/d + r`` shares with block ``j0 + c``; a compressed row at the end of a chunk can reach
  into the next chunk's first blocks, so ``carry = psum @ W_next`` (blocks ``j0 + CHUNK + c``) is added to the
  next chunk's scores. Both products are fp32 (``input_precision="ieee"``, small next to the QK^T dot, which
  runs on bf16/fp16 tensor cores, or ``tf32x3`` for fp32 inputs).
* Each block gets an int64 sort key ``(float bits of score) << 32 | (2^31 - 1 - j)``: scores are >= 0, so
  their bits order like the values, and among equal scores the lower index has the larger key ("ties to the
  lower index" comes for free). Forced blocks get the bits of +inf, non-candidates the key -1.
  A running list of the ``CHUNK`` largest keys per query (``[BLOCK_T, CHUNK]``, sorted descending) is merged with
  the chunk's keys: sort the chunk ascending, take the elementwise max with the running list (the top ``CHUNK``
  of the union, a bitonic sequence) and sort descending again. A chunk that beats no query's smallest kept
  key is skipped.
* At the end the first ``top_n`` keys are decoded into indices, sorted ascending with -1 padding at the end.
* Grid ``(query tiles, B * H)``, the latest (longest) tiles first. The sorts are hand-written bitonic networks
  (reshape + min/max), not ``tl.sort``: identical on the GPU and fast under the CPU interpreter.

Memory: O(T * H * top_n) for the output only. Inputs are made contiguous on the host (``.contiguous()``);
fp64 inputs are scored in fp32 (the kernel's accumulation type). No autograd: the op is not differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.tiles import default_scale
from ..validation import check_select_blocks_inputs
from .bitonic import bitonic_merge, sort_rows
from .tile_loads import tile_row
from .utils import (LOG2E, LOG2E_CONSTEXPR, kernel_dtype, new_output, pow2, query_tile_table, scoring_dot_precision,
                    stride_args)

# budgets of the heuristic: elements of the [M, BN] score tile, bytes of the [M, Dk] query tile of one pass. They
# give 512-row tiles (32 tokens x 16 heads at G = 16, 128 tokens x 4 heads at G = 4), faster than 256-row ones;
# 64 tokens x 16 heads no longer fit in shared memory (benchmarks/RESULTS.md, "Tuning notes behind the kernels'
# heuristics").
SCORE_TILE_ELEMS = 32768
QUERY_TILE_BYTES = 131072
KEY_TILE_BYTES = 32768  # one [Dk, BN] tile of compressed keys


@triton.jit
def _overlap_weights(row0, blk0, BN: tl.constexpr, CHUNK: tl.constexpr, P: tl.constexpr, R: tl.constexpr):
    """fp32 ``[BN, CHUNK]`` Eq. 9 weights: stride-d chunks shared by compressed row ``row0 + r`` (chunks
    ``[i, i + R)``) and selection block ``blk0 + c`` (chunks ``[j*P, (j+1)*P)``), rows and blocks relative to
    the chunk's first ones."""
    i = row0 + tl.arange(0, BN)[:, None]
    j = blk0 + tl.arange(0, CHUNK)[None, :]
    return tl.maximum(tl.minimum(i + R, (j + 1) * P) - tl.maximum(i, j * P), 0).to(tl.float32)


@triton.jit
def _group_probs(rows, q0, lse0, q_rows, lse_rows, k_base, stride_qh, stride_kt, h, G, qk_scale,
                 r_vis, r_ok, r_head, offs_d, n_vis, DK: tl.constexpr, BLOCK_T: tl.constexpr,
                 HEADS: tl.constexpr, PASSES: tl.constexpr, PREC: tl.constexpr):
    """fp32 ``[BLOCK_T, BN]``: ``sum_{heads of the group} p_i`` for compressed rows ``rows`` (document-relative).

    Rows of padded heads and of tokens past the document load ``lse = +inf``, so their probabilities are 0
    without a further mask; a query that sees no compressed row (``lse = -inf``) is masked by ``r_vis``.
    """
    BN: tl.constexpr = rows.shape[0]
    k_ptrs = k_base + rows[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
    kt = tl.load(k_ptrs, mask=(offs_d < DK)[:, None] & (rows < n_vis)[None, :], other=0.0)  # [BLOCK_D, BN]
    row_seen = rows[None, :] < r_vis[:, None]  # [M, BN]: the stacked row's query sees compressed row i
    if PASSES == 1:  # q0 / lse0 hold the whole group, loaded once per program
        qk = tl.dot(q0, kt, input_precision=PREC)  # [M, BN] fp32
        prob = tl.exp2(tl.where(row_seen, qk * qk_scale - lse0[:, None], float("-inf")))
        psum = tl.sum(tl.reshape(prob, [BLOCK_T, HEADS, BN]), axis=1)  # sum over the group's heads
    else:  # a runtime loop over passes of HEADS heads, so that one pass's queries are live at a time
        psum = tl.zeros([BLOCK_T, BN], dtype=tl.float32)
        for ps in range(0, PASSES):
            g = ps * HEADS + r_head
            ok = r_ok & (g < G)
            hq = (h * G + g).to(tl.int64)
            q = tl.load(q_rows[:, None] + hq[:, None] * stride_qh + offs_d[None, :],
                        mask=ok[:, None] & (offs_d < DK)[None, :], other=0.0)
            lse2 = tl.load(lse_rows + hq, mask=ok, other=float("inf")).to(tl.float32) * LOG2E_CONSTEXPR
            qk = tl.dot(q, kt, input_precision=PREC)
            prob = tl.exp2(tl.where(row_seen, qk * qk_scale - lse2[:, None], float("-inf")))
            psum += tl.sum(tl.reshape(prob, [BLOCK_T, HEADS, BN]), axis=1)
    return psum


@triton.jit
def _merge_chunk(top, carry, c, q0, lse0, q_rows, lse_rows, k_base, stride_qh, stride_kt, h, G, qk_scale,
                 r_vis, r_ok, r_head, offs_d, n_vis, last_blk, w_cur, w_next,
                 BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr,
                 INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, DK: tl.constexpr, BLOCK_T: tl.constexpr,
                 HEADS: tl.constexpr, PASSES: tl.constexpr, CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr,
                 KSPLIT: tl.constexpr, PREC: tl.constexpr):
    """Scores of selection blocks ``[c*CHUNK, (c+1)*CHUNK)`` for the tile's queries, merged into the running top list;
    returns ``(top, carry)`` (``carry``: what this chunk's last rows give the next chunk's blocks)."""
    P: tl.constexpr = SELECT_LEN // STRIDE
    R: tl.constexpr = BLOCK_LEN // STRIDE
    BN: tl.constexpr = CHUNK * P // KSPLIT  # compressed rows per key tile (a chunk has CHUNK * P rows)
    j0 = c * CHUNK
    if KSPLIT == 1:
        psum = _group_probs(j0 * P + tl.arange(0, BN), q0, lse0, q_rows, lse_rows, k_base, stride_qh, stride_kt,
                            h, G, qk_scale, r_vis, r_ok, r_head, offs_d, n_vis, DK, BLOCK_T, HEADS, PASSES,
                            PREC)
        score = tl.dot(psum, w_cur, carry, input_precision="ieee")  # [BLOCK_T, CHUNK]
        if R > 1:  # the chunk's last rows reach into the next chunk's first blocks
            carry = tl.dot(psum, w_next, input_precision="ieee")
    else:  # the chunk's rows in KSPLIT key tiles (a runtime loop: one tile's buffers at a time)
        score = carry
        carry = tl.zeros_like(carry)
        for part in range(0, KSPLIT):
            psum = _group_probs(j0 * P + part * BN + tl.arange(0, BN), q0, lse0, q_rows, lse_rows, k_base,
                                stride_qh, stride_kt, h, G, qk_scale, r_vis, r_ok, r_head, offs_d, n_vis, DK,
                                BLOCK_T, HEADS, PASSES, PREC)
            score = tl.dot(psum, _overlap_weights(part * BN, 0, BN, CHUNK, P, R), score, input_precision="ieee")
            if R > 1:
                carry = tl.dot(psum, _overlap_weights(part * BN, CHUNK, BN, CHUNK, P, R), carry, input_precision="ieee")

    blk = j0 + tl.arange(0, CHUNK)
    cand = blk[None, :] <= last_blk[:, None]
    forced = cand & ((blk[None, :] < INIT_BLOCKS) | (blk[None, :] + LOCAL_BLOCKS > last_blk[:, None]))
    bits = score.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # scores >= 0: the bits order like the values
    bits = tl.where(forced, 0x7F800000, bits)  # +inf
    key = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - blk).to(tl.int64)[None, :]
    key = tl.where(cand, key, -1)
    beats = tl.max(key, axis=1) > tl.min(top, axis=1)
    if tl.max(beats.to(tl.int32), axis=0) > 0:
        # top CHUNK of (top, key): the max of a descending and an ascending list is the top half, bitonic
        top = bitonic_merge(tl.maximum(top, sort_rows(key, LOG_CHUNK, 0)), LOG_CHUNK, 1, LOG_CHUNK)
    return top, carry


@triton.jit
def select_blocks_kernel(
    Q, K, LSE, OUT, TILES,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_lb, stride_lt,
    stride_ob, stride_ot, stride_oh,
    qk_scale,  # softmax scale * log2(e)
    H, G,
    BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr,
    TOP_N: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    DK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, HEADS: tl.constexpr, PASSES: tl.constexpr,
    CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr, KSPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """Top-n selection blocks of ``BLOCK_T`` queries of one segment for KV head ``h`` (grid ``(query tiles,
    B * H)``, latest tiles first): block scores chunk by chunk, merged into a running top list."""
    P: tl.constexpr = SELECT_LEN // STRIDE  # compressed rows starting in one selection block
    R: tl.constexpr = BLOCK_LEN // STRIDE  # stride-d chunks covered by one compressed row
    BN: tl.constexpr = CHUNK * P // KSPLIT  # compressed rows per key tile (a chunk of CHUNK blocks has CHUNK * P rows)
    M: tl.constexpr = BLOCK_T * HEADS

    pid_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (latest) query tiles start first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_end, tile_start, cmp_start, _, shift = tile_row(TILES, pid_tile)
    pos0 = shift - q_start  # query row t sits at position t + pos0 of its key segment

    # per query of the tile
    offs_t = tl.arange(0, BLOCK_T)
    pos = tile_start + offs_t + pos0  # positions in the key segment
    t_ok = tile_start + offs_t < q_end
    last_blk = pos // SELECT_LEN  # newest candidate block (pos >= 0)
    last_pos = tl.minimum(tile_start + BLOCK_T, q_end) - 1 + pos0
    # compressed rows visible to the tile's last query (i*d + l - 1 <= t), chunks of selection blocks to walk
    n_vis = tl.maximum(last_pos + 1 - BLOCK_LEN + STRIDE, 0) // STRIDE
    n_chunks = tl.cdiv(last_pos // SELECT_LEN + 1, CHUNK)

    # per stacked row (token r // HEADS, head r % HEADS of a pass)
    offs_r = tl.arange(0, M)
    r_tok = tile_start + offs_r // HEADS
    r_vis = tl.maximum(r_tok + pos0 + 1 - BLOCK_LEN + STRIDE, 0) // STRIDE  # rows i with i*d + l - 1 <= position
    r_ok = r_tok < q_end
    r_head = offs_r % HEADS
    offs_d = tl.arange(0, BLOCK_D)

    q_rows = Q + b.to(tl.int64) * stride_qb + r_tok.to(tl.int64) * stride_qt  # [M] pointers
    lse_rows = LSE + b.to(tl.int64) * stride_lb + r_tok.to(tl.int64) * stride_lt
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + cmp_start.to(tl.int64) * stride_kt

    q0 = tl.zeros([M, BLOCK_D], dtype=Q.dtype.element_ty)
    lse0 = tl.zeros([M], dtype=tl.float32)
    if PASSES == 1:  # the whole group fits one pass: load its queries once
        ok0 = r_ok & (r_head < G)
        hq0 = (h * G + r_head).to(tl.int64)
        q0 = tl.load(q_rows[:, None] + hq0[:, None] * stride_qh + offs_d[None, :],
                     mask=ok0[:, None] & (offs_d < DK)[None, :], other=0.0)
        lse0 = tl.load(lse_rows + hq0, mask=ok0, other=float("inf")).to(tl.float32) * LOG2E_CONSTEXPR

    # Eq. 9 weights of a chunk's rows with its own blocks and with the next chunk's blocks (KSPLIT == 1)
    w_cur = _overlap_weights(0, 0, BN, CHUNK, P, R)
    w_next = _overlap_weights(0, CHUNK, BN, CHUNK, P, R)

    top = tl.full([BLOCK_T, CHUNK], -1, tl.int64)  # the CHUNK largest keys so far, sorted descending
    carry = tl.zeros([BLOCK_T, CHUNK], dtype=tl.float32)
    for c in range(0, n_chunks):
        top, carry = _merge_chunk(top, carry, c, q0, lse0, q_rows, lse_rows, k_base, stride_qh, stride_kt, h, G,
                                  qk_scale, r_vis, r_ok, r_head, offs_d, n_vis, last_blk, w_cur, w_next,
                                  BLOCK_LEN, STRIDE, SELECT_LEN, INIT_BLOCKS, LOCAL_BLOCKS, DK, BLOCK_T, HEADS,
                                  PASSES, CHUNK, LOG_CHUNK, KSPLIT, PREC)

    SENTINEL: tl.constexpr = 0x7FFFFFFF
    offs_c = tl.arange(0, CHUNK)
    idx = tl.where(top >= 0, 0x7FFFFFFF - (top & 0x7FFFFFFF), SENTINEL).to(tl.int32)
    idx = tl.where(offs_c[None, :] < TOP_N, idx, SENTINEL)  # the first TOP_N keys are the top n
    idx = sort_rows(idx, LOG_CHUNK, 0)
    idx = tl.where(idx == SENTINEL, -1, idx)
    out = (OUT + b.to(tl.int64) * stride_ob + (tile_start + offs_t).to(tl.int64)[:, None] * stride_ot
           + h.to(tl.int64) * stride_oh + offs_c[None, :])
    tl.store(out, idx, mask=t_ok[:, None] & (offs_c[None, :] < TOP_N))


def selection_config(G: int, Dk: int, block_len: int, stride: int, select_len: int, top_n: int,
                     elem_bytes: int = 2) -> dict:
    """Tile sizes (host heuristic, no autotune): chunks of ``CHUNK`` selection blocks whose ``CHUNK * l'/d`` compressed
    rows are read in ``KSPLIT`` key tiles; ``BLOCK_T`` queries x ``HEADS`` heads per pass, ``PASSES`` passes."""
    P, R = select_len // stride, block_len // stride
    chunk = max(16, pow2(top_n), pow2(-(-16 // P)), pow2((P + R - 2) // P))  # tl.dot dims >= 16; spill <= chunk
    block_d = pow2(Dk, 16)
    BN = chunk * (P & -P)  # key tiles of a power-of-two number of rows that divides the chunk's chunk * P rows
    while BN > 16 and block_d * BN * elem_bytes > KEY_TILE_BYTES:
        BN //= 2
    ksplit = chunk * P // BN
    q_elems = QUERY_TILE_BYTES // elem_bytes // (4 if elem_bytes > 2 else 1)  # fp32: smaller tiles (tf32x3)
    g_pad = pow2(G)
    heads = g_pad
    while heads > 1 and (16 * heads * BN > SCORE_TILE_ELEMS or 16 * heads * block_d > q_elems):
        heads //= 2
    block_t = 16
    while block_t < 128 and 2 * block_t * heads * BN <= SCORE_TILE_ELEMS and 2 * block_t * heads * block_d <= q_elems:
        block_t *= 2
    num_warps = 8 if block_t * heads * BN >= 4096 else 4
    return dict(CHUNK=chunk, KSPLIT=ksplit, BLOCK_D=block_d, BLOCK_T=block_t, HEADS=heads, PASSES=g_pad // heads,
                num_warps=num_warps, num_stages=2 if elem_bytes <= 2 else 1)


@torch.no_grad()
def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, block_len: int, stride: int,
                  select_len: int, top_n: int, init_blocks: int = 1, local_blocks: int = 2,
                  scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the selection blocks each query attends to, shared by the query heads of a KV group.

    See :func:`nsa_kernels.reference.select_blocks` (same signature, checks and result).

    Args:
        q: ``[B, T, HQ, Dk]``; k_cmp: ``[B, Nc, H, Dk]`` compressed keys; lse: ``[B, T, HQ]`` from
            ``compressed_attention`` for the same q, k_cmp and scale (``-inf`` where a query sees no block).
        block_len, stride, select_len, top_n, init_blocks, local_blocks, scale, cu_seqlens: as in the reference.
        cu_seqlens_k: optional int32 ``[N + 1]`` key segments, as for ``compressed_attention`` (k_cmp packed per
            key segment, queries bottom-right aligned); blocks and positions then count from the key segment start.
    Returns:
        int32 ``[B, T, H, top_n]``: block ``j`` scores ``s_j = sum_{heads of group} sum_i w_ij p_i``,
        ``p_i = exp(q k_i * scale - lse)`` over the compressed blocks the query sees; candidates ``j*l' <= t``
        (position in the document or key segment); blocks ``j < init_blocks`` and the ``local_blocks`` newest
        candidates are forced, the rest by score with ties to the lower index; rows ascending, padded with -1.
        Scores are accumulated in fp32 in an order that differs from the reference, so blocks whose scores
        agree to ~1e-6 relative may be ranked differently. Not differentiable.
    """
    dims = check_select_blocks_inputs(q, k_cmp, lse, block_len, stride, select_len, top_n, init_blocks, local_blocks,
                                      cu_seqlens, cu_seqlens_k)
    scale = default_scale(scale, dims.Dk)
    out = new_output((dims.B, dims.T, dims.H, top_n), torch.int32, q.device)
    if dims.T == 0:
        return out
    cfg = selection_config(dims.G, dims.Dk, block_len, stride, select_len, top_n, min(q.element_size(), 4))
    q, k_cmp = (x.to(kernel_dtype(x.dtype)).contiguous() for x in (q, k_cmp))
    lse = lse.to(device=q.device, dtype=torch.float32).contiguous()
    tiles = query_tile_table(cu_seqlens, dims.T, cfg["BLOCK_T"], q.device, block_len, stride, cu_seqlens_k)
    if k_cmp.shape[1] == 0:  # no compressed block anywhere: give the kernel a valid (never read) pointer
        k_cmp = k_cmp.new_zeros(dims.B, 1, dims.H, dims.Dk)
    grid = (tiles.shape[0], dims.B * dims.H)
    select_blocks_kernel[grid](
        Q=q, K=k_cmp, LSE=lse, OUT=out, TILES=tiles,
        **stride_args(q, "stride_qb", "stride_qt", "stride_qh"),
        **stride_args(k_cmp, "stride_kb", "stride_kt", "stride_kh"),
        **stride_args(lse, "stride_lb", "stride_lt"),
        **stride_args(out, "stride_ob", "stride_ot", "stride_oh"),
        qk_scale=scale * LOG2E, H=dims.H, G=dims.G,
        BLOCK_LEN=block_len, STRIDE=stride, SELECT_LEN=select_len,
        TOP_N=top_n, INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks,
        DK=dims.Dk, BLOCK_D=cfg["BLOCK_D"], BLOCK_T=cfg["BLOCK_T"], HEADS=cfg["HEADS"], PASSES=cfg["PASSES"],
        CHUNK=cfg["CHUNK"], LOG_CHUNK=cfg["CHUNK"].bit_length() - 1, KSPLIT=cfg["KSPLIT"],
        PREC=scoring_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
