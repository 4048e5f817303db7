"""Block selection from the selected branch's own logits (``selection_scoring`` other than ``"compressed"``):
the choice between key bounds (:mod:`nsa_dist.key_bound_selection`) and exact block maxima
(:mod:`nsa_dist.max_logit_selection`) on one rank."""
from __future__ import annotations

from typing import Optional

import torch

from .config import NSAConfig
from .key_bound_selection import key_bound_select_blocks
from .max_logit_selection import max_logit_select_blocks


def own_logit_selection(c: NSAConfig, q: torch.Tensor, k_s: torch.Tensor,
                        cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """int32 ``[B, T, H, top_n]`` blocks chosen from the selected branch's own logits (rotated ``q [B, T, HQ, Dk]``
    against the rotated selection keys ``k_s [B, T, H, Dk]``), as ``c.selection_scoring`` says: by key bounds
    over tiles of ``stride`` keys (``"key_bound"``) or by each block's exact maximum logit (``"max_logit"``)."""
    pick = dict(select_len=c.select_len, top_n=c.top_n, init_blocks=c.init_blocks, local_blocks=c.local_blocks,
                scale=c.softmax_scale, cu_seqlens=cu_seqlens)
    if c.selection_scoring == "key_bound":
        return key_bound_select_blocks(q, k_s, tile_len=c.stride, **pick)
    return max_logit_select_blocks(q, k_s, **pick)
