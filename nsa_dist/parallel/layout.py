"""How a sequence of ``T`` tokens is split over the ``P`` ranks of a context-parallel group.

``"zigzag"`` (Megatron-core's ``get_batch_on_this_cp_rank``): the sequence is cut into ``2P`` equal chunks
and rank ``r`` holds chunks ``r`` and ``2P - 1 - r``, concatenated in that order, which balances causal
attention work. ``"contiguous"``: ``P`` equal chunks, rank ``r`` holds chunk ``r``. Every chunk length must
be a multiple of the NSA selection block length ``l'``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from nsa_kernels.validation import check_positive_int

LAYOUTS = ("zigzag", "contiguous")


def check_layout_kind(kind: str, name: str = "kind") -> None:
    """``kind`` must be one of :data:`LAYOUTS` (ValueError naming the argument ``name`` and value otherwise)."""
    if kind not in LAYOUTS:
        raise ValueError(f"{name}={kind!r} is not a context-parallel layout; expected one of {LAYOUTS}")


@dataclass(frozen=True)
class CPLayout:
    """Which global token positions of a length-``seq_len`` sequence each of ``world_size`` ranks holds.

    Attributes:
        world_size: ranks ``P`` of the context-parallel group.
        seq_len: global sequence length ``T``; must split into ``num_chunks`` chunks whose length is a
            multiple of ``select_len``.
        kind: ``"zigzag"`` (``2P`` chunks) or ``"contiguous"`` (``P`` chunks).
        select_len: the selection block length ``l'`` every chunk length must be a multiple of.
    """

    world_size: int
    seq_len: int
    kind: str = "zigzag"
    select_len: int = 1

    def __post_init__(self):
        check_positive_int("world_size", self.world_size)
        check_positive_int("seq_len", self.seq_len)
        check_positive_int("select_len", self.select_len)
        check_layout_kind(self.kind)
        P, T, n = self.world_size, self.seq_len, self.num_chunks
        if T % n:
            split = (f"2P={n} chunks (zigzag layout, P={P})" if self.kind == "zigzag"
                     else f"P={n} chunks (contiguous layout)")
            raise ValueError(f"sequence length T={T} is not divisible into {split}")
        self.check_select_len(self.select_len)

    def check_select_len(self, select_len: int) -> None:
        """The chunk length must be a multiple of the selection block length ``select_len`` (ValueError naming
        the chunk length, T, the layout and l' otherwise)."""
        if self.chunk_len % select_len:
            raise ValueError(f"chunk length {self.chunk_len} (T={self.seq_len} in {self.num_chunks} chunks, "
                             f"{self.kind} layout over P={self.world_size}) is not a multiple of the selection "
                             f"block length l'={select_len}")

    @property
    def num_chunks(self) -> int:
        """``2P`` (zigzag) or ``P`` (contiguous)."""
        return 2 * self.world_size if self.kind == "zigzag" else self.world_size

    @property
    def chunk_len(self) -> int:
        """Tokens per chunk, ``T / num_chunks``."""
        return self.seq_len // self.num_chunks

    @property
    def local_len(self) -> int:
        """Tokens per rank, ``T / P``."""
        return self.seq_len // self.world_size

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} is not in [0, world_size={self.world_size})")

    def chunks(self, rank: int) -> Tuple[int, ...]:
        """Chunk numbers held by ``rank``, in local order: ``(r, 2P - 1 - r)`` (zigzag) or ``(r,)``."""
        self._check_rank(rank)
        return (rank, self.num_chunks - 1 - rank) if self.kind == "zigzag" else (rank,)

    def ranges(self, rank: int) -> List[Tuple[int, int]]:
        """Global token ranges ``[(start, end), ...]`` of ``rank``'s chunks, in local order."""
        c = self.chunk_len
        return [(k * c, (k + 1) * c) for k in self.chunks(rank)]

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[T / P]``: global position of each of ``rank``'s local tokens."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.ranges(rank)])

    def owner(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rank, row)`` int64 tensors shaped like ``positions``: which rank holds each global position and
        at which local row."""
        chunk_rank = torch.empty(self.num_chunks, dtype=torch.long)
        chunk_slot = torch.empty(self.num_chunks, dtype=torch.long)
        for r in range(self.world_size):
            for slot, k in enumerate(self.chunks(r)):
                chunk_rank[k], chunk_slot[k] = r, slot
        positions = positions.long()
        chunk = torch.div(positions, self.chunk_len, rounding_mode="floor")
        chunk_rank, chunk_slot = chunk_rank.to(positions.device), chunk_slot.to(positions.device)
        return chunk_rank[chunk], chunk_slot[chunk] * self.chunk_len + positions - chunk * self.chunk_len

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
        pieces = [None] * self.num_chunks
        for r, part in enumerate(shards):
            for slot, k in enumerate(self.chunks(r)):
                pieces[k] = part.narrow(dim, slot * self.chunk_len, self.chunk_len)
        return torch.cat(pieces, dim=dim)
