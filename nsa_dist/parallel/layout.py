"""How a sequence of ``T`` tokens is split over the ``P`` ranks of a context-parallel group (:class:`CPLayout`).

Every layout cuts each *unit* of the sequence into equal chunks and gives rank ``r`` some of them, concatenated in
local order (:data:`LAYOUTS`):

* ``"zigzag"``: the unit is the whole sequence, cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and
  ``2P - 1 - r``, which balances causal attention work. This is megatron-core's ``get_batch_on_this_cp_rank`` for
  unpacked (``sbhd``/``bshd``) batches.
* ``"contiguous"``: the whole sequence in ``P`` chunks; rank ``r`` holds chunk ``r``.
* ``"per_document"``: the units are the packed documents (``cu_seqlens``): each document is cut into ``2P`` chunks
  and rank ``r`` holds chunks ``r`` and ``2P - 1 - r`` of every document, document after document. This is
  megatron-core's split of packed ``thd`` batches under context parallelism (``get_thd_batch_on_this_cp_rank``,
  i.e. Transformer Engine's ``thd_get_partitioned_indices``): every document length must be divisible by ``2P``
  (megatron pads each document to that), and the local part of document ``n`` starts at local row
  ``cu_seqlens[n] / P``. The layout needs the documents: a ``per_document`` layout built without them
  (``doc_bounds=None``, as the NSA layers build it from ``cp_layout``) takes them from the call's ``cu_seqlens``
  (:meth:`CPLayout.with_documents`, done by :class:`~nsa_dist.parallel.sharding.ShardedSequence`).

Chunk lengths of the zigzag and contiguous layouts must be multiples of the NSA selection block length ``l'``. The
per-document chunks are not held to that: their boundaries follow the documents, whose selection blocks are
numbered from each document's start, and the context-parallel exchanges fetch any key row from whichever rank
holds it, as they do for packed documents in the other layouts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from nsa_kernels.validation import check_positive_int

LAYOUTS = ("zigzag", "contiguous", "per_document")
SHOWN_DOCUMENTS = 3  # documents named in the error about lengths not divisible by 2P


def check_layout_kind(kind: str, name: str = "kind") -> None:
    """``kind`` must be one of :data:`LAYOUTS` (ValueError naming the argument ``name`` and value otherwise)."""
    if kind not in LAYOUTS:
        raise ValueError(f"{name}={kind!r} is not a context-parallel layout; expected one of {LAYOUTS}")


@dataclass(frozen=True)
class CPLayout:
    """Which global token positions of a length-``seq_len`` sequence each of ``world_size`` ranks holds.

    Attributes:
        world_size: ranks ``P`` of the context-parallel group.
        seq_len: global sequence length ``T``; must split into ``num_chunks`` chunks (zigzag, contiguous: whose
            length is a multiple of ``select_len``; per_document: ``T`` divisible by ``2P``).
        kind: ``"zigzag"`` (``2P`` chunks), ``"contiguous"`` (``P`` chunks) or ``"per_document"`` (``2P`` chunks of
            every document).
        select_len: the selection block length ``l'`` every zigzag or contiguous chunk length must be a multiple of.
        doc_bounds: ``per_document`` only: the global document offsets (``cu_seqlens`` as ints, ``0 .. T``), each
            document length divisible by ``2P``; None until :meth:`with_documents` binds them.
    """

    world_size: int
    seq_len: int
    kind: str = "zigzag"
    select_len: int = 1
    doc_bounds: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        check_positive_int("world_size", self.world_size)
        check_positive_int("seq_len", self.seq_len)
        check_positive_int("select_len", self.select_len)
        check_layout_kind(self.kind)
        P, T, n = self.world_size, self.seq_len, self.num_chunks
        if T % n:
            split = {"zigzag": f"2P={n} chunks (zigzag layout, P={P})",
                     "contiguous": f"P={n} chunks (contiguous layout)",
                     "per_document": f"2P={n} chunks of every document (per_document layout, P={P})"}[self.kind]
            raise ValueError(f"sequence length T={T} is not divisible into {split}")
        if self.doc_bounds is not None:
            if self.kind != "per_document":
                raise ValueError(f"doc_bounds given for kind={self.kind!r}: only the 'per_document' layout splits "
                                 "documents")
            object.__setattr__(self, "doc_bounds", tuple(int(b) for b in self.doc_bounds))
            self._check_documents()
        self.check_select_len(self.select_len)

    def _check_documents(self) -> None:
        bounds, T, n = self.doc_bounds, self.seq_len, self.num_chunks
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b > e for b, e in zip(bounds, bounds[1:])):
            raise ValueError(f"document offsets (cu_seqlens) {show_offsets(bounds)} must start at 0, never decrease "
                             f"and end at T={T}")
        bad = [(i, e - b) for i, (b, e) in enumerate(zip(bounds, bounds[1:])) if (e - b) % n]
        if bad:
            shown = ", ".join(f"document {i} of length {length}" for i, length in bad[:SHOWN_DOCUMENTS])
            more = f" and {len(bad) - SHOWN_DOCUMENTS} more" if len(bad) > SHOWN_DOCUMENTS else ""
            raise ValueError(f"cp_layout='per_document' cuts every document into 2*CP = 2P={n} chunks (P="
                             f"{self.world_size}), so every document length must be divisible by {n}; not so: "
                             f"{shown}{more} (cu_seqlens {show_offsets(bounds)}); pad each document to a multiple of "
                             f"{n}, as megatron-core's packed-sequence data does under context parallelism")

    def check_select_len(self, select_len: int) -> None:
        """A zigzag or contiguous chunk length must be a multiple of the selection block length ``select_len``
        (ValueError naming the chunk length, T, the layout and l' otherwise); per-document chunks need not be."""
        if self.kind != "per_document" and self.chunk_len % select_len:
            raise ValueError(f"chunk length {self.chunk_len} (T={self.seq_len} in {self.num_chunks} chunks, "
                             f"{self.kind} layout over P={self.world_size}) is not a multiple of the selection "
                             f"block length l'={select_len}")

    def with_documents(self, cu_seqlens) -> "CPLayout":
        """This layout for a sequence packed as ``cu_seqlens`` (global int offsets ``[N + 1]`` as a tensor or a
        sequence, or None without packing). A ``per_document`` layout returns itself with those documents bound
        (ValueError without them, or when other documents are bound already); the other kinds return themselves."""
        if self.kind != "per_document":
            return self
        if cu_seqlens is None:
            raise ValueError(self._needs_documents())
        bounds = tuple(int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens))
        if self.doc_bounds is not None and bounds != self.doc_bounds:
            raise ValueError(f"the per_document layout is bound to cu_seqlens {show_offsets(self.doc_bounds)} but the "
                             f"sequence has cu_seqlens {show_offsets(bounds)}")
        return replace(self, doc_bounds=bounds)

    def _needs_documents(self) -> str:
        return (f"cp_layout='per_document' cuts every packed document into 2*CP = {self.num_chunks} chunks "
                "(megatron-core's split of thd batches), so it needs the global document offsets cu_seqlens; none "
                "were given. Unpacked batches are split by cp_layout='zigzag' (megatron-core's split of them)")

    @property
    def num_chunks(self) -> int:
        """Chunks per unit: ``2P`` (zigzag; per_document: of every document) or ``P`` (contiguous)."""
        return self.world_size if self.kind == "contiguous" else 2 * self.world_size

    @property
    def chunk_len(self) -> int:
        """Tokens per chunk, ``T / num_chunks`` (zigzag, contiguous). A per_document layout has no single chunk
        length (document ``n``'s chunks are ``L_n / 2P`` long): ValueError."""
        if self.kind == "per_document":
            raise ValueError("a per_document layout has no single chunk length: document n's chunks are "
                             "L_n / 2P tokens long (see ranges)")
        return self.seq_len // self.num_chunks

    @property
    def local_len(self) -> int:
        """Tokens per rank, ``T / P``."""
        return self.seq_len // self.world_size

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} is not in [0, world_size={self.world_size})")

    def _unit_bounds(self) -> Tuple[int, ...]:
        """Offsets of the units cut into chunks: the documents (per_document) or ``(0, T)``."""
        if self.kind != "per_document":
            return (0, self.seq_len)
        if self.doc_bounds is None:
            raise ValueError(self._needs_documents())
        return self.doc_bounds

    def chunks(self, rank: int) -> Tuple[int, ...]:
        """Chunk numbers (of each unit) held by ``rank``, in local order: ``(r, 2P - 1 - r)`` (zigzag,
        per_document) or ``(r,)`` (contiguous)."""
        self._check_rank(rank)
        return (rank,) if self.kind == "contiguous" else (rank, self.num_chunks - 1 - rank)

    def ranges(self, rank: int) -> List[Tuple[int, int]]:
        """Global token ranges ``[(start, end), ...]`` of ``rank``'s chunks, in local order (per_document: unit
        after unit, empty documents left out)."""
        chunks, bounds, out = self.chunks(rank), self._unit_bounds(), []
        for start, end in zip(bounds, bounds[1:]):
            c = (end - start) // self.num_chunks
            out += [(start + k * c, start + (k + 1) * c) for k in chunks if c]
        return out

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[T / P]``: global position of each of ``rank``'s local tokens."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.ranges(rank)])

    def owner(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rank, row)`` int64 tensors shaped like ``positions``: which rank holds each global position and
        at which local row (the unit starting at ``s`` begins at local row ``s / P`` on every rank)."""
        n, P = self.num_chunks, self.world_size
        chunk_rank = torch.empty(n, dtype=torch.long)
        chunk_slot = torch.empty(n, dtype=torch.long)
        for r in range(P):
            for slot, k in enumerate(self.chunks(r)):
                chunk_rank[k], chunk_slot[k] = r, slot
        positions = positions.long()
        device = positions.device
        bounds = torch.tensor(self._unit_bounds(), dtype=torch.long, device=device)
        unit = torch.searchsorted(bounds, positions, right=True) - 1  # the last unit starting at or before
        start = bounds[unit]
        c = (bounds[unit + 1] - start) // n
        k = torch.div(positions - start, c, rounding_mode="floor")
        chunk_rank, chunk_slot = chunk_rank.to(device), chunk_slot.to(device)
        return chunk_rank[k], start // P + chunk_slot[k] * c + positions - start - k * c

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """``rank``'s part of ``x`` (``seq_len`` along ``dim``, e.g. ``[B, T, ...]``): its chunks concatenated
        along ``dim`` in local order, ``T / P`` long."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"tensor of shape {tuple(x.shape)} has length {x.shape[dim]} on dim {dim}, "
                             f"the layout expects T={self.seq_len}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.ranges(rank)], dim=dim)

    def unshard(self, shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: the full sequence from the ``P`` ranks' parts (``shards[r]`` of rank r)."""
        if len(shards) != self.world_size:
            raise ValueError(f"got {len(shards)} shards for world_size={self.world_size}")
        for r, part in enumerate(shards):
            if part.shape[dim] != self.local_len:
                raise ValueError(f"shard {r} has length {part.shape[dim]} on dim {dim}, expected T/P={self.local_len}")
        local = torch.cat(list(shards), dim=dim)
        order = torch.argsort(torch.cat([self.positions(r) for r in range(self.world_size)]))
        return local.index_select(dim, order.to(local.device))


LONG_OFFSETS = 12  # cu_seqlens longer than this are shown by their first and last entries


def show_offsets(offsets: Sequence[int]) -> str:
    """cu_seqlens as error messages show them: ``none``, the list, or its first and last entries."""
    offsets = list(offsets)
    if not offsets:
        return "none"
    if len(offsets) <= LONG_OFFSETS:
        return str(offsets)
    return (f"[{', '.join(map(str, offsets[:6]))}, ..., {', '.join(map(str, offsets[-3:]))}] "
            f"({len(offsets)} entries)")
