"""Host-side helpers shared by every Triton kernel: tile tables of (packed) query and key segments.

Every kernel walks queries (or keys) in tiles that never cross a segment. Query segment ``n`` is rows
``[q_start, q_end)`` of q (``cu_seqlens``, one segment ``[0, T)`` per batch row without it); its key segment is
rows ``[k_start, k_start + L_k)`` of the raw K/V (``cu_seqlens_k``, by default the query segment itself) and
rows ``[cmp_start, ...)`` of the packed compressed K/V (``compressed_cu_seqlens(cu_seqlens_k, l, d)``). Queries
are bottom-right aligned: query row ``t`` sits at position ``t - q_start + shift`` of its key segment,
``shift = L_k - L_q``, and the key at position ``p`` is raw row ``k_start + p``. The host builds one int32 row
per tile (:func:`tile_table`), and a kernel's program reads its row (:func:`.tile_loads.load_tile`):

    ``[q_start, q_end, tile_start, cmp_start, k_start, shift]``

``tile_start`` is the tile's first row on the axis the table cuts: query rows (:func:`query_tile_table`), raw
key rows (``over="keys"``: window dK/dV tiles, selection blocks) or compressed rows (``over="compressed"``).
Without ``cu_seqlens_k``: ``k_start = q_start`` and ``shift = 0``, so positions are ``t - q_start`` as for
plain documents. ``program_id`` over ``B`` handles the batch without ``cu_seqlens``; with it ``B == 1``.
Kernels must multiply row/token indices by strides in int64 (``tl.int64``) so ``T * H * D`` past 2**31
does not overflow.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton.language as tl

from ..layout import compressed_cu_seqlens

TILE_COLUMNS = 6  # q_start, q_end, tile_start, cmp_start, k_start, shift (tile_loads.load_tile reads them)
TILE_AXES = ("queries", "keys", "compressed")
LOG2E = 1.4426950408889634  # log2(e): the kernels' softmax runs in base 2 with the scale times LOG2E
LN2 = 0.6931471805599453  # ln(2) = 1 / LOG2E: a base-2 log-sum-exp times LN2 is the natural one
# the two inside kernels, which may read a module global only when it is a tl.constexpr
LOG2E_CONSTEXPR = tl.constexpr(LOG2E)
LN2_CONSTEXPR = tl.constexpr(LN2)


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


def _cpu_offsets(offsets: torch.Tensor) -> torch.Tensor:
    # tables are built on the host (explicit devices: a user's torch.set_default_device must not move them)
    return offsets.detach().to("cpu", torch.long)


def host_offsets(*offsets: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """CPU copies of optional offset tensors (``None`` stays ``None``), made once per op call so the host tables
    built from them do not each copy (and synchronise) again."""
    return tuple(None if x is None else x.detach().cpu() for x in offsets)


def segment_offsets(cu_seqlens: Optional[torch.Tensor], seq_len: int, cu_seqlens_k: Optional[torch.Tensor] = None,
                    block_len: int = 1, stride: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU int64 ``[N + 1]`` offsets of the query segments (rows of q), of the key segments (raw K/V rows) and
    of their compressed rows (packed compressed K/V, geometry ``block_len``/``stride``)."""
    q = _cpu_offsets(cu_seqlens) if cu_seqlens is not None else torch.tensor([0, seq_len], dtype=torch.long,
                                                                             device="cpu")
    k = q if cu_seqlens_k is None else _cpu_offsets(cu_seqlens_k)
    return q, k, compressed_cu_seqlens(k.to(torch.int32), block_len, stride).long()


