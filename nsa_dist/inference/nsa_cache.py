"""``NSALayerCache``: the decode state of one NSA layer for a batch of sequences of different lengths.

Layout (``B`` sequences, ``capacity`` tokens each at most, ``H`` KV heads, the cache's dtype):

- ``selection`` (:class:`~nsa_dist.inference.token_kv.TokenKV`): the selection branch's K/V of every token,
  ``[B, capacity, H, Dk|Dv]``, keys rotated at their positions. With ``kv_sharing="shared"`` these are the only raw
  K/V held: the window branch reads them too.
- ``window`` (:class:`~nsa_dist.inference.ring_kv.RingKV`, ``kv_sharing="separate"`` and ``window > 0`` only): the
  window branch's K/V of the last ``window`` tokens, a ring buffer ``[B, window, H, Dk|Dv]`` (slot = position %
  window), keys rotated.
- ``compressed`` (:class:`~nsa_dist.inference.compressed_kv.CompressedKV`): compressed K/V
  ``[B, (capacity - l) // d + 1, H, Dk|Dv]`` (keys rotated at each block's last token) and the last ``l`` raw,
  un-rotated tokens of the compression branch (a ring of ``l``), from which the next block is compressed when it
  completes. With shared K/V these ``l`` tokens are the shared K/V before rotation.
- ``tiles`` (:class:`~nsa_dist.inference.tile_bounds.TileBounds`, ``selection_scoring="key_bound"`` only):
  per-tile key minima and maxima ``[B, ceil(capacity / d), H, Dk]`` each.
- ``lengths``: int64 ``[B]`` tokens held per sequence.

Memory: :func:`~nsa_dist.inference.memory.nsa_cache_bytes` (exact) and
:func:`~nsa_dist.inference.memory.nsa_bytes_per_token` (what each further token adds).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..branch_kv import BranchKV
from ..config import NSAConfig
from .compressed_kv import CompressedKV, KeyCompression
from .decode_kv import DecodeKV
from .positions import check_room, ring_positions, step_positions
from .ring_kv import RingKV
from .tile_bounds import TileBounds
from .token_kv import TokenKV


class NSALayerCache:
    """The K/V an NSA layer's decode steps read (see the module docstring for the layout), for ``batch`` sequences
    of up to ``capacity`` tokens each, in ``dtype`` on ``device``."""

    def __init__(self, config: NSAConfig, batch: int, capacity: int, dtype: torch.dtype, device=None):
        c = self.config = config
        self.capacity = capacity
        dims = (batch, capacity, c.num_kv_heads, c.head_dim, c.v_head_dim)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.selection = TokenKV(*dims, dtype, device)
        self.window: Optional[RingKV] = None
        if c.kv_sharing == "separate" and c.window:
            self.window = RingKV(batch, c.window, *dims[2:], dtype, device)
        self.compressed = CompressedKV(*dims, c.block_len, c.stride, dtype, device)
        self.tiles: Optional[TileBounds] = None
        if c.selection_scoring == "key_bound":
            self.tiles = TileBounds(batch, capacity, c.num_kv_heads, c.head_dim, c.stride, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.selection.k.dtype

    @property
    def batch(self) -> int:
        return self.selection.k.shape[0]

    def fill(self, kv: BranchKV, lengths: torch.Tensor, compression: KeyCompression) -> None:
        """Hold prompts: ``kv`` the branches' ``[B, T, H, D]`` K/V over right-padded prompts of ``lengths [B]``
        tokens (``T <= capacity``), the selection and window keys rotated at positions ``0 .. T-1``, the
        compression branch's raw and un-rotated (:class:`~nsa_dist.branch_kv.BranchKV`)."""
        check_room(lengths, 0, self.capacity)
        self.lengths.copy_(lengths)
        self.selection.fill(kv.k_slc, kv.v_slc, lengths)
        if self.window is not None:
            self.window.fill(kv.k_win, kv.v_win, lengths)
        self.compressed.fill(kv.k_cmp_raw, kv.v_cmp_raw, lengths, compression)
        if self.tiles is not None:
            self.tiles.fill(kv.k_slc, lengths)

    def append(self, kv: BranchKV, compression: KeyCompression) -> DecodeKV:
        """Add ``S`` tokens to every sequence (``kv`` as for :meth:`fill`, ``[B, S, H, D]``, keys rotated at the
        positions ``lengths[b] + s``) and return what their queries read (:class:`DecodeKV`; its window rows are
        the window's last tokens before this step followed by the new ones)."""
        check_room(self.lengths, kv.k_slc.shape[1], self.capacity)
        positions = step_positions(self.lengths, kv.k_slc.shape[1])
        window = self._window_rows(kv, positions)
        self.selection.write(kv.k_slc, kv.v_slc, positions)
        if self.window is not None:
            self.window.write(kv.k_win, kv.v_win, positions)
        self.compressed.append(kv.k_cmp_raw, kv.v_cmp_raw, positions, compression)
        if self.tiles is not None:
            self.tiles.append(self.selection.k, positions)
        self.lengths += positions.shape[1]
        tiles = (None, None) if self.tiles is None else (self.tiles.kmin, self.tiles.kmax)
        return DecodeKV(self.compressed.k, self.compressed.v, self.selection.k, self.selection.v, *window, *tiles)

    def _window_rows(self, kv: BranchKV, positions: torch.Tensor):
        """``(k, v, positions)`` of the window keys of a step, taken before the step's writes: with separate K/V
        the ring as it holds (its positions from ``lengths``) followed by the step's new tokens; with shared K/V the
        selection buffers themselves (row = position), which the step's writes then complete;
        ``(None, None, None)`` without a window branch."""
        if not self.config.window:
            return None, None, None
        if self.window is None:
            rows = torch.arange(self.capacity, device=positions.device).expand(self.batch, -1)
            return self.selection.k, self.selection.v, rows
        held = ring_positions(self.lengths, self.window.size)
        return (torch.cat([self.window.k, kv.k_win.to(self.dtype)], 1),
                torch.cat([self.window.v, kv.v_win.to(self.dtype)], 1), torch.cat([held, positions], 1))

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the cache holds (its memory: their ``nbytes``)."""
        parts = [self.selection, self.window, self.compressed, self.tiles]
        return [self.lengths] + [t for part in parts if part is not None for t in part.tensors()]

    def nbytes(self) -> int:
        """Bytes of all tensors held."""
        return sum(t.nbytes for t in self.tensors())
