"""Rows addressed by global packed token position: what a rank needs from others, and where it finds them."""
from __future__ import annotations

from typing import Tuple

import torch

from .segments import ShardedSequence


def remote_requests(shards: ShardedSequence, rank: int,
                    positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ``positions`` (int64, global packed) that other ranks hold, sorted, with their owners.

    Returns:
        ``(positions, owner_rank, owner_row)`` int64 ``[n]``.
    """
    unique = torch.unique(positions)
    owner_rank, owner_row = shards.owner(unique)
    remote = owner_rank != rank
    return unique[remote], owner_rank[remote], owner_row[remote]


class RowSource:
    """A tensor of rows and, for every global packed position, the row of it that holds that token.

    Args:
        data: ``[n, ...]`` rows.
        index: int64 ``[B * T]``: ``data`` row of each global position (-1 where ``data`` lacks it).
    """

    def __init__(self, data: torch.Tensor, index: torch.Tensor):
        self.data, self.index = data, index

    @classmethod
    def local_and_fetched(cls, shards: ShardedSequence, rank: int, local: torch.Tensor, fetched: torch.Tensor,
                          fetched_positions: torch.Tensor) -> "RowSource":
        """``rank``'s own rows ``local [B*T/P, ...]`` followed by ``fetched [m, ...]`` rows of other ranks
        (global positions ``fetched_positions [m]``)."""
        index = torch.full((shards.total_len,), -1, dtype=torch.long, device=local.device)
        index[shards.positions(rank, device=local.device)] = torch.arange(local.shape[0], device=local.device)
        index[fetched_positions] = local.shape[0] + torch.arange(fetched.shape[0], device=local.device)
        return cls(torch.cat([local, fetched]), index)

    @classmethod
    def gathered(cls, shards: ShardedSequence, data: torch.Tensor) -> "RowSource":
        """Every rank's local rows concatenated in rank order (``[B * T, ...]``, an all-gather's output)."""
        owner_rank, owner_row = shards.owner(torch.arange(shards.total_len, device=data.device))
        return cls(data, owner_rank * shards.local_len + owner_row)

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the global ``positions`` (int64 ``[k]``) -> ``[k, ...]``; differentiable w.r.t. ``data``."""
        rows = self.index[positions]
        if rows.numel() and bool((rows < 0).any()):
            missing = positions[rows < 0][:8].tolist()
            raise RuntimeError(f"rows for global positions {missing} were neither local nor fetched")
        return self.data.index_select(0, rows)
