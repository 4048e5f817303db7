"""Context-parallel dense attention, the baseline NSA's context parallelism is measured against: every rank
all-gathers the raw K/V of the whole sequence (backward: reduce-scatter of their gradients), then runs causal
SDPA of each of its local segments against the keys of that segment's document up to the segment's end.

Per segment (a run of one document inside one local chunk, document positions ``[p0, p1)``) the attention is
``L = p1 - p0`` queries against ``S = p1`` keys with a bottom-right aligned causal mask (query at document position
``p`` sees keys ``0 .. p``), so memory stays O(local queries x document keys) per segment; no ``T x T`` mask
is ever built. The result equals single-rank causal attention restricted to each document.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .comm import all_gather_rows
from .sharding import ShardedSequence


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Bottom-right aligned causal SDPA: ``q [..., L, Dk]`` against ``k [..., S, Dk]``, ``v [..., S, Dv]``
    (``S >= L``, same heads): query ``i`` sees keys ``0 .. i + S - L``. ``L == S`` is plain causal attention."""
    L, S = q.shape[-2], k.shape[-2]
    if L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S), scale=scale)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: ShardedSequence, group) -> int:
    rank = shards.rank_in(group, "context-parallel dense attention", q)  # before the local checks, on every rank
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [1, B*T/P, heads, dim], got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] != 1 or q.shape[1] != shards.local_len or k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must hold this rank's "
                         f"B*T/P={shards.local_len} local rows as [1, {shards.local_len}, heads, dim] (k and v with "
                         f"the same KV heads)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads HQ={q.shape[2]} must be a multiple of the KV heads H={k.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q has head dim {q.shape[3]} but k has {k.shape[3]}")
    return rank


def all_gather_global(x: torch.Tensor, shards: ShardedSequence, group) -> torch.Tensor:
    """Every rank's local rows ``x [B*T/P, ...]`` (the flattened local rows of ``shards``), all-gathered and put
    in global packed order: ``[B*T, ...]``. Differentiable (backward: reduce-scatter of the gradients)."""
    gathered = all_gather_rows(x, [shards.local_len] * shards.world_size, group)
    owner_rank, owner_row = shards.owner(torch.arange(shards.total_len, device=x.device))
    return gathered.index_select(0, owner_rank * shards.local_len + owner_row)


def allgather_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, shards: ShardedSequence, group,
                              scale: Optional[float] = None,
                              attend: Callable[..., torch.Tensor] = causal_sdpa) -> torch.Tensor:
    """Causal dense attention of this rank's queries, equal to the single-rank per-document causal attention rows
    of those tokens.

    Args:
        q: ``[1, B*T/P, HQ, Dk]`` local queries (the flattened local rows of ``shards``, as
            :func:`~nsa_dist.parallel.context_parallel_nsa` takes them), rotated as the caller wants.
        k, v: ``[1, B*T/P, H, Dk|Dv]`` local keys (rotated like q) and values; ``HQ`` a multiple of ``H`` (query
            head ``hq`` uses KV head ``hq // G``).
        shards: the layout of the packed global sequence over the group (global documents included).
        group: the context-parallel process group (``None``: the default group).
        scale: softmax scale (default ``1/sqrt(Dk)``).
        attend: ``attend(q [1, HQ, L, Dk], k [1, HQ, S, Dk], v [1, HQ, S, Dv], scale) -> [1, HQ, L, Dv]``,
            bottom-right aligned causal attention of one segment (default :func:`causal_sdpa`; e.g. a wrapper
            that picks an SDPA backend).
    Returns:
        ``o [1, B*T/P, HQ, Dv]``. Differentiable w.r.t. q, k and v; the gradients of k and v rows used by other
        ranks come back through the reduce-scatter of the all-gather's backward.
    """
    rank = _check_inputs(q, k, v, shards, group)
    H, Dk = k.shape[2], k.shape[3]
    G = q.shape[2] // H
    # one all-gather of K and V side by side
    kv_global = all_gather_global(torch.cat([k[0], v[0]], dim=-1), shards, group)  # [B*T, H, Dk + Dv]
    k_global, v_global = kv_global.split([Dk, kv_global.shape[-1] - Dk], dim=-1)
    outs = []
    for seg in shards.segments(rank):
        q_seg = q[0, seg.row:seg.row + seg.length].transpose(0, 1)[None]  # [1, HQ, L, Dk]
        keys = slice(seg.doc_start, seg.doc_start + seg.p1)  # the document's keys up to the segment's end
        k_seg, v_seg = k_global[keys], v_global[keys]  # [S, H, D]
        if G > 1:
            k_seg, v_seg = k_seg.repeat_interleave(G, dim=1), v_seg.repeat_interleave(G, dim=1)
        o = attend(q_seg, k_seg.transpose(0, 1)[None], v_seg.transpose(0, 1)[None], scale)
        outs.append(o[0].transpose(0, 1))  # [L, HQ, Dv]
    return torch.cat(outs, dim=0)[None]
