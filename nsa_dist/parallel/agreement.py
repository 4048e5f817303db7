"""Agreement of the ranks of a context-parallel call on the sequence they split, checked before any exchange.

Every rank of a call builds its own :class:`~nsa_dist.parallel.ShardedSequence`; ranks given different batches,
lengths or documents would issue collectives of different sizes (gloo aborts with "collective mismatch", NCCL may
hang). :func:`check_same_sequence` compares what the ranks were given with one fixed-size all-gather
(:func:`~nsa_dist.parallel.comm.all_gather_ints`, which cannot mismatch itself) and raises the same ValueError
on every rank.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterable, List, Sequence

import torch

from .comm import all_gather_ints, all_gather_rows
from .layout import LAYOUTS

if TYPE_CHECKING:
    from .segments import ShardedSequence

# the quantities every rank reports, in order (then the number and a digest of its cu_seqlens)
QUANTITIES = ("layout ranks P", "layout", "sequence length T", "batch B", "local rows B*T/P",
              "rows of the local q (dim 1)")
LONG_OFFSETS = 12  # cu_seqlens longer than this are shown by their first and last entries


def _digest(offsets: Sequence[int]) -> int:
    """A 56-bit digest of document offsets (an int64 entry of the all-gather)."""
    return int.from_bytes(hashlib.blake2b(repr(list(offsets)).encode(), digest_size=7).digest(), "little")


def _per_rank(values: Iterable) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def _show_offsets(offsets: List[int]) -> str:
    """cu_seqlens as the message shows them: ``none``, the list, or its first and last entries."""
    if not offsets:
        return "none"
    if len(offsets) <= LONG_OFFSETS:
        return str(offsets)
    return (f"[{', '.join(map(str, offsets[:6]))}, ..., {', '.join(map(str, offsets[-3:]))}] "
            f"({len(offsets)} entries)")


def check_same_sequence(shards: ShardedSequence, q: torch.Tensor, group, what: str) -> None:
    """ValueError on every rank of ``group`` unless all of them were called with the same sequence: the layout
    (``P``, kind, ``T``), the batch ``B``, the same cu_seqlens (or none) and local queries ``q [1, B*T/P, ...]``
    with as many rows. The message names ``what`` (e.g. "context-parallel NSA"), each quantity that differs and
    its value on every rank. Every rank of the group must call it: one all-gather of :data:`SMALL_INTS
    <nsa_dist.parallel.comm.SMALL_INTS>` int64 on ``q``'s device, and a second one of the cu_seqlens when those
    differ (every rank decides that from the same gathered values)."""
    offsets = shards.doc_bounds if shards.packed else []
    layout = shards.layout
    mine = [layout.world_size, LAYOUTS.index(layout.kind), layout.seq_len, shards.batch, shards.local_len,
            q.shape[1] if q.dim() > 1 else -1, len(offsets), _digest(offsets)]
    columns = list(zip(*all_gather_ints(mine, group, q.device)))
    differ = [f"{name} ({_per_rank(LAYOUTS[v] if name == 'layout' else v for v in column)})"
              for name, column in zip(QUANTITIES, columns) if len(set(column)) > 1]
    if len(set(columns[-1])) > 1:
        counts = list(columns[-2])
        gathered = all_gather_rows(torch.tensor(offsets, dtype=torch.long, device=q.device), counts, group)
        differ.append(f"cu_seqlens ({_per_rank(_show_offsets(o.tolist()) for o in gathered.split(counts))})")
    if differ:
        raise ValueError(f"{what}: the {len(columns[0])} ranks of the context-parallel group were called with "
                         f"different sequences: {'; '.join(differ)}. Every rank must pass the same layout, batch B, "
                         "T and cu_seqlens, and its B*T/P local rows")
