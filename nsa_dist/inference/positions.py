"""Per-sequence positions of a batched cache: where each sequence's new tokens go, what a ring buffer holds, and
row writes at per-sequence offsets."""
from __future__ import annotations

import torch


def step_positions(lengths: torch.Tensor, num_new: int) -> torch.Tensor:
    """int64 ``[B, S]``: the positions ``lengths[b] + s`` of ``S = num_new`` tokens appended to sequences that hold
    ``lengths [B]`` tokens."""
    return lengths[:, None] + torch.arange(num_new, device=lengths.device)


def valid_rows(lengths: torch.Tensor, num_rows: int) -> torch.Tensor:
    """bool ``[B, num_rows]``: row ``r`` of sequence ``b`` is one of its ``lengths[b]`` tokens."""
    return torch.arange(num_rows, device=lengths.device)[None, :] < lengths[:, None]


def ring_positions(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """int64 ``[B, size]``: the position held by each slot of a ring buffer of ``size`` slots into which the first
    ``lengths[b]`` tokens were written at slot ``position % size``: the newest ``p < lengths[b]`` with
    ``p % size == slot``, or -1 where no token was written yet."""
    slot = torch.arange(size, device=lengths.device)[None, :]
    last = lengths[:, None] - 1
    pos = last - torch.remainder(last - slot, size)
    return torch.where(pos >= 0, pos, torch.full_like(pos, -1))


def write_rows(buffer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``buffer[b, rows[b, s]] = values[b, s]`` in place for ``buffer [B, N, ...]``, int64 ``rows [B, S]`` (distinct
    per sequence) and ``values [B, S, ...]`` (cast to the buffer's dtype)."""
    batch = torch.arange(buffer.shape[0], device=buffer.device)[:, None].expand_as(rows)
    buffer[batch, rows] = values.to(buffer.dtype)


def gather_rows(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[b, s] = buffer[b, rows[b, s]]`` for ``buffer [B, N, ...]`` and int64 ``rows [B, S]`` (in range)."""
    batch = torch.arange(buffer.shape[0], device=buffer.device)[:, None].expand_as(rows)
    return buffer[batch, rows]


def check_room(lengths: torch.Tensor, num_new: int, capacity: int) -> None:
    """ValueError unless sequences of ``lengths [B]`` tokens can take ``num_new`` more within ``capacity``."""
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest + num_new > capacity:
        raise ValueError(f"the cache holds at most capacity={capacity} tokens per sequence; a sequence of {longest} "
                         f"tokens cannot take {num_new} more (build the cache with a larger capacity / max_length)")
