"""Bytes held by the decode caches, as functions of the configuration (tests check them against the tensors held).

Per layer, with ``e`` bytes per element of the cache's dtype, ``B`` sequences of up to ``C`` tokens, ``H`` KV
heads, head dims ``Dk``, ``Dv``, compression block ``l`` and stride ``d``, window ``w``:

NSA (:class:`~nsa_dist.inference.nsa_cache.NSALayerCache`)::

    B * e * H * (Dk + Dv) * (C + Nc(C) + l + w_ring)          selection K/V, compressed K/V, raw tail, window ring
  + B * e * H * 2 * Dk * ceil(C / d)                          tile bounds, selection_scoring="key_bound" only
  + 8 * B                                                     lengths (int64)

with ``Nc(C) = max(0, (C - l) // d + 1)`` and ``w_ring = w`` for ``kv_sharing="separate"`` (0 when shared K/V or
``w = 0``). Each further token of a sequence adds ``e * H * ((Dk + Dv) * (1 + 1/d) + 2 * Dk / d)`` bytes on average
(the last term for key-bound scoring only): the window ring and the raw tail are fixed per sequence, so separate
and shared K/V cost the same per token. Example: ``H = 4``, ``Dk = Dv = 128``, ``d = 16``, bf16: 2,176 bytes per token
and layer (dense attention: 2,048).

Dense (:class:`~nsa_dist.inference.dense_cache.DenseLayerCache`)::

    B * e * H * 2 * D * C + 8 * B
"""
from __future__ import annotations

import torch

from nsa_kernels import num_compressed_blocks

from ..config import NSAConfig

LENGTH_BYTES = 8  # int64 lengths per sequence


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty(0, dtype=dtype).element_size()


def nsa_cache_bytes(config: NSAConfig, batch: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes an NSA layer's cache holds for ``batch`` sequences of up to ``capacity`` tokens in ``dtype`` (the
    module docstring's formula)."""
    c, e = config, element_size(dtype)
    ring = c.window if c.kv_sharing == "separate" else 0
    rows = capacity + num_compressed_blocks(capacity, c.block_len, c.stride) + c.block_len + ring
    total = batch * e * c.num_kv_heads * (c.head_dim + c.v_head_dim) * rows
    if c.selection_scoring == "key_bound":
        total += batch * e * c.num_kv_heads * 2 * c.head_dim * -(-capacity // c.stride)
    return total + LENGTH_BYTES * batch


def nsa_bytes_per_token(config: NSAConfig, dtype: torch.dtype) -> float:
    """Average bytes each further token of a sequence adds to an NSA layer's cache (module docstring)."""
    c, e = config, element_size(dtype)
    tiles = 2 * c.head_dim / c.stride if c.selection_scoring == "key_bound" else 0.0
    return e * c.num_kv_heads * ((c.head_dim + c.v_head_dim) * (1 + 1 / c.stride) + tiles)


def dense_cache_bytes(num_kv_heads: int, head_dim: int, batch: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes a dense layer's cache holds for ``batch`` sequences of up to ``capacity`` tokens in ``dtype``."""
    return batch * element_size(dtype) * num_kv_heads * 2 * head_dim * capacity + LENGTH_BYTES * batch
