"""The compact key buffer of the selected-attention branch under context parallelism.

For a query segment ``[p0, p1)`` of a document, with ``J0 = p0 // l'``, the key buffer holds in slots
``0 .. m-1`` the ``m`` distinct selection blocks ``j < J0`` that any query of the segment (any KV head)
selected, ascending, ``l'`` tokens each, followed by the tail: document positions ``[J0*l', p1)`` (a halo of
fewer than ``l'`` tokens, then the segment). Block indices are remapped ``j < J0 -> slot(j)``,
``j >= J0 -> m + j - J0``, ``-1`` stays ``-1``; queries stay bottom-right aligned, so
``selected_attention(..., cu_seqlens_k=...)`` on the buffer equals the single-rank result.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .geometry import KeySegments
from .segments import Segment


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
