"""Sequence layout helpers shared by the reference and the kernels.

A batch is either ``B`` independent sequences of length ``T`` (``cu_seqlens is None``) or ``B = 1``
with ``N`` packed documents described by ``cu_seqlens`` (int32 ``[N + 1]``, FlashAttention style:
document ``n`` holds tokens ``cu_seqlens[n] : cu_seqlens[n + 1]``). Every NSA position (compressed
block, selection block, window) is counted from the start of its document.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def num_compressed_blocks(length: int, block_len: int, stride: int) -> int:
    """Number of compressed blocks of a document of ``length`` tokens.

    Block ``i`` covers tokens ``[i * stride, i * stride + block_len)``; only complete blocks exist,
    so a document has ``max(0, (length - block_len) // stride + 1)`` of them.
    """
    if length < block_len:
        return 0
    return (length - block_len) // stride + 1


def document_spans(cu_seqlens: Optional[torch.Tensor], seq_len: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` token ranges of the documents (one span ``(0, seq_len)`` without packing)."""
    if cu_seqlens is None:
        return [(0, seq_len)]
    bounds = cu_seqlens.tolist()
    return [(bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_len: int, stride: int) -> torch.Tensor:
    """Offsets of each document's compressed blocks in the packed compressed K/V.

    Args:
        cu_seqlens: int32 ``[N + 1]`` token offsets of ``N`` packed documents.
    Returns:
        int32 ``[N + 1]`` on the same device: document ``n``'s compressed blocks are rows
        ``out[n] : out[n + 1]`` of the packed ``k_cmp`` / ``v_cmp``.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = torch.where(
        lengths >= block_len,
        torch.div(lengths - block_len, stride, rounding_mode="floor") + 1,
        torch.zeros_like(lengths),
    )
    out = torch.zeros(len(cu_seqlens), dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return out


def total_compressed_blocks(seq_len: int, block_len: int, stride: int,
                            cu_seqlens: Optional[torch.Tensor] = None) -> int:
    """Length of the compressed K/V axis for a batch of length ``seq_len`` (packed or not)."""
    if cu_seqlens is None:
        return num_compressed_blocks(seq_len, block_len, stride)
    return sum(num_compressed_blocks(e - s, block_len, stride) for s, e in document_spans(cu_seqlens, seq_len))


def unfold_blocks(x: torch.Tensor, block_len: int, stride: int,
                  cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Raw tokens of every compressed block, packed document after document.

    Args:
        x: ``[B, T, H, D]`` keys or values.
    Returns:
        ``[B, Nc, H, block_len, D]`` where ``Nc = total_compressed_blocks(T, ...)``; row ``i`` of a
        document holds its tokens ``[i * stride, i * stride + block_len)``.
    """
    B, T, H, D = x.shape
    pieces = []
    for start, end in document_spans(cu_seqlens, T):
        if num_compressed_blocks(end - start, block_len, stride) == 0:
            continue
        # unfold over the time axis: [B, n, H, D, block_len] -> [B, n, H, block_len, D]
        pieces.append(x[:, start:end].unfold(1, block_len, stride).transpose(-1, -2))
    if not pieces:
        return x.new_zeros(B, 0, H, block_len, D)
    return torch.cat(pieces, dim=1)


def doc_local_positions(cu_seqlens: Optional[torch.Tensor], seq_len: int, device=None) -> torch.Tensor:
    """int64 ``[T]``: each token's position counted from the start of its document."""
    pos = torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        return pos
    starts = cu_seqlens[:-1].to(device=device, dtype=torch.long)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    return pos - torch.repeat_interleave(starts, lengths, output_size=seq_len)


def compressed_block_last_tokens(cu_seqlens: Optional[torch.Tensor], seq_len: int, block_len: int, stride: int,
                                 device=None) -> torch.Tensor:
    """int64 ``[Nc]``: global token index of the last token of every compressed block (packed order)."""
    pieces = []
    for start, end in document_spans(cu_seqlens, seq_len):
        n = num_compressed_blocks(end - start, block_len, stride)
        pieces.append(start + block_len - 1 + stride * torch.arange(n, device=device))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)
