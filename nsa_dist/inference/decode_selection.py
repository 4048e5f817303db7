"""Top-n block selection for decode queries: each query row ``(b, s)`` at its own position ``positions[b, s]``
scores the selection blocks of its sequence as training does (every ``selection_scoring`` of
:class:`~nsa_dist.NSAConfig`) and takes the forced plus the best blocks with
:func:`~nsa_kernels.reference.selection.pick_blocks`."""
from __future__ import annotations

import torch

from nsa_kernels import NSAGeometry
from nsa_kernels.reference import block_max_logits
from nsa_kernels.reference.selection import overlap_weights, pick_blocks, pick_by_block_logits

from ..key_bound_selection import pick_by_key_bounds
from .decode_kv import DecodeKV


def compressed_block_scores(q: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor,
                            geometry: NSAGeometry, scale: float, num_sel: int) -> torch.Tensor:
    """Paper scores (Eq. 8-9) ``[B, H, S, num_sel]``: ``s_j = sum_{heads of group} sum_i w_ij p_i`` with
    ``p_i = exp(scale * q . k_cmp_i - lse)`` over the compressed blocks the query sees (``i*d + l - 1 <= t``).

    ``q [B, S, HQ, Dk]`` rotated, ``positions`` int64 ``[B, S]``, ``k_cmp [B, Nc, H, Dk]``, ``lse [B, S, HQ]`` of the
    compressed branch over the same blocks; all in one compute dtype."""
    B, S, HQ, D = q.shape
    Nc, H = k_cmp.shape[1], k_cmp.shape[2]
    logits = torch.einsum("bqhgd,bshd->bhgqs", q.reshape(B, S, H, HQ // H, D), k_cmp) * scale
    block_end = torch.arange(Nc, device=q.device) * geometry.stride + geometry.block_len - 1
    visible = (block_end <= positions[..., None])[:, None, None]                    # [B, 1, 1, S, Nc]
    row_lse = lse.reshape(B, S, H, HQ // H).permute(0, 2, 3, 1)[..., None]         # [B, H, G, S, 1]
    probs = torch.exp(torch.where(visible, logits - row_lse, torch.full_like(logits, float("-inf"))))
    weights = overlap_weights(Nc, num_sel, geometry.block_len, geometry.stride, geometry.select_len, q.dtype,
                              q.device)
    return probs.sum(dim=2) @ weights


def pick_rows(scores: torch.Tensor, positions: torch.Tensor, geometry: NSAGeometry) -> torch.Tensor:
    """:func:`pick_blocks` for query rows at per-sequence positions: ``scores [B, H, S, num_sel]``, ``positions``
    int64 ``[B, S]`` -> int32 ``[B, S, H, top_n]`` (sorted, -1 padded)."""
    B, H, S, num_sel = scores.shape
    flat = scores.permute(1, 0, 2, 3).reshape(H, B * S, num_sel)
    picked = pick_blocks(flat, positions.reshape(-1), geometry.select_len, geometry.top_n, geometry.init_blocks,
                         geometry.local_blocks)
    return picked.view(H, B, S, geometry.top_n).permute(1, 2, 0, 3)


def own_logit_rows(q: torch.Tensor, positions: torch.Tensor, kv: DecodeKV, geometry: NSAGeometry, scoring: str,
                   scale: float) -> torch.Tensor:
    """Selection from the selected branch's own logits (``"key_bound"`` or ``"max_logit"``), sequence by sequence
    with training's own functions (:func:`~nsa_dist.key_bound_selection.pick_by_key_bounds` over the cached tile
    bounds; :func:`~nsa_kernels.reference.block_max_logits` over the cached selection keys, then
    :func:`~nsa_kernels.reference.selection.pick_by_block_logits`). ``q [B, S, HQ, Dk]`` rotated, ``positions``
    int64 ``[B, S]`` consecutive per sequence -> int32 ``[B, S, H, top_n]``."""
    pick = dict(select_len=geometry.select_len, top_n=geometry.top_n, init_blocks=geometry.init_blocks,
                local_blocks=geometry.local_blocks)
    rows = []
    for b in range(q.shape[0]):
        if scoring == "key_bound":
            rows.append(pick_by_key_bounds(q[b:b + 1], positions[b], kv.tile_min[b:b + 1].to(q.dtype),
                                           kv.tile_max[b:b + 1].to(q.dtype), tile_len=geometry.stride, scale=scale,
                                           **pick))
        else:
            logits = block_max_logits(q[b:b + 1], kv.k_slc[b:b + 1].to(q.dtype), geometry.select_len, scale,
                                      int(positions[b, 0]))
            rows.append(pick_by_block_logits(logits, positions[b], **pick))
    return torch.cat(rows)
