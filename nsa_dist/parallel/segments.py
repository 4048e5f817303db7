"""Packed documents on a context-parallel rank: the local segments (local chunk x document).

A batch is ``B`` rows of ``T`` tokens each (documents = rows) or ``B = 1`` with packed documents given by the
global ``cu_seqlens``. Either way it is one packed sequence of ``B * T`` tokens; each row is split by the
:class:`CPLayout` and a rank's local tensor ``[B, T / P, ...]`` flattens to ``B * T / P`` local rows. The
local rows fall into *segments*: one local chunk intersected with one document, so a segment covers the
document-local positions ``[p0, p1)`` and is contiguous both locally and globally.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from nsa_kernels.validation import check_cu_seqlens, check_positive_int

from .agreement import check_same_sequence
from .layout import CPLayout


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
        layout: the :class:`CPLayout` of one row of ``T = layout.seq_len`` tokens.
        cu_seqlens: optional global int32 ``[N + 1]`` document offsets (``B = 1``, ending at ``T``): the same
            value a single-rank call gets. Without it each of the ``batch`` rows is one document.
        batch: rows ``B`` of the batch (1 with ``cu_seqlens``).

    Attributes:
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
        self.layout, self.batch, self.packed = layout, batch, cu_seqlens is not None
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
        with the same sequence and local queries ``q`` of as many rows (:func:`.agreement.check_same_sequence`,
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
