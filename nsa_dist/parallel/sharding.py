"""How a batch is sharded over the ranks of a context-parallel group, and where each rank finds any token.

**Layout** (:class:`~.layout.CPLayout`, in :mod:`.layout`): how a sequence of ``T`` tokens is split over the ``P``
ranks: ``"zigzag"`` (megatron-core's split of unpacked batches), ``"contiguous"`` or ``"per_document"`` (every
packed document cut into ``2P`` chunks, megatron-core's split of packed ``thd`` batches; it takes its documents
from the ``cu_seqlens`` given here).

**Segments** (:class:`ShardedSequence`, :class:`Segment`): a batch is ``B`` rows of ``T`` tokens each (documents
= rows) or ``B = 1`` with packed documents given by the global ``cu_seqlens``. Either way it is one packed
sequence of ``B * T`` tokens; each row is split by the :class:`CPLayout` and a rank's local tensor
``[B, T / P, ...]`` flattens to ``B * T / P`` local rows. The local rows fall into *segments*: one local chunk
intersected with one document, so a segment covers the document-local positions ``[p0, p1)`` and is contiguous
both locally and globally.

**Agreement** (:func:`check_same_sequence`): every rank of a call builds its own :class:`ShardedSequence`; ranks
given different batches, lengths or documents would issue collectives of different sizes (gloo aborts with
"collective mismatch", NCCL may hang). The check compares what the ranks were given with one fixed-size
all-gather (:func:`~nsa_dist.parallel.comm.all_gather_ints`, which cannot mismatch itself) and raises the same
ValueError on every rank, before any exchange.

**Rows** (:func:`remote_requests`, :class:`RowSource`): rows addressed by global packed token position: what a
rank needs from others, and where it finds them.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from nsa_kernels.validation import check_cu_seqlens, check_positive_int

from .comm import all_gather_ints, all_gather_rows
from .layout import LAYOUTS, CPLayout, show_offsets


# the quantities every rank reports, in order (then the number and a digest of its cu_seqlens)
QUANTITIES = ("layout ranks P", "layout", "sequence length T", "batch B", "local rows B*T/P",
              "rows of the local q (dim 1)")


def _digest(offsets: Sequence[int]) -> int:
    """A 56-bit digest of document offsets (an int64 entry of the all-gather)."""
    return int.from_bytes(hashlib.blake2b(repr(list(offsets)).encode(), digest_size=7).digest(), "little")


def _per_rank(values: Iterable) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


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
        differ.append(f"cu_seqlens ({_per_rank(show_offsets(o.tolist()) for o in gathered.split(counts))})")
    if differ:
        raise ValueError(f"{what}: the {len(columns[0])} ranks of the context-parallel group were called with "
                         f"different sequences: {'; '.join(differ)}. Every rank must pass the same layout, batch B, "
                         "T and cu_seqlens, and its B*T/P local rows")


@dataclass(frozen=True)
class Segment:
    """Document ``doc`` (first token at global packed position ``doc_start``), its positions ``[p0, p1)``,
    held from local row ``row`` on."""
    doc: int
    doc_start: int
    p0: int
    p1: int
    row: int

    @property
    def length(self) -> int:
        """Tokens of the segment, ``p1 - p0``."""
        return self.p1 - self.p0


class ShardedSequence:
    """A batch's packed token sequence split over a context-parallel group.

    Args:
        layout: the :class:`CPLayout` of one row of ``T = layout.seq_len`` tokens. A ``"per_document"`` layout
            needs ``cu_seqlens`` (ValueError without them) and is bound to them (:meth:`CPLayout.with_documents`).
        cu_seqlens: optional global int32 ``[N + 1]`` document offsets (``B = 1``, ending at ``T``): the same
            value a single-rank call gets. Without it each of the ``batch`` rows is one document.
        batch: rows ``B`` of the batch (1 with ``cu_seqlens``).

    Attributes:
        layout: ``layout``, bound to the documents when it is ``"per_document"``.
        doc_bounds: the global document offsets (``cu_seqlens``, else ``[0, T, 2T, ..., B*T]``).
        packed: whether ``cu_seqlens`` gave the documents.
    """

    def __init__(self, layout: CPLayout, cu_seqlens: Optional[torch.Tensor] = None, batch: int = 1):
        check_positive_int("batch", batch)
        T = layout.seq_len
        if cu_seqlens is not None:
            if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 \
                    and int(cu_seqlens[-1]) != T:
                raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the context-parallel sequence has "
                                 f"T={T} tokens (T/P={layout.local_len} per rank on P={layout.world_size} ranks)")
            check_cu_seqlens(cu_seqlens, batch, T)
            self.doc_bounds = [int(b) for b in cu_seqlens.tolist()]
        else:
            self.doc_bounds = [b * T for b in range(batch + 1)]
        self.layout = layout.with_documents(self.doc_bounds if cu_seqlens is not None else None)
        self.batch, self.packed = batch, cu_seqlens is not None
        self._segments = {}

    @property
    def total_len(self) -> int:
        """Tokens of the packed global sequence, ``B * T``."""
        return self.batch * self.layout.seq_len

    @property
    def local_len(self) -> int:
        """Local rows per rank, ``B * T / P``."""
        return self.batch * self.layout.local_len

    @property
    def world_size(self) -> int:
        """Ranks ``P`` of the layout."""
        return self.layout.world_size

    def runs(self, rank: int) -> List[Tuple[int, int]]:
        """Global packed ranges ``[(start, end), ...]`` of ``rank``'s local rows, in local order."""
        T = self.layout.seq_len
        return [(b * T + s, b * T + e) for b in range(self.batch) for s, e in self.layout.ranges(rank)]

    def segments(self, rank: int) -> List[Segment]:
        """``rank``'s local segments in local row order (empty documents have none)."""
        if rank not in self._segments:
            out, row = [], 0
            bounds = self.doc_bounds
            for g0, g1 in self.runs(rank):
                n = bisect.bisect_right(bounds, g0) - 1  # document holding g0
                while g0 < g1:
                    while bounds[n + 1] <= g0:  # skip empty documents
                        n += 1
                    end = min(g1, bounds[n + 1])
                    out.append(Segment(n, bounds[n], g0 - bounds[n], end - bounds[n], row))
                    row += end - g0
                    g0 = end
            self._segments[rank] = out
        return self._segments[rank]

    def local_cu_seqlens(self, rank: int, device=None) -> torch.Tensor:
        """int32 ``[S + 1]``: offsets of ``rank``'s ``S`` segments in its flattened local rows."""
        lengths = [s.length for s in self.segments(rank)]
        return torch.tensor([0] + lengths, dtype=torch.long, device=device).cumsum(0).to(torch.int32)

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[B * T / P]``: global packed position of each local row of ``rank``."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.runs(rank)])

    def doc_positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[B * T / P]``: position of each local row of ``rank`` within its document."""
        return torch.cat([torch.arange(s.p0, s.p1, device=device) for s in self.segments(rank)])

    def rotary_positions(self, rank: int, position_ids: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
        """int64 ``[B * T / P]``: the rotary position of each local row of ``rank``: its position in its document,
        or its entry of the global ``position_ids`` (``[T]`` or ``[B, T]``) when given."""
        if position_ids is None:
            return self.doc_positions(rank, device=device)
        return self.flat_position_ids(position_ids, device)[self.positions(rank, device=device)]

    def flat_position_ids(self, position_ids: Optional[torch.Tensor], device=None) -> Optional[torch.Tensor]:
        """Global ``position_ids`` (``[T]`` or ``[B, T]``) as ``[B * T]`` in packed order (None stays None)."""
        if position_ids is None:
            return None
        return position_ids.to(device).expand(self.batch, self.layout.seq_len).reshape(-1)

    def rank_in(self, group, what: str, q: torch.Tensor) -> int:
        """This process's rank in ``group``, checked against the layout and the other ranks: torch.distributed
        initialised (else RuntimeError naming ``what``, e.g. "context-parallel NSA"), a member, every rank called
        with the same sequence and local queries ``q`` of as many rows (:func:`check_same_sequence`,
        one small all-gather on every rank), and ``P`` ranks (else ValueError)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{what} needs torch.distributed to be initialised (init_process_group)")
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of the context-parallel group")
        check_same_sequence(self, q, group, what)
        if P != self.world_size:
            raise ValueError(f"the context-parallel group has {P} ranks but the sequence layout splits T="
                             f"{self.layout.seq_len} over P={self.world_size} ranks")
        return rank

    def owner(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rank, row)`` int64 tensors shaped like ``positions`` (global packed): the rank holding each token
        and its flattened local row there."""
        T = self.layout.seq_len
        positions = positions.long()
        b = torch.div(positions, T, rounding_mode="floor")
        rank, row = self.layout.owner(positions - b * T)
        return rank, row + b * self.layout.local_len


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
