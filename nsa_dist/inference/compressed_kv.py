"""``CompressedKV``: the compressed K/V of each sequence and the raw tokens its next compressed block needs.

Training semantics (DESIGN.md, compression): compressed block ``i`` covers tokens ``[i*d, i*d + l)`` and exists
once its last token ``i*d + l - 1`` does, so during decoding a block completes whenever a token at position ``p``
with ``p >= l - 1`` and ``(p - l + 1) % d == 0`` arrives; the compressor ``phi`` is then applied to the last ``l``
raw (un-rotated) tokens of the compression branch and the compressed key is rotated at ``p``.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch

from nsa_kernels import compressed_block_last_tokens, num_compressed_blocks

from .positions import valid_rows
from .ring_kv import RingKV


class KeyCompression(NamedTuple):
    """How an NSA layer turns raw blocks into compressed K/V: ``k_compressor`` / ``v_compressor`` map
    ``[B, T, H, D]`` to ``[B, (T - l) // d + 1, H, D]`` (:class:`~nsa_dist.BlockCompressor`), ``rotary(x, positions)``
    rotates compressed keys at their block's last token (None: no rotary)."""
    k_compressor: Callable
    v_compressor: Callable
    rotary: Optional[Callable]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, S, H, D]`` rotated at ``positions`` (``[S]`` or ``[B, S]``), or ``x`` without rotary."""
        return x if self.rotary is None else self.rotary(x, positions)


def compressed_counts(lengths: torch.Tensor, block_len: int, stride: int) -> torch.Tensor:
    """int64 ``[B]``: compressed blocks of sequences of ``lengths [B]`` tokens, ``max(0, (L - l) // d + 1)``."""
    return torch.where(lengths >= block_len, torch.div(lengths - block_len, stride, rounding_mode="floor") + 1, 0)


class CompressedKV:
    """Compressed keys ``k [B, Nc, H, Dk]`` (rotated) and values ``v [B, Nc, H, Dv]`` with
    ``Nc = max(0, (capacity - l) // d + 1)``, row = block (zero until the block completes), and the last ``l`` raw
    compression-branch tokens of each sequence (:class:`RingKV` ``tail``)."""

    def __init__(self, batch: int, capacity: int, heads: int, k_dim: int, v_dim: int, block_len: int, stride: int,
                 dtype: torch.dtype, device=None):
        self.block_len, self.stride = block_len, stride
        num_blocks = num_compressed_blocks(capacity, block_len, stride)
        self.k = torch.zeros(batch, num_blocks, heads, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, num_blocks, heads, v_dim, dtype=dtype, device=device)
        self.tail = RingKV(batch, block_len, heads, k_dim, v_dim, dtype, device)

    def fill(self, k_raw: torch.Tensor, v_raw: torch.Tensor, lengths: torch.Tensor,
             compression: KeyCompression) -> None:
        """Compress the prompts: ``k_raw [B, T, H, Dk]``, ``v_raw [B, T, H, Dv]`` raw (un-rotated) compression-branch
        K/V of sequences of ``lengths [B]`` tokens (rows from ``lengths[b]`` on are padding): every block of each
        sequence, computed as training does over the whole prompt, and its last ``l`` raw tokens."""
        T = k_raw.shape[1]
        k_cmp = compression.k_compressor(k_raw, None)
        v_cmp = compression.v_compressor(v_raw, None)
        k_cmp = compression.rotate(k_cmp, compressed_block_last_tokens(None, T, self.block_len, self.stride,
                                                                       device=k_raw.device))
        keep = valid_rows(compressed_counts(lengths, self.block_len, self.stride), k_cmp.shape[1])[..., None, None]
        self.k.zero_()
        self.v.zero_()
        self.k[:, :k_cmp.shape[1]] = torch.where(keep, k_cmp, 0).to(self.k.dtype)
        self.v[:, :v_cmp.shape[1]] = torch.where(keep, v_cmp, 0).to(self.v.dtype)
        self.tail.fill(k_raw, v_raw, lengths)

    def append(self, k_raw: torch.Tensor, v_raw: torch.Tensor, positions: torch.Tensor,
               compression: KeyCompression) -> None:
        """Add the raw tokens ``k_raw [B, S, H, Dk]``, ``v_raw [B, S, H, Dv]`` at consecutive ``positions`` (int64
        ``[B, S]``) one at a time, compressing each block the token completes (in the sequences where it does)."""
        l, d = self.block_len, self.stride
        for s in range(positions.shape[1]):
            pos = positions[:, s]
            self.tail.write(k_raw[:, s:s + 1], v_raw[:, s:s + 1], pos[:, None])
            done = ((pos >= l - 1) & (torch.remainder(pos - (l - 1), d) == 0)).nonzero().flatten()
            if done.numel():
                self._compress_last_block(done, pos, compression)

    def _compress_last_block(self, rows: torch.Tensor, pos: torch.Tensor, compression: KeyCompression) -> None:
        """In the sequences ``rows`` (int64 ``[n]``), compress the block whose last token, at ``pos[rows]`` (``pos``
        int64 ``[B]``), the tail just received: its ``l`` raw tokens, the compressor, rotary at ``pos``."""
        l, d = self.block_len, self.stride
        block_positions = pos[:, None] - (l - 1) + torch.arange(l, device=pos.device)         # [B, l]
        k_block, v_block = (t[rows] for t in self.tail.read(block_positions))
        last = pos[rows]
        block = torch.div(last - (l - 1), d, rounding_mode="floor")
        k_cmp = compression.rotate(compression.k_compressor(k_block, None), last[:, None])
        self.k[rows, block] = k_cmp[:, 0].to(self.k.dtype)
        self.v[rows, block] = compression.v_compressor(v_block, None)[:, 0].to(self.v.dtype)

    def tensors(self) -> List[torch.Tensor]:
        """The tensors held (for the cache's byte count)."""
        return [self.k, self.v, *self.tail.tensors()]
