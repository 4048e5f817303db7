"""Reference per-block maximum logit: for each query head, the largest ``scale * q . k`` over each selection
block's causal keys (the exact value that key-bound selection bounds from above)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..validation import check_block_max_inputs
from .tiles import QUERY_TILE, compute_dtype, default_scale


@torch.no_grad()
def block_max_logits(q: torch.Tensor, k: torch.Tensor, select_len: int, scale: Optional[float] = None,
                     first_pos: int = 0) -> torch.Tensor:
    """Per query head and selection block, the maximum scaled logit over the block's keys the query sees.

    Args:
        q: ``[B, tq, HQ, Dk]`` queries at positions ``first_pos .. first_pos + tq - 1`` of one key sequence.
        k: ``[B, L, H, Dk]`` its keys at positions ``0 .. L - 1`` (``L >= first_pos + tq``; ``HQ = G * H``,
            query head ``hq`` reads KV head ``hq // G``), rotated like q.
        select_len: selection block ``l'``: block ``j`` holds keys ``[j * l', (j + 1) * l')``.
        scale: logit scale, default ``1 / sqrt(Dk)``.
        first_pos: position of the first query.
    Returns:
        float32 ``[B, H, G, tq, ceil(L / l')]``: entry ``(b, h, g, t, j)`` is ``max scale * q[b, t, h*G+g] .
        k[b, s, h]`` over the keys ``s`` of block ``j`` with ``s <= first_pos + t``; ``-inf`` where the block
        holds no such key. Not differentiable.
    """
    dims = check_block_max_inputs(q, k, select_len, first_pos)
    scale = default_scale(scale, dims.Dk)
    ct = compute_dtype(q.dtype)
    L = k.shape[1]
    num_sel = -(-L // select_len)
    keys = k.to(ct)
    key_pos = torch.arange(L, device=q.device)
    out = torch.empty(dims.B, dims.H, dims.G, dims.T, num_sel, dtype=torch.float32, device=q.device)
    for t0 in range(0, dims.T, QUERY_TILE):
        t1 = min(t0 + QUERY_TILE, dims.T)
        qg = q[:, t0:t1].to(ct).reshape(dims.B, t1 - t0, dims.H, dims.G, dims.Dk)
        logits = torch.einsum("bqhgd,bshd->bhgqs", qg, keys) * scale
        future = key_pos[None, :] > first_pos + torch.arange(t0, t1, device=q.device)[:, None]   # [tq, L]
        logits = F.pad(logits.masked_fill(future, float("-inf")), (0, num_sel * select_len - L), value=float("-inf"))
        out[:, :, :, t0:t1] = logits.view(*logits.shape[:-1], num_sel, select_len).amax(-1).float()
    return out
