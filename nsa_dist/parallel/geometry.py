"""Key segments of the NSA branches for a rank's query segments (document-local arithmetic only).

For a query segment covering document positions ``[p0, p1)`` (see :mod:`.segments`):

* compression: the rank owns compressed block ``i`` iff its last token ``i*d + l - 1`` lies in
  ``[p0, p1)``; it compresses the raw tokens ``[i_lo*d, p1)`` (a halo of fewer than ``l`` tokens before
  ``p0`` plus the segment), whose blocks are exactly the owned ones;
* compressed attention and selection: key segment = the document prefix ``[0, p1)``, i.e. the document's
  first ``num_compressed_blocks(p1)`` compressed rows;
* window: key segment ``[max(0, p0 - w + 1), p1)``.

A key segment is given as ``KeySegments``: the global packed positions of its tokens, segment after
segment, and ``cu_seqlens_k`` (the ``cu_seqlens_k`` argument of the branch ops).
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch

from nsa_kernels import num_compressed_blocks

from .segments import Segment


class KeySegments(NamedTuple):
    """Keys ``[start_n, p1_n)`` of each kept query segment ``n``: ``positions`` int64 (global packed),
    ``cu_seqlens_k`` int32 ``[N + 1]``, ``halo`` int64 positions of the keys before the segments' ``p0``."""
    positions: torch.Tensor
    cu_seqlens_k: torch.Tensor
    halo: torch.Tensor


def doc_ranges(spans: Sequence[Tuple[Segment, int]], device) -> KeySegments:
    """``KeySegments`` of the document ranges ``[start, seg.p1)`` for ``(seg, start)`` in ``spans``."""
    positions = [torch.arange(s.doc_start + start, s.doc_start + s.p1, device=device) for s, start in spans]
    halo = [torch.arange(s.doc_start + start, s.doc_start + max(start, s.p0), device=device) for s, start in spans]
    lengths = torch.tensor([0] + [s.p1 - start for s, start in spans], dtype=torch.long, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return KeySegments(torch.cat(positions) if positions else empty, lengths.cumsum(0).to(torch.int32),
                       torch.cat(halo) if halo else empty)


def owned_blocks(seg: Segment, block_len: int, stride: int) -> Tuple[int, int]:
    """``(i_lo, i_hi)``: the compressed blocks of ``seg``'s document whose last token lies in ``[p0, p1)``."""
    i_lo = max(0, -(-(seg.p0 - block_len + 1) // stride))
    return i_lo, max(i_lo, num_compressed_blocks(seg.p1, block_len, stride))


def compressor_inputs(segments: Sequence[Segment], block_len: int, stride: int, device) -> KeySegments:
    """Raw tokens ``[i_lo*d, p1)`` of each segment that owns compressed blocks (segments without any are left
    out): one packed document per segment for the compressor, whose output is exactly the owned blocks."""
    spans = []
    for s in segments:
        i_lo, i_hi = owned_blocks(s, block_len, stride)
        if i_hi > i_lo:
            spans.append((s, i_lo * stride))
    return doc_ranges(spans, device)


def owned_compressed_rows(segments: Sequence[Segment], cmp_offsets: List[int], block_len: int,
                          stride: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compressed blocks owned by ``segments``, in compressor-output order: their rows in the global packed
    compressed K/V (``cmp_offsets`` = ``compressed_cu_seqlens`` of the global documents), the document position
    of each block's last token and that token's global packed position. int64 ``[n]`` each (CPU)."""
    rows, last = [], []
    for s in segments:
        i = torch.arange(*owned_blocks(s, block_len, stride))
        rows.append(cmp_offsets[s.doc] + i)
        last.append(torch.stack([i * stride + block_len - 1, s.doc_start + i * stride + block_len - 1]))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    last_pos, last_global = torch.cat(last, dim=1)
    return torch.cat(rows), last_pos, last_global


def prefix_compressed_rows(segments: Sequence[Segment], cmp_offsets: List[int], block_len: int,
                           stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compressed keys of each segment's key segment, the document prefix ``[0, p1)``: int64 rows of the global
    packed compressed K/V (segment after segment) and int32 ``cu_seqlens_k`` ``[S + 1]`` on the raw token axis
    (key segment ``n`` is ``p1_n`` tokens long). CPU tensors."""
    rows = [cmp_offsets[s.doc] + torch.arange(num_compressed_blocks(s.p1, block_len, stride)) for s in segments]
    cu = torch.tensor([0] + [s.p1 for s in segments], dtype=torch.long).cumsum(0).to(torch.int32)
    return (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)), cu


def window_keys(segments: Sequence[Segment], window: int, device) -> KeySegments:
    """Window keys ``[max(0, p0 - w + 1), p1)`` of every segment."""
    return doc_ranges([(s, max(0, s.p0 - window + 1)) for s in segments], device)
