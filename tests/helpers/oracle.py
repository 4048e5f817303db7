"""Brute-force NSA oracle, written independently of ``nsa_kernels.reference``.

Everything here follows DESIGN.md "NSA semantics" literally and as plainly as possible: python loops
over batch, document, query and head; for every query an explicit boolean mask over *all* keys (raw
tokens or packed compressed blocks) is built, then plain softmax attention is computed in float64.
Nothing is tiled and nothing is vectorised across queries, so a bug in the reference's tiling, its
packed-document bookkeeping or its index arithmetic cannot be mirrored here.

Conventions (DESIGN.md plus the reference docstrings):

* q ``[B, T, HQ, Dk]``, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``; query head ``hq`` uses KV head
  ``hq // G`` with ``G = HQ // H``.
* ``cu_seqlens`` (int ``[N + 1]``, B = 1) packs documents; every position, compressed-block and
  selection-block index is counted from the start of the query's own document, and compressed K/V
  rows are packed document after document.
* Compressed block ``i`` covers tokens ``[i*d, i*d + l)`` and is visible to query ``t`` iff
  ``i*d + l - 1 <= t``. A query that sees no block gets ``o = 0`` and ``lse = -inf``.
* Selection block ``j`` covers tokens ``[j*l', (j+1)*l')`` and is a candidate iff ``j*l' <= t``.
  Forced: ``j < init_blocks`` and the ``local_blocks`` most recent candidates; the rest by score,
  ties to the lower index; fewer than ``n`` candidates: all of them. Rows are sorted ascending and
  padded with ``-1``.
* Window: keys ``t - w + 1 ... t``.

All outputs are float64 (indices int32).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
def oracle_doc_spans(seq_len: int, cu_seqlens: Optional[torch.Tensor]) -> List[Tuple[int, int]]:
    """Token ranges ``[(start, end), ...]`` of the documents; one span ``(0, T)`` without packing."""
    if cu_seqlens is None:
        return [(0, seq_len)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    assert bounds[0] == 0 and bounds[-1] == seq_len, (bounds, seq_len)
    return [(bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def oracle_num_compressed_blocks(length: int, block_len: int, stride: int) -> int:
    """Count, by enumeration, the blocks ``i`` whose tokens ``[i*d, i*d + l)`` all lie in the document."""
    count = 0
    while count * stride + block_len <= length:
        count += 1
    return count


def oracle_compressed_offsets(seq_len: int, block_len: int, stride: int,
                              cu_seqlens: Optional[torch.Tensor]) -> List[int]:
    """Row offsets of each document's compressed blocks in the packed compressed K/V (length N + 1)."""
    offsets = [0]
    for start, end in oracle_doc_spans(seq_len, cu_seqlens):
        offsets.append(offsets[-1] + oracle_num_compressed_blocks(end - start, block_len, stride))
    return offsets


