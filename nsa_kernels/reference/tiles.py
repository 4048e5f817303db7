"""Building blocks of the plain-PyTorch reference: query tiles and masked GQA softmax attention.

The reference walks each query segment (document) in tiles of ``QUERY_TILE`` queries and attends only
to the keys a tile can see, so memory is O(QUERY_TILE * keys * HQ), never O(T^2). Under autograd each
tile is recomputed in backward (activation checkpointing) so backward memory stays at the same bound.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ..layout import document_spans
from ..validation import check_scale

QUERY_TILE = 128


class QueryTile(NamedTuple):
    """Queries ``[t0, t1)`` (rows of q) of query segment ``segment`` and where they sit in its key segment.

    The key segment is rows ``[key_start, key_start + key_len)`` of the raw K/V; every NSA position is
    counted from its start. Queries are bottom-right aligned: query ``t0`` sits at position ``first_pos``
    (``key_len - L_q + t0 - q_start``), query ``t`` at ``first_pos + t - t0``. Without key segments the key
    segment is the query's own document (``key_start = doc start``, ``first_pos = t0 - doc start``).
    """
    segment: int
    key_start: int
    key_len: int
    first_pos: int
    t0: int
    t1: int

    @property
    def end_pos(self) -> int:
        """One past the position of the tile's last query: its causal keys are positions ``< end_pos``."""
        return self.first_pos + self.t1 - self.t0

    def local_positions(self, device) -> torch.Tensor:
        """int64 ``[t1 - t0]``: the tile's query positions counted from the key segment start."""
        return torch.arange(self.first_pos, self.end_pos, device=device)

    def key_rows(self, first: int = 0) -> slice:
        """Rows of the raw K/V holding the key segment's positions ``[first, end_pos)``."""
        return slice(self.key_start + first, self.key_start + self.end_pos)


def key_segment_offsets(cu_seqlens: Optional[torch.Tensor],
                        cu_seqlens_k: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Offsets of the key segments: ``cu_seqlens_k`` when given, else the query segments ``cu_seqlens``."""
    return cu_seqlens if cu_seqlens_k is None else cu_seqlens_k


def query_tiles(cu_seqlens: Optional[torch.Tensor], seq_len: int, cu_seqlens_k: Optional[torch.Tensor] = None,
                tile: int = QUERY_TILE) -> Iterator[QueryTile]:
    """Tiles covering every query row once, in order, never crossing a segment boundary.

    Query segment ``n`` is ``cu_seqlens[n] : cu_seqlens[n + 1]`` (the whole ``seq_len`` without packing), its
    key segment ``cu_seqlens_k[n] : cu_seqlens_k[n + 1]`` (the same rows without ``cu_seqlens_k``).
    """
    q_spans = document_spans(cu_seqlens, seq_len)
    k_spans = q_spans if cu_seqlens_k is None else document_spans(cu_seqlens_k, int(cu_seqlens_k[-1]))
    for n, ((q_start, q_end), (k_start, k_end)) in enumerate(zip(q_spans, k_spans)):
        shift = (k_end - k_start) - (q_end - q_start)  # position of the segment's first query
        for t0 in range(q_start, q_end, tile):
            yield QueryTile(n, k_start, k_end - k_start, shift + t0 - q_start, t0, min(t0 + tile, q_end))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half inputs, else the input dtype (fp32 or fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def masked_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of query heads over their KV head's keys, restricted to ``mask``.

    Args:
        q: ``[B, tq, HQ, Dk]``; k: ``[B, S, H, Dk]``; v: ``[B, S, H, Dv]``, HQ = G * H, query head
           ``hq`` reads KV head ``hq // G``.
        mask: bool ``[tq, S]`` (same for all heads) or ``[B, H, tq, S]`` (True = key visible).
    Returns:
        o ``[B, tq, HQ, Dv]`` and lse ``[B, tq, HQ]`` in the compute dtype. A query with no visible
        key gets ``o = 0`` and ``lse = -inf`` (and zero gradients), never NaN.
    """
    B, tq, HQ, Dk = q.shape
    H = k.shape[2]
    G = HQ // H
    qg = q.reshape(B, tq, H, G, Dk)
    scores = torch.einsum("bqhgd,bshd->bhgqs", qg, k) * scale
    visible = (mask if mask.dim() == 4 else mask[None, None]).unsqueeze(2)  # [B|1, H|1, 1, tq, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    if scores.shape[-1] == 0:  # no keys at all (e.g. no compressed block yet): every row is empty
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    else:
        row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    has_keys = denom > 0
    o = torch.einsum("bhgqs,bshd->bqhgd", probs / torch.where(has_keys, denom, torch.ones_like(denom)), v)
    lse = torch.where(has_keys, row_max + torch.log(torch.where(has_keys, denom, torch.ones_like(denom))),
                      torch.full_like(denom, float("-inf")))
    return o.reshape(B, tq, HQ, v.shape[-1]), lse.squeeze(-1).permute(0, 3, 1, 2).reshape(B, tq, HQ)


def run_tile(fn, *args):
    """Call ``fn(*args)``, recomputing it in backward when autograd records it (bounded memory)."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def tiled_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           cu_seqlens: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                           tile_keys: Callable[[QueryTile], Tuple[slice, torch.Tensor]]) -> torch.Tensor:
    """``o [B, T, HQ, Dv]`` in q's dtype: :func:`masked_gqa_attention` of ``q [B, T, HQ, Dk]`` over ``k``, ``v``
    (``[B, S, H, D]``) tile by tile (:func:`query_tiles`, each under :func:`run_tile`), in the compute dtype.
    ``tile_keys(tile)`` gives the tile's key rows (a slice of ``k``/``v``) and its mask over them (``[tq, keys]``
    or ``[B, H, tq, keys]``); a query that sees no key gets ``o = 0``."""
    ct = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(ct), k.to(ct), v.to(ct)

    def tile_fn(q_tile, k_keys, v_keys, mask):
        return masked_gqa_attention(q_tile, k_keys, v_keys, mask, scale)[0]

    outs = []
    for tile in query_tiles(cu_seqlens, q.shape[1], cu_seqlens_k):
        keys, mask = tile_keys(tile)
        outs.append(run_tile(tile_fn, q_[:, tile.t0:tile.t1], k_[:, keys], v_[:, keys], mask))
    if not outs:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return torch.cat(outs, 1).to(q.dtype)


def default_scale(scale: Optional[float], head_dim: int) -> float:
    """``scale`` as a float if given, else ``1 / sqrt(head_dim)``. Every op of both backends resolves its scale
    here, so every op rejects a bad one (:func:`nsa_kernels.validation.check_scale`)."""
    check_scale(scale)
    return float(scale) if scale is not None else head_dim ** -0.5
