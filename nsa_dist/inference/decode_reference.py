"""Torch reference of one NSA decode step: new queries (one per sequence, or a few consecutive ones for
speculative steps) against an NSA layer's cache, exactly the function the training forward computes at those
positions (DESIGN.md, "NSA semantics"): compressed attention, block scoring and top-n with the forced blocks,
selected attention over the chosen blocks, sliding-window attention, gates. Plain PyTorch over the cache's own
layout (:class:`~nsa_dist.inference.decode_kv.DecodeKV`), independent of the modules: the reference for decode
kernels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nsa_kernels import NSAGeometry
from nsa_kernels.reference import gate_combine
from nsa_kernels.reference.tiles import compute_dtype, default_scale, masked_gqa_attention

from .decode_kv import DecodeKV
from .decode_selection import compressed_block_scores, own_logit_rows, pick_rows

SCORINGS = ("compressed", "key_bound", "max_logit")


def per_head(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """bool ``[B, S, N]`` (the same for every KV head) -> ``[B, heads, S, N]`` (a view), as
    :func:`~nsa_kernels.reference.tiles.masked_gqa_attention` takes it."""
    return mask[:, None].expand(mask.shape[0], heads, *mask.shape[1:])


def compressed_decode(q: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                      geometry: NSAGeometry, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compressed branch: query at position ``t`` attends block ``i`` iff ``i*d + l - 1 <= t``. ``q [B, S, HQ, Dk]``,
    ``positions`` int64 ``[B, S]`` -> ``o [B, S, HQ, Dv]`` and ``lse [B, S, HQ]`` (``o = 0``, ``lse = -inf`` for a
    query that sees no block)."""
    block_end = torch.arange(k_cmp.shape[1], device=q.device) * geometry.stride + geometry.block_len - 1
    visible = block_end <= positions[..., None]
    return masked_gqa_attention(q, k_cmp, v_cmp, per_head(visible, k_cmp.shape[2]), scale)


def selected_key_mask(block_idx: torch.Tensor, positions: torch.Tensor, num_keys: int,
                      select_len: int) -> torch.Tensor:
    """bool ``[B, H, S, num_keys]``: key ``s`` is visible to the query row ``(b, q)`` and KV head ``h`` iff
    ``s <= positions[b, q]`` and block ``s // select_len`` is among ``block_idx[b, q, h]`` (int ``[B, S, H, n]``,
    -1 = empty slot)."""
    key_pos = torch.arange(num_keys, device=positions.device)
    chosen = (block_idx[..., None] == (key_pos // select_len)).any(dim=-2)         # [B, S, H, num_keys]
    causal = key_pos <= positions[..., None]                                         # [B, S, num_keys]
    return (chosen & causal[:, :, None]).permute(0, 2, 1, 3)


def window_key_mask(positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """bool ``[B, S, Nw]``: the key at ``key_positions[b, k]`` (-1 = empty) is one of the query row's keys
    ``t - window + 1 ... t`` with ``t = positions[b, q]``."""
    kp, qp = key_positions[:, None, :], positions[..., None]
    return (kp >= 0) & (kp <= qp) & (kp > qp - window)


def decode_block_indices(q: torch.Tensor, positions: torch.Tensor, kv: DecodeKV, lse: torch.Tensor,
                         geometry: NSAGeometry, scoring: str, scale: float) -> torch.Tensor:
    """int32 ``[B, S, H, top_n]`` selection blocks of each query row (sorted, -1 padded), scored as ``scoring``
    says (``"compressed"``: the paper's compressed-attention probabilities, from ``lse`` of the compressed branch;
    ``"key_bound"`` / ``"max_logit"``: the selected branch's own logits)."""
    if scoring not in SCORINGS:
        raise ValueError(f"selection_scoring={scoring!r} is not one of {SCORINGS}")
    if scoring != "compressed":
        return own_logit_rows(q, positions, kv, geometry, scoring, scale)
    num_sel = -(-kv.k_slc.shape[1] // geometry.select_len)
    scores = compressed_block_scores(q, positions, kv.k_cmp.to(q.dtype), lse, geometry, scale, num_sel)
    return pick_rows(scores, positions, geometry)


def nsa_decode_reference(q: torch.Tensor, positions: torch.Tensor, kv: DecodeKV, gates: torch.Tensor,
                         geometry: NSAGeometry, scoring: str = "compressed",
                         scale: Optional[float] = None) -> torch.Tensor:
    """Gated NSA output of decode queries against an NSA cache.

    Args:
        q: ``[B, S, HQ, Dk]`` queries rotated at their positions; ``HQ = G * H``, query head ``hq`` reads KV head
            ``hq // G``.
        positions: int64 ``[B, S]`` position of each query in its sequence, consecutive per sequence (the cache
            already holds every key up to each query, its own included).
        kv: the cache's tensors (:class:`DecodeKV`); rows a query may not see are masked by position.
        gates: ``[B, S, HQ, 3]`` gate values after the sigmoid (disabled branches already zeroed), order
            compressed, selected, window.
        geometry: block_len ``l``, stride ``d``, select_len ``l'``, top_n, window ``w`` (0: no window branch),
            init_blocks, local_blocks.
        scoring: ``selection_scoring`` of :class:`~nsa_dist.NSAConfig`: ``"compressed"``, ``"key_bound"`` (tiles of
            ``d`` keys, ``kv.tile_min`` / ``kv.tile_max``) or ``"max_logit"``.
        scale: softmax scale, default ``1 / sqrt(Dk)``.
    Returns:
        ``o [B, S, HQ, Dv]`` in q's dtype (computed in fp32 for half inputs): the training forward's output rows at
        these positions (before the output projection).
    """
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    scale = default_scale(scale, q.shape[-1])
    q = q.to(ct)
    H = kv.k_slc.shape[2]
    o_cmp, lse = compressed_decode(q, positions, kv.k_cmp.to(ct), kv.v_cmp.to(ct), geometry, scale)
    block_idx = decode_block_indices(q, positions, kv, lse, geometry, scoring, scale)
    slc_mask = selected_key_mask(block_idx, positions, kv.k_slc.shape[1], geometry.select_len)
    o_slc = masked_gqa_attention(q, kv.k_slc.to(ct), kv.v_slc.to(ct), slc_mask, scale)[0]
    o_win = None
    if geometry.window:
        win_mask = per_head(window_key_mask(positions, kv.win_positions, geometry.window), H)
        o_win = masked_gqa_attention(q, kv.k_win.to(ct), kv.v_win.to(ct), win_mask, scale)[0].to(dtype)
    return gate_combine(gates, o_cmp.to(dtype), o_slc.to(dtype), o_win)