def oracle_unfold_blocks(x: torch.Tensor, block_len: int, stride: int,
                         cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, Nc, H, l, D]``: raw tokens of every compressed block, gathered one block at a time."""
    B, T, H, D = x.shape
    rows = []
    for start, end in oracle_doc_spans(T, cu_seqlens):
        for i in range(oracle_num_compressed_blocks(end - start, block_len, stride)):
            first = start + i * stride
            rows.append(torch.stack([x[:, first + u] for u in range(block_len)], dim=2))  # [B, H, l, D]
    if not rows:
        return x.new_zeros(B, 0, H, block_len, D)
    return torch.stack(rows, dim=1)


def _queries(B: int, T: int, cu_seqlens: Optional[torch.Tensor]):
    """Yield ``(b, global_t, local_t, doc_index, doc_start, doc_end)`` for every query token."""
    for b in range(B):
        for n, (start, end) in enumerate(oracle_doc_spans(T, cu_seqlens)):
            for t in range(start, end):
                yield b, t, t - start, n, start, end


def _kv_head(hq: int, num_q_heads: int, num_kv_heads: int) -> int:
    """KV head used by query head ``hq`` (contiguous groups of ``G = HQ // H``)."""
    assert num_q_heads % num_kv_heads == 0
    return hq // (num_q_heads // num_kv_heads)


def _softmax_attend(qvec: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> Tuple[torch.Tensor, float]:
    """Plain masked softmax attention of one query vector.

    Args:
        qvec ``[Dk]``, keys ``[S, Dk]``, values ``[S, Dv]``, mask bool ``[S]``.
    Returns:
        ``(o [Dv], lse)``; ``(0, -inf)`` when the mask is empty.
    """
    picked = torch.nonzero(mask).flatten()
    if picked.numel() == 0:
        return values.new_zeros(values.shape[-1]), NEG_INF
    k = keys.index_select(0, picked)
    v = values.index_select(0, picked)
    logits = (k * qvec).sum(-1) * scale
    top = logits.max()
    e = torch.exp(logits - top)
    z = e.sum()
    p = e / z
    o = (p[:, None] * v).sum(0)
    return o, float(top + torch.log(z))


def _masked_attention(q, k, v, scale: Optional[float], cu_seqlens: Optional[torch.Tensor], key_mask):
    """``(o [B, T, HQ, Dv], lse [B, T, HQ])``: each query head attends its KV head's keys where
    ``key_mask(b, t, h)`` (bool ``[S]`` over all keys) is True; inputs already float64."""
    B, T, HQ, Dk = q.shape
    H = k.shape[2]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    o = torch.zeros(B, T, HQ, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, T, HQ), NEG_INF, dtype=torch.float64)
    for b, t, _, _, _, _ in _queries(B, T, cu_seqlens):
        masks = [key_mask(b, t, h) for h in range(H)]
        for hq in range(HQ):
            h = _kv_head(hq, HQ, H)
            o[b, t, hq], lse[b, t, hq] = _softmax_attend(q[b, t, hq], k[b, :, h], v[b, :, h], masks[h], scale)
    return o, lse


def _f64(*xs):
    return [x.detach().to(torch.float64) for x in xs]


# --------------------------------------------------------------------------------------------
# compressed branch
# --------------------------------------------------------------------------------------------
def oracle_compressed_mask(seq_len: int, block_len: int, stride: int, cu_seqlens: Optional[torch.Tensor],
                           t: int) -> torch.Tensor:
    """Bool ``[Nc]`` over all packed compressed rows: which ones global query token ``t`` attends."""
    offsets = oracle_compressed_offsets(seq_len, block_len, stride, cu_seqlens)
    mask = [False] * offsets[-1]
    for n, (start, end) in enumerate(oracle_doc_spans(seq_len, cu_seqlens)):
        if not (start <= t < end):
            continue
        local_t = t - start
        for row in range(offsets[n], offsets[n + 1]):
            i = row - offsets[n]  # document-local compressed block number
            if i * stride + block_len - 1 <= local_t:
                mask[row] = True
    return torch.tensor(mask, dtype=torch.bool)


def oracle_compressed_attention(q, k_cmp, v_cmp, block_len: int, stride: int, scale: Optional[float] = None,
                                cu_seqlens: Optional[torch.Tensor] = None):
    """Compressed-attention branch: ``(o [B, T, HQ, Dv], lse [B, T, HQ])`` in float64.

    Query ``t`` attends compressed block ``i`` of its own document iff ``i*d + l - 1 <= t``;
    ``o = 0`` and ``lse = -inf`` for a query that sees no block.
    """
    q, k_cmp, v_cmp = _f64(q, k_cmp, v_cmp)
    T = q.shape[1]
    assert k_cmp.shape[1] == oracle_compressed_offsets(T, block_len, stride, cu_seqlens)[-1]
    return _masked_attention(q, k_cmp, v_cmp, scale, cu_seqlens,
                             lambda b, t, h: oracle_compressed_mask(T, block_len, stride, cu_seqlens, t))


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def oracle_overlap_weight(i: int, j: int, block_len: int, stride: int, select_len: int) -> int:
    """Eq. 9 weight: number of stride-``d`` chunks shared by compressed block ``i`` and selection block ``j``.

    Chunk ``c`` is tokens ``[c*d, (c+1)*d)``; the chunk sets are built token by token and intersected.
    """
    cmp_chunks = {tok // stride for tok in range(i * stride, i * stride + block_len)}
    sel_chunks = {tok // stride for tok in range(j * select_len, (j + 1) * select_len)}
    return len(cmp_chunks & sel_chunks)


@lru_cache(maxsize=None)
def oracle_overlaps(i: int, block_len: int, stride: int, select_len: int) -> Tuple[Tuple[int, int], ...]:
    """``((j, w_ij), ...)`` for every selection block ``j`` sharing at least one chunk with compressed block ``i``.

    Scans every ``j`` up to (and one past) the last block that contains one of block ``i``'s tokens.
    """
    last_token = i * stride + block_len - 1
    out = []
    for j in range(last_token // select_len + 2):
        w = oracle_overlap_weight(i, j, block_len, stride, select_len)
        if w:
            out.append((j, w))
    return tuple(out)


def _compressed_probs(qvec: torch.Tensor, keys: torch.Tensor, visible: List[int], scale: float) -> List[float]:
    """Softmax probabilities over the visible compressed rows (empty list if none is visible)."""
    if not visible:
        return []
    rows = keys.index_select(0, torch.tensor(visible, dtype=torch.long))
    logits = [x * scale for x in (rows * qvec).sum(-1).tolist()]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    z = math.fsum(e)
    return [x / z for x in e]


def oracle_block_scores(q, k_cmp, block_len: int, stride: int, select_len: int, scale: Optional[float] = None,
                        cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selection scores ``[B, T, H, J]`` (float64, NaN where block ``j`` is not a candidate).

    ``s_j = sum over the G query heads of KV head h of sum_i w_ij * p_i`` where ``p_i`` is the
    head's compressed-attention probability of (document-local) compressed block ``i``; every sum is
    a correctly rounded ``math.fsum`` so mathematically equal scores compare equal. ``J`` is the
    largest number of candidates of any query.
    """
    q, k_cmp = _f64(q, k_cmp)
    B, T, HQ, Dk = q.shape
    H = k_cmp.shape[2]
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    offsets = oracle_compressed_offsets(T, block_len, stride, cu_seqlens)
    spans = oracle_doc_spans(T, cu_seqlens)
    J = max((end - start - 1) // select_len + 1 for start, end in spans)
    scores = torch.full((B, T, H, J), float("nan"), dtype=torch.float64)
    for b, t, local_t, n, _, _ in _queries(B, T, cu_seqlens):
        n_cmp = offsets[n + 1] - offsets[n]
        visible_local = [i for i in range(n_cmp) if i * stride + block_len - 1 <= local_t]
        visible_rows = [offsets[n] + i for i in visible_local]
        candidates = [j for j in range(J) if j * select_len <= local_t]
        for h in range(H):
            terms = {j: [] for j in candidates}
            for hq in range(HQ):
                if _kv_head(hq, HQ, H) != h:
                    continue
                probs = _compressed_probs(q[b, t, hq], k_cmp[b, :, h], visible_rows, scale)
                for i, p in zip(visible_local, probs):
                    for j, w in oracle_overlaps(i, block_len, stride, select_len):
                        if j in terms:  # a visible block never reaches past t, but be literal
                            terms[j].append(w * p)
            for j in candidates:
                scores[b, t, h, j] = math.fsum(terms[j])
    return scores


def oracle_pick(scores: List[float], local_t: int, select_len: int, top_n: int, init_blocks: int,
                local_blocks: int) -> List[int]:
    """One query's selection row (length ``top_n``) from its candidates' scores (``scores[j]``, j = 0..).

    Candidates are ``j*l' <= t``. Fewer than or exactly ``top_n`` candidates: all of them. Otherwise
    the forced blocks (``j < init_blocks`` and ``j`` in ``(t//l' - local_blocks, t//l']``) plus the
    best other candidates by ``(-score, j)``. Sorted ascending, ``-1`` padded.
    """
    last = local_t // select_len
    candidates = list(range(last + 1))
    if len(candidates) <= top_n:
        chosen = candidates
    else:
        forced = [j for j in candidates if j < init_blocks or last - local_blocks < j <= last]
        assert len(forced) <= top_n
        others = sorted((j for j in candidates if j not in forced), key=lambda j: (-scores[j], j))
        chosen = forced + others[: top_n - len(forced)]
    row = sorted(chosen)
    return row + [-1] * (top_n - len(row))


def oracle_select_blocks(q, k_cmp, block_len: int, stride: int, select_len: int, top_n: int,
                         init_blocks: int = 1, local_blocks: int = 2, scale: Optional[float] = None,
                         cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int32 ``[B, T, H, top_n]`` selected block indices (document-local), see :func:`oracle_pick`.

    The probabilities are recomputed here from q and k_cmp (no lse is taken from anywhere).
    """
    B, T = q.shape[:2]
    H = k_cmp.shape[2]
    scores = oracle_block_scores(q, k_cmp, block_len, stride, select_len, scale, cu_seqlens)
    idx = torch.full((B, T, H, top_n), -1, dtype=torch.int32)
    for b, t, local_t, _, _, _ in _queries(B, T, cu_seqlens):
        for h in range(H):
            row = scores[b, t, h].tolist()
            idx[b, t, h] = torch.tensor(oracle_pick(row, local_t, select_len, top_n, init_blocks, local_blocks),
                                        dtype=torch.int32)
    return idx


# --------------------------------------------------------------------------------------------
# selected and window branches
# --------------------------------------------------------------------------------------------
def oracle_selected_mask(seq_len: int, select_len: int, cu_seqlens: Optional[torch.Tensor], t: int,
                         blocks) -> torch.Tensor:
    """Bool ``[T]``: keys of the (document-local) blocks in ``blocks`` that query ``t`` may see.

    Key ``s`` is in if it is in ``t``'s document, ``s <= t`` and its block ``s_local // l'`` is one
    of the non-negative entries of ``blocks`` (repeats count once).
    """
    chosen = {int(j) for j in blocks if int(j) >= 0}
    mask = [False] * seq_len
    for start, end in oracle_doc_spans(seq_len, cu_seqlens):
        if start <= t < end:
            for s in range(start, t + 1):
                mask[s] = (s - start) // select_len in chosen
    return torch.tensor(mask, dtype=torch.bool)


def oracle_selected_attention(q, k, v, block_idx, select_len: int, scale: Optional[float] = None,
                              cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selected-attention branch ``[B, T, HQ, Dv]`` (float64); ``o = 0`` where no key is selected."""
    q, k, v = _f64(q, k, v)
    T = q.shape[1]
    return _masked_attention(q, k, v, scale, cu_seqlens, lambda b, t, h: oracle_selected_mask(
        T, select_len, cu_seqlens, t, block_idx[b, t, h].tolist()))[0]


def oracle_window_mask(seq_len: int, window: int, cu_seqlens: Optional[torch.Tensor], t: int) -> torch.Tensor:
    """Bool ``[T]``: keys ``t - w + 1 ... t`` of query ``t``'s own document."""
    mask = [False] * seq_len
    for start, end in oracle_doc_spans(seq_len, cu_seqlens):
        if start <= t < end:
            for s in range(start, end):
                mask[s] = t - window + 1 <= s <= t
    return torch.tensor(mask, dtype=torch.bool)


def oracle_window_attention(q, k, v, window: int, scale: Optional[float] = None,
                            cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sliding-window branch ``[B, T, HQ, Dv]`` (float64)."""
    q, k, v = _f64(q, k, v)
    T = q.shape[1]
    return _masked_attention(q, k, v, scale, cu_seqlens,
                             lambda b, t, h: oracle_window_mask(T, window, cu_seqlens, t))[0]


# --------------------------------------------------------------------------------------------
# full NSA
# --------------------------------------------------------------------------------------------
def oracle_nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, block_len: int = 32,
                         stride: int = 16, select_len: int = 64, top_n: int = 16, window: int = 512,
                         init_blocks: int = 1, local_blocks: int = 2, scale: Optional[float] = None,
                         cu_seqlens: Optional[torch.Tensor] = None):
    """``(o, parts)``: ``o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` (float64) and a dict of the parts.

    ``gates [B, T, HQ, 3]`` are post-sigmoid values ordered (cmp, slc, win). ``parts`` holds
    ``o_cmp, lse, idx, o_slc, o_win``.
    """
    o_cmp, lse = oracle_compressed_attention(q, k_cmp, v_cmp, block_len, stride, scale, cu_seqlens)
    idx = oracle_select_blocks(q, k_cmp, block_len, stride, select_len, top_n, init_blocks, local_blocks,
                               scale, cu_seqlens)
    o_slc = oracle_selected_attention(q, k_slc, v_slc, idx, select_len, scale, cu_seqlens)
    o_win = oracle_window_attention(q, k_win, v_win, window, scale, cu_seqlens)
    g = gates.detach().to(torch.float64)
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return o, dict(o_cmp=o_cmp, lse=lse, idx=idx, o_slc=o_slc, o_win=o_win)


def cu_seqlens_of(lengths: Optional[List[int]]) -> Optional[torch.Tensor]:
    """int32 ``cu_seqlens`` of documents with the given lengths (``None`` for an unpacked batch)."""
    if lengths is None:
        return None
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32)


def oracle_pick_from_head_logits(head_logits: List[Dict[int, float]], local_t: int, select_len: int, top_n: int,
                                 init_blocks: int, local_blocks: int) -> List[int]:
    """One query's selection from its group's block logits (``head_logits[g][j]``, a block absent where the head
    sees none of its keys): per head a softmax over its blocks, summed over the heads, then :func:`oracle_pick`."""
    scores = [0.0] * (local_t // select_len + 1)
    for logits in head_logits:
        if logits:
            top = max(logits.values())
            z = math.fsum(math.exp(v - top) for v in logits.values())
            for j, v in logits.items():
                scores[j] += math.exp(v - top) / z
    return oracle_pick(scores, local_t, select_len, top_n, init_blocks, local_blocks)


def oracle_head_block_max(qvec: torch.Tensor, keys: torch.Tensor, local_t: int, select_len: int,
                          scale: float) -> Dict[int, float]:
    """``{j: max_{s in block j, s <= local_t} scale * q . k_s}`` for one query head; ``keys [L, Dk]`` of its KV
    head from the document start."""
    logits: Dict[int, float] = {}
    for s in range(local_t + 1):
        value = math.fsum(float(a) * float(b) for a, b in zip(qvec.tolist(), keys[s].tolist())) * scale
        j = s // select_len
        logits[j] = max(logits.get(j, -math.inf), value)
    return logits


def oracle_max_logit_blocks(q, k, select_len: int, top_n: int, init_blocks: int, local_blocks: int, scale: float,
                            cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int ``[B, T, H, top_n]`` max-logit selection by explicit loops over every causal key."""
    B, T, HQ, _ = q.shape
    H = k.shape[2]
    G = HQ // H
    out = torch.full((B, T, H, top_n), -1, dtype=torch.int32)
    for b, t, local, _, start, _ in _queries(B, T, cu_seqlens):
        for h in range(H):
            heads = [oracle_head_block_max(q[b, t, hq].double(), k[b, start:, h].double(), local, select_len, scale)
                     for hq in range(h * G, (h + 1) * G)]
            out[b, t, h] = torch.tensor(oracle_pick_from_head_logits(heads, local, select_len, top_n, init_blocks,
                                                                     local_blocks))
    return out
