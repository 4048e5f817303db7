"""Host-side helpers shared by every Triton kernel: query-tile tables for (packed) sequences.

Every kernel walks queries in tiles of ``BLOCK_T`` tokens that never cross a document. The host builds
one int32 table row per tile, and the kernel's ``program_id(0)`` reads its row:

    ``[doc_start, doc_end, tile_start, cmp_start]``

``doc_start``/``doc_end`` are the document's global token range, ``tile_start`` the tile's first global
query token, ``cmp_start`` the document's first row in the packed compressed K/V. Without
``cu_seqlens`` there is one document ``[0, T)`` per batch row (``program_id`` over ``B`` handles the
batch); with ``cu_seqlens`` ``B == 1``. Kernels must multiply row/token indices by strides in int64
(``tl.int64``) so ``T * H * D`` past 2**31 does not overflow.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..layout import compressed_cu_seqlens

TILE_COLUMNS = 4  # doc_start, doc_end, tile_start, cmp_start


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def document_tiles(bounds: torch.Tensor, tile: int):
    """Split each document of CPU offsets ``bounds [N + 1]`` into tiles of ``tile`` tokens (the last one
    shorter). Returns CPU int64 ``doc [num_tiles]`` (each tile's document) and ``start [num_tiles]`` (its
    first global token), documents in order."""
    starts, ends = bounds[:-1].long(), bounds[1:].long()
    per_doc = torch.div(ends - starts + tile - 1, tile, rounding_mode="floor")
    num_tiles = int(per_doc.sum())
    doc = torch.repeat_interleave(torch.arange(len(starts), device="cpu"), per_doc, output_size=num_tiles)
    first = torch.cumsum(per_doc, 0) - per_doc
    return doc, starts[doc] + (torch.arange(num_tiles, device="cpu") - first[doc]) * tile


def query_tile_table(cu_seqlens: Optional[torch.Tensor], seq_len: int, block_t: int, device,
                     block_len: int = 1, stride: int = 1) -> torch.Tensor:
    """int32 ``[num_tiles, 4]`` table of query tiles (see module docstring), on ``device``.

    ``block_len``/``stride`` (compression geometry) fill the ``cmp_start`` column; pass them for
    kernels that read compressed K/V.
    """
    # built on the host (explicit device: a user's torch.set_default_device must not move it)
    if cu_seqlens is None:
        bounds = torch.tensor([0, seq_len], dtype=torch.int32, device="cpu")
        cmp_bounds = torch.zeros(2, dtype=torch.int32, device="cpu")
    else:
        bounds = cu_seqlens.detach().to("cpu", torch.int32)
        cmp_bounds = compressed_cu_seqlens(bounds, block_len, stride)
    doc, tile_start = document_tiles(bounds, block_t)
    starts, ends = bounds[:-1].long(), bounds[1:].long()
    table = torch.stack([starts[doc], ends[doc], tile_start, cmp_bounds[:-1].long()[doc]], 1)
    return table.to(device=device, dtype=torch.int32).contiguous()


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute on for inputs of ``dtype`` (outputs are cast back): fp64 runs in fp32
    (there are no fp64 kernels), and under the CPU interpreter bf16 runs in fp32 too, because the
    interpreter's bf16 ``tl.dot`` multiplies raw bits (Triton 3.9); the GPU accumulates bf16 in fp32 anyway."""
    if dtype == torch.float64 or (dtype == torch.bfloat16 and triton_interpreting()):
        return torch.float32
    return dtype


def poisoning_outputs() -> bool:
    """``NSA_KERNELS_POISON=1`` (set by the tests): kernel outputs start as NaN, so an element a kernel
    forgets to write fails the comparison instead of passing on leftover memory."""
    return os.environ.get("NSA_KERNELS_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised output buffer for a kernel to fill completely (NaN-filled under ``NSA_KERNELS_POISON=1``;
    integer buffers get -7, a value no kernel writes)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning_outputs():
        out.fill_(float("nan") if dtype.is_floating_point else -7)
    return out
