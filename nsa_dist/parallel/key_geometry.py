"""Key segments of the NSA branches for a rank's query segments (document-local arithmetic only), and the
compact key buffers of its selected blocks.

For a query segment covering document positions ``[p0, p1)`` (see :mod:`.sharding`):

* compression: the rank owns compressed block ``i`` iff its last token ``i*d + l - 1`` lies in
  ``[p0, p1)``; it compresses the raw tokens ``[i_lo*d, p1)`` (a halo of fewer than ``l`` tokens before
  ``p0`` plus the segment), whose blocks are exactly the owned ones;
* compressed attention and selection: key segment = the document prefix ``[0, p1)``, i.e. the document's
  first ``num_compressed_blocks(p1)`` compressed rows;
* window: key segment ``[max(0, p0 - w + 1), p1)``;
* selected attention (:func:`compact_selection`): with ``J0 = p0 // l'``, the compact key buffer holds in slots
  ``0 .. m-1`` the ``m`` distinct selection blocks ``j < J0`` that any query of the segment (any KV head)
  selected, ascending, ``l'`` tokens each, followed by the tail: document positions ``[J0*l', p1)`` (a halo of
  fewer than ``l'`` tokens, then the segment). Block indices are remapped ``j < J0 -> slot(j)``,
  ``j >= J0 -> m + j - J0``, ``-1`` stays ``-1``; queries stay bottom-right aligned, so
  ``selected_attention(..., cu_seqlens_k=...)`` on the buffer equals the single-rank result.

A key segment is given as ``KeySegments``: the global packed positions of its tokens, segment after
segment, and ``cu_seqlens_k`` (the ``cu_seqlens_k`` argument of the branch ops).
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch

from nsa_kernels import num_compressed_blocks

from .sharding import Segment


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


class CompactSelection(NamedTuple):
    """``keys``: the buffers' global packed positions, ``cu_seqlens_k`` and ``halo`` (every key before its
    segment's ``p0``: the selected blocks and the tail halos); ``block_idx``: int32 ``[1, T_q, H, n]``
    remapped into the buffers; ``block_starts``: int64 global position of the first token of every distinct
    selected block ``j < J0`` (per segment, so a block two segments need appears twice)."""
    keys: KeySegments
    block_idx: torch.Tensor
    block_starts: torch.Tensor


def compact_selection(block_idx: torch.Tensor, segments: Sequence[Segment], select_len: int) -> CompactSelection:
    """Build the compact selected-attention key buffers of ``segments`` (the query segments, covering the rows
    of ``block_idx [1, T_q, H, n]``, document-relative block numbers from ``select_blocks``)."""
    device = block_idx.device
    idx = block_idx[0].long()
    lengths = torch.tensor([s.length for s in segments], device=device)
    seg_of_row = torch.repeat_interleave(torch.arange(len(segments), device=device), lengths)[:, None, None]
    j0 = torch.tensor([s.p0 // select_len for s in segments], device=device)
    row_j0 = j0[seg_of_row]
    early = (idx >= 0) & (idx < row_j0)
    width = int(j0.max()) + 1
    key = seg_of_row * width + idx  # (segment, block) pairs, ordered by segment then block
    chosen = torch.unique(key[early])
    chosen_seg, chosen_block = torch.div(chosen, width, rounding_mode="floor"), chosen % width
    m = torch.bincount(chosen_seg, minlength=len(segments))
    first = torch.cumsum(m, 0) - m
    slot = torch.searchsorted(chosen, key) - first[seg_of_row]
    remapped = torch.where(early, slot, m[seg_of_row] + idx - row_j0)
    remapped = torch.where(idx < 0, torch.full_like(idx, -1), remapped)

    doc_start = torch.tensor([s.doc_start for s in segments], device=device)
    block_starts = doc_start[chosen_seg] + chosen_block * select_len
    block_rows = (block_starts[:, None] + torch.arange(select_len, device=device)).split(m.tolist())
    positions, halo, key_lengths = [], [], [0]
    for s, rows, j in zip(segments, block_rows, j0.tolist()):
        tail_halo = torch.arange(s.doc_start + j * select_len, s.doc_start + s.p0, device=device)
        positions += [rows.flatten(), tail_halo, torch.arange(s.doc_start + s.p0, s.doc_start + s.p1, device=device)]
        halo += [rows.flatten(), tail_halo]
        key_lengths.append(rows.numel() + s.p1 - j * select_len)
    cu = torch.tensor(key_lengths, dtype=torch.long, device=device).cumsum(0).to(torch.int32)
    keys = KeySegments(torch.cat(positions), cu, torch.cat(halo))
    return CompactSelection(keys, remapped.to(torch.int32)[None], block_starts)
