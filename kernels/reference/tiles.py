"""Building blocks of the plain-PyTorch reference: query tiles and masked GQA softmax attention.

The reference walks each document in tiles of ``QUERY_TILE`` queries and attends only to the keys
a tile can see, so memory is O(QUERY_TILE * T * HQ), never O(T^2). Under autograd each tile is
recomputed in backward (activation checkpointing) so backward memory stays at the same bound.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ..layout import document_spans

QUERY_TILE = 128


class QueryTile(NamedTuple):
    """Queries ``[t0, t1)`` (global token indices) of the document ``[doc_start, doc_end)``."""
    doc_index: int
    doc_start: int
    doc_end: int
    t0: int
    t1: int

    def local_positions(self, device) -> torch.Tensor:
        """int64 ``[t1 - t0]``: the tile's query positions counted from the document start."""
        return torch.arange(self.t0 - self.doc_start, self.t1 - self.doc_start, device=device)


def query_tiles(cu_seqlens: Optional[torch.Tensor], seq_len: int, tile: int = QUERY_TILE) -> Iterator[QueryTile]:
    """Tiles covering every token once, in order, never crossing a document boundary."""
    for n, (start, end) in enumerate(document_spans(cu_seqlens, seq_len)):
        for t0 in range(start, end, tile):
            yield QueryTile(n, start, end, t0, min(t0 + tile, end))


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


def default_scale(scale: Optional[float], head_dim: int) -> float:
    """``scale`` if given, else ``1 / sqrt(head_dim)``."""
    return float(scale) if scale is not None else head_dim ** -0.5