def tile_table(cu_seqlens: Optional[torch.Tensor], seq_len: int, tile: int, *,
               cu_seqlens_k: Optional[torch.Tensor] = None, block_len: int = 1, stride: int = 1,
               over: str = "queries") -> Tuple[torch.Tensor, torch.Tensor]:
    """CPU int64 ``[num_tiles, 6]`` tile rows (module docstring) and each tile's segment ``[num_tiles]``.

    ``over`` picks the axis cut into tiles of ``tile`` rows, segment by segment in order: ``"queries"`` (rows of
    q), ``"keys"`` (raw K/V rows of the key segments) or ``"compressed"`` (their compressed rows; pass the
    compression geometry ``block_len``/``stride``, which also fills the ``cmp_start`` column)."""
    q, k, c = segment_offsets(cu_seqlens, seq_len, cu_seqlens_k, block_len, stride)
    seg, start = document_tiles(dict(zip(TILE_AXES, (q, k, c)))[over], tile)
    shift = (k[1:] - k[:-1]) - (q[1:] - q[:-1])
    table = torch.stack([q[:-1][seg], q[1:][seg], start, c[:-1][seg], k[:-1][seg], shift[seg]], 1)
    return table.reshape(-1, TILE_COLUMNS), seg


def query_tile_table(cu_seqlens: Optional[torch.Tensor], seq_len: int, block_t: int, device,
                     block_len: int = 1, stride: int = 1,
                     cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int32 ``[num_tiles, 6]`` table of query tiles of ``block_t`` rows (see module docstring), on ``device``.

    ``block_len``/``stride`` (compression geometry) fill the ``cmp_start`` column; pass them for
    kernels that read compressed K/V.
    """
    table, _ = tile_table(cu_seqlens, seq_len, block_t, cu_seqlens_k=cu_seqlens_k, block_len=block_len,
                          stride=stride)
    return host_table_to(table, device)


def host_table_to(table: torch.Tensor, device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A CPU host table as a contiguous ``dtype`` tensor on ``device``, copied without stalling the host.

    A plain ``.to("cuda")`` from pageable memory synchronises the stream: the GPU drains, then idles while the
    host builds the next table (measured: ``benchmarks/RESULTS.md``, "Tuning notes behind the kernels'
    heuristics"). The table is staged in pinned memory instead and copied with ``non_blocking=True``;
    PyTorch's pinned-memory cache keeps the staging buffer until the copy has run."""
    table = table.to(dtype).contiguous()
    device = torch.device(device)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def query_positions(cu_seqlens: Optional[torch.Tensor], seq_len: int, cu_seqlens_k: Optional[torch.Tensor],
                    device) -> torch.Tensor:
    """int64 ``[T]``: each query's position in its key segment (``t - q_start + shift``), on ``device``."""
    q, k, _ = segment_offsets(cu_seqlens, seq_len, cu_seqlens_k)
    lengths = q[1:] - q[:-1]
    base = torch.repeat_interleave(q[:-1] - (k[1:] - k[:-1] - lengths), lengths, output_size=seq_len)
    return torch.arange(seq_len, device=device) - host_table_to(base, device, torch.long)


def pow2(x: int, least: int = 1) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``), at least ``least``: padded tile sizes
    (``tl.arange`` lengths are powers of two; ``tl.dot`` dims at least 16)."""
    return max(least, 1 << max(0, int(x) - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the attention kernels' ``tl.dot`` for inputs of ``dtype``: exact IEEE dots for fp32
    inputs (not ``tf32x3``, which made one kernel fault: ``benchmarks/RESULTS.md``, "Tuning notes behind the
    kernels' heuristics"); half inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def scoring_dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the block-scoring kernels' ``q k^T`` dots (top-n selection, block max logits):
    ``tf32x3`` for fp32 inputs, about fp32-exact on tensor cores; half inputs ignore the setting."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def stride_args(x: torch.Tensor, *names: str) -> dict:
    """The first ``len(names)`` strides of ``x`` as keyword arguments of a kernel launch, e.g.
    ``stride_args(q, "sq_b", "sq_t", "sq_h")`` for the batch, token and head strides of ``q [B, T, HQ, D]``."""
    return dict(zip(names, x.stride()))


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
