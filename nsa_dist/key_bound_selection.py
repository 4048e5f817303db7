"""Key-bound block selection: rank selection blocks by an upper bound of the selected branch's own logits.

NSA ranks blocks by compressed-attention probabilities, which must *learn* to point at the block the selected
branch needs (and get no gradient from top-n). This scoring needs no learning: for every tile of ``tile_len``
consecutive selection keys of a document it keeps the per-coordinate minimum and maximum (rotated keys, as the
selected branch sees them), and bounds any query's logit over the tile from above, as Quest (Tang et al., 2024)
does for KV-cache pages::

    q . k_s <= sum_d max(q_d * kmax_d, q_d * kmin_d)   for every key k_s of the tile.

A block's logit is the largest bound over its tiles that end at or before the query (only complete, causal
tiles: no future key shapes the choice). As in NSA each query head turns its block logits into probabilities
(softmax over the blocks it sees, times the attention scale), the heads of a KV group sum them, and
:func:`nsa_kernels.reference.selection.pick_blocks` takes the forced blocks plus the best others
(:func:`~nsa_kernels.reference.selection.pick_by_block_logits`; :mod:`nsa_dist.max_logit_selection` computes
the maximum the bound bounds exactly). So when any query
head of the group has a key in a block it would attend to strongly, the block's bound is at least that logit.

Cost per layer: ``O(T * T / tile_len * HQ * Dk)`` multiply-adds (with ``tile_len = d = 16``, about the
compressed branch's own scoring), memory ``O(ROWS_PER_CHUNK * T / tile_len * HQ)``; not differentiable (top-n is
not). Plain PyTorch, shared by both kernel backends; under context parallelism the ranks all-reduce the tile
bounds (:func:`nsa_dist.parallel.scoring.context_parallel_key_bound_blocks`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nsa_kernels.reference.selection import pick_by_block_logits
from nsa_kernels.reference.tiles import compute_dtype, query_tiles

ROWS_PER_CHUNK = 1024  # query rows scored at once: memory O(ROWS_PER_CHUNK * T / tile_len * HQ)


def check_tile_len(select_len: int, tile_len: int) -> None:
    """``tile_len`` must divide ``select_len`` (a tile never straddles two selection blocks)."""
    if select_len % tile_len:
        raise ValueError(f"select_len={select_len} must be a multiple of tile_len={tile_len}")


def tile_key_bounds(k: torch.Tensor, tile_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate ``(kmin, kmax)``, each ``[B, ceil(L / tile_len), H, Dk]``, over consecutive tiles of
    ``tile_len`` rows of one document's keys ``k [B, L, H, Dk]`` (the last tile may be partial)."""
    B, L, H, D = k.shape
    pad = -L % tile_len
    padded = F.pad(k, (0, 0, 0, 0, 0, pad), mode="replicate") if pad else k  # repeats keep min and max
    tiles = padded.view(B, -1, tile_len, H, D)
    return tiles.amin(2), tiles.amax(2)


def pick_by_key_bounds(q: torch.Tensor, positions: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *,
                       select_len: int, tile_len: int, top_n: int, init_blocks: int, local_blocks: int,
                       scale: float) -> torch.Tensor:
    """Selection of queries of one document against that document's tile bounds.

    Args:
        q: ``[B, tq, HQ, Dk]`` rotated queries at document positions ``positions [tq]``.
        kmin, kmax: ``[B, Nt, H, Dk]`` bounds of the document's tiles (:func:`tile_key_bounds`), float.
    Returns:
        int32 ``[B, tq, H, top_n]`` (sorted, ``-1`` padded).
    """
    B, tq, HQ, D = q.shape
    H = kmin.shape[2]
    num_tiles = kmin.shape[1]
    qg = q.to(kmin.dtype).view(B, tq, H, HQ // H, D)
    bound = (torch.einsum("bqhgd,bnhd->bhgqn", qg.clamp_min(0), kmax)
             + torch.einsum("bqhgd,bnhd->bhgqn", qg.clamp_max(0), kmin)) * scale          # [B, H, G, tq, Nt]
    complete = (torch.arange(num_tiles, device=q.device) + 1) * tile_len - 1 <= positions[:, None]   # [tq, Nt]
    bound = bound.masked_fill(~complete, float("-inf"))
    tiles_per_block = select_len // tile_len
    num_sel = -(-num_tiles // tiles_per_block)
    padded = F.pad(bound, (0, num_sel * tiles_per_block - num_tiles), value=float("-inf"))
    block_logit = padded.view(*bound.shape[:-1], num_sel, tiles_per_block).amax(-1)
    return pick_by_block_logits(block_logit, positions, select_len=select_len, top_n=top_n, init_blocks=init_blocks,
                                local_blocks=local_blocks)


@torch.no_grad()
def key_bound_select_blocks(q: torch.Tensor, k: torch.Tensor, *, select_len: int, tile_len: int, top_n: int,
                            init_blocks: int, local_blocks: int, scale: Optional[float] = None,
                            cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selection block indices from key bounds (see the module docstring).

    Args:
        q: ``[B, T, HQ, Dk]`` rotated queries; k: ``[B, T, H, Dk]`` rotated selection keys.
        select_len: selection block ``l'``; tile_len: rows per bound tile (``l' % tile_len == 0``); top_n,
            init_blocks, local_blocks: as for :func:`nsa_kernels.select_blocks`; scale: default ``1 / sqrt(Dk)``.
        cu_seqlens: optional int32 ``[N + 1]`` packed documents (``B = 1``); tiles and blocks never cross them.
    Returns:
        int32 ``[B, T, H, top_n]`` document-relative block numbers, sorted, ``-1`` padded (the format of
        :func:`nsa_kernels.select_blocks`, for :func:`nsa_kernels.selected_attention`).
    """
    check_tile_len(select_len, tile_len)
    B, T, _, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    pick = dict(select_len=select_len, tile_len=tile_len, top_n=top_n, init_blocks=init_blocks,
                local_blocks=local_blocks, scale=scale)
    out = torch.full((B, T, k.shape[2], top_n), -1, dtype=torch.int32, device=q.device)
    segment = None
    for tile in query_tiles(cu_seqlens, T, tile=ROWS_PER_CHUNK):
        if tile.segment != segment:  # the tiles of one document come in a row: its bounds once
            segment = tile.segment
            doc_keys = k[:, tile.key_start:tile.key_start + tile.key_len].to(compute_dtype(k.dtype))
            kmin, kmax = tile_key_bounds(doc_keys, tile_len)
        out[:, tile.t0:tile.t1] = pick_by_key_bounds(q[:, tile.t0:tile.t1], tile.local_positions(q.device), kmin,
                                                     kmax, **pick)
    return out
