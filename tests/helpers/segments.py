"""Query segments and key segments as the context-parallel layer builds them (docs/DESIGN.md, context
parallelism), for tests.

A query segment is document positions ``[p0, p1)`` of one document of a packed sequence; its key segment is
a range of that document's rows (the prefix ``[0, p1)`` for the compressed branch and the selection, a halo
``[max(0, p0 - w + 1), p1)`` for the window) or the compact selection buffer (:func:`compact_key_segment`).
"""
from __future__ import annotations

import random
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch

from nsa_kernels.reference.tiles import QUERY_TILE


class Segment(NamedTuple):
    """Query segment: document ``doc`` (starting at global row ``start``), document positions ``[p0, p1)``."""
    doc: int
    start: int
    p0: int
    p1: int


class Case(NamedTuple):
    """A test case: a random packed sequence (documents ``lengths``, offsets ``cu``), its full-sequence inputs
    ``x`` and the query segments cut out of it (global rows ``q_rows``, offsets ``cu_q``); ``ctx`` names the
    case in failure messages."""
    geo: dict
    lengths: List[int]
    cu: torch.Tensor
    x: Dict[str, torch.Tensor]
    segments: List[Segment]
    q_rows: torch.Tensor
    cu_q: torch.Tensor
    ctx: str


def offsets(lengths: Sequence[int]) -> torch.Tensor:
    """int32 ``[N + 1]`` cumulative offsets of ``lengths``."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def unaligned(length: int, sizes: Tuple[int, ...]) -> int:
    """The smallest length >= ``length`` that is a multiple of none of ``sizes``."""
    while any(length % s == 0 for s in sizes):
        length += 1
    return length


def cut_segments(lengths: List[int], starts: List[int], rng: random.Random, middle: int = QUERY_TILE) -> List[Segment]:
    """Disjoint query segments of several documents, shuffled, plus one empty segment: the longest document
    (longer than ``middle + 84``) is cut into ``[0, a)``, a middle segment longer than ``middle`` (a query
    tile), a short one (its few queries select only some of the earlier blocks: a sparse compact buffer) and
    its rest; the others at random points, each keeping a random non-empty subset of its pieces."""
    segments = []
    longest = max(range(len(lengths)), key=lambda n: lengths[n])
    for n, (length, start) in enumerate(zip(lengths, starts)):
        if n == longest:
            a = rng.randint(1, 40)
            b = a + rng.randint(middle + 2, middle + 40)
            c = b + rng.randint(1, 4)
            cuts = [0, a, b, c, length]
        else:
            cuts = [0, *sorted(rng.sample(range(1, length), min(length - 1, rng.randint(0, 3)))), length]
        pieces = [Segment(n, start, p0, p1) for p0, p1 in zip(cuts[:-1], cuts[1:])]
        keep = pieces if n == longest else rng.sample(pieces, rng.randint(1, len(pieces)))
        segments.extend(keep)
    rng.shuffle(segments)
    doc = rng.randrange(len(lengths))
    empty_at = rng.randint(0, lengths[doc])
    segments.insert(rng.randint(0, len(segments)), Segment(doc, starts[doc], empty_at, empty_at))
    return segments


def chunk_segments(lengths: Sequence[int], chunks: Sequence[Tuple[int, int]]) -> List[Segment]:
    """The local segments of a rank holding the token ranges ``chunks`` (global ``[c0, c1)``, in its order) of
    the packed documents ``lengths``: each chunk intersected with each document, as the CP layer splits them."""
    bounds = offsets(lengths).tolist()
    segments = []
    for c0, c1 in chunks:
        for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            lo, hi = max(c0, start), min(c1, end)
            if lo < hi:
                segments.append(Segment(doc, start, lo - start, hi - start))
    return segments


def compact_key_segment(segment: Segment, idx: torch.Tensor, select_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The compact selection buffer of one query segment (global rows) and its remapped ``idx [1, L_q, H, n]``.

    ``J0 = p0 // l'``; slots hold the distinct blocks ``j < J0`` the segment selected (ascending), then the
    tail ``[J0*l', p1)``: ``j < J0 -> slot(j)``, ``j >= J0 -> m + j - J0``, ``-1`` stays ``-1``.
    """
    j0 = segment.p0 // select_len
    idx = idx.long()
    earlier = torch.unique(idx[(idx >= 0) & (idx < j0)])
    m = earlier.numel()
    slot = torch.full((j0 + 1,), -1, dtype=torch.long, device=idx.device)
    slot[earlier] = torch.arange(m, device=idx.device)
    remapped = torch.where(idx < 0, -1, torch.where(idx < j0, slot[idx.clamp(0, j0)], m + idx - j0))
    block_rows = (earlier[:, None] * select_len + torch.arange(select_len, device=idx.device)).flatten()
    rows = segment.start + torch.cat([block_rows, torch.arange(j0 * select_len, segment.p1, device=idx.device)])
    return rows, remapped.to(torch.int32)


def packed_rows(pieces: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenated global rows of the key segments and their int32 offsets."""
    return torch.cat(pieces), offsets([len(p) for p in pieces])
