"""``DecodeKV``: what the queries of one decode step read from an NSA layer's cache."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class DecodeKV(NamedTuple):
    """The keys and values the queries of one decode step of one NSA layer read, laid out as the cache holds them
    (every sequence padded to the cache's capacity; rows a query may not see are masked by position).

    Fields:
        k_cmp, v_cmp: ``[B, Nc, H, Dk]`` / ``[B, Nc, H, Dv]`` compressed K/V; row ``i`` is compressed block ``i``
            (tokens ``[i*d, i*d + l)``), its key rotated at the block's last token ``i*d + l - 1``.
        k_slc, v_slc: ``[B, N, H, Dk]`` / ``[B, N, H, Dv]`` selection K/V, row = position, keys rotated.
        k_win, v_win: ``[B, Nw, H, Dk]`` / ``[B, Nw, H, Dv]`` window K/V (keys rotated) at the positions
            ``win_positions`` (int64 ``[B, Nw]``, -1 for an empty row, any order); None without a window branch.
        tile_min, tile_max: ``[B, Nt, H, Dk]`` per-coordinate minimum and maximum of the rotated selection keys of
            tile ``n`` (positions ``[n*d, (n+1)*d)``), for ``selection_scoring="key_bound"``; else None.
    """
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_win: Optional[torch.Tensor]
    v_win: Optional[torch.Tensor]
    win_positions: Optional[torch.Tensor]
    tile_min: Optional[torch.Tensor]
    tile_max: Optional[torch.Tensor]
