"""Max-logit block selection: rank selection blocks by the selected branch's own largest logit in each block.

The exact form of :mod:`nsa_dist.key_bound_selection`: where key bounds bound ``q . k`` over a tile from above,
this scoring computes the maximum itself, ``max_{s in block j, s <= t} scale * q_t . k_s`` per query head
(:func:`nsa_kernels.block_max_logits`, a Triton kernel on the GPU). Nothing is learned and nothing is loose: a
block is picked when some head of the KV group would attend strongly to one of its keys, however many other
blocks there are (key bounds of filler tiles grow with the sequence, so their recall falls with length). As in
NSA each query head turns its block logits into probabilities (softmax over the blocks it sees), the heads of a
group sum them and :func:`nsa_kernels.reference.selection.pick_blocks` takes the forced blocks plus the best
others (:func:`~nsa_kernels.reference.selection.pick_by_block_logits`, shared with key-bound selection).

Cost per layer: the ``q k^T`` products of causal dense attention (``T^2 / 2 * HQ * Dk`` multiply-adds, no
softmax, no values, no backward) plus ``O(T * T / l' * HQ)`` for the block softmax and top-n; memory
``O(rows * T / l' * HQ)`` per chunk of query rows (:func:`rows_per_chunk`). Not differentiable (top-n is not).
Under context parallelism each rank needs every earlier selection key of its documents: one all-gather of the
raw selection keys (:func:`nsa_dist.parallel.scoring.context_parallel_max_logit_blocks`).
"""
from __future__ import annotations

from typing import Optional

import torch

import nsa_kernels
from nsa_kernels.reference.selection import pick_by_block_logits
from nsa_kernels.reference.tiles import query_tiles

CHUNK_ELEMENTS = 1 << 26  # block logits held at once (float32: 256 MiB)


def rows_per_chunk(num_sel: int, num_heads: int, batch: int = 1) -> int:
    """Query rows scored at once so that their ``[B, HQ, rows, num_sel]`` block logits stay within
    :data:`CHUNK_ELEMENTS` (at least one row)."""
    return max(1, CHUNK_ELEMENTS // max(1, num_sel * num_heads * batch))


def pick_by_max_logits(q: torch.Tensor, k: torch.Tensor, first_pos: int, *, select_len: int, top_n: int,
                       init_blocks: int, local_blocks: int, scale: float) -> torch.Tensor:
    """Selection of queries ``q [B, tq, HQ, Dk]`` at document positions ``first_pos ..`` against their document's
    keys ``k [B, L, H, Dk]`` (``L >= first_pos + tq``; later keys are ignored): int32 ``[B, tq, H, top_n]``."""
    logits = nsa_kernels.block_max_logits(q, k, select_len, scale, first_pos)
    positions = torch.arange(first_pos, first_pos + q.shape[1], device=q.device)
    return pick_by_block_logits(logits, positions, select_len=select_len, top_n=top_n, init_blocks=init_blocks,
                                local_blocks=local_blocks)


@torch.no_grad()
def max_logit_select_blocks(q: torch.Tensor, k: torch.Tensor, *, select_len: int, top_n: int, init_blocks: int,
                            local_blocks: int, scale: Optional[float] = None,
                            cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selection block indices from the exact per-block maximum logits (see the module docstring).

    Args:
        q: ``[B, T, HQ, Dk]`` rotated queries; k: ``[B, T, H, Dk]`` rotated selection keys.
        select_len, top_n, init_blocks, local_blocks: as for :func:`nsa_kernels.select_blocks`; scale: default
            ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N + 1]`` packed documents (``B = 1``); blocks never cross them.
    Returns:
        int32 ``[B, T, H, top_n]`` document-relative block numbers, sorted, ``-1`` padded (the format of
        :func:`nsa_kernels.select_blocks`, for :func:`nsa_kernels.selected_attention`).
    """
    B, T, HQ, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    pick = dict(select_len=select_len, top_n=top_n, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale)
    out = torch.full((B, T, k.shape[2], top_n), -1, dtype=torch.int32, device=q.device)
    rows = rows_per_chunk(-(-T // select_len), HQ, B)
    for tile in query_tiles(cu_seqlens, T, tile=rows):
        out[:, tile.t0:tile.t1] = pick_by_max_logits(q[:, tile.t0:tile.t1], k[:, tile.key_rows()], tile.first_pos,
                                                     **pick)
    return out
