"""Bitonic sorting networks on the last dim of a register tile (size a power of two), for Triton kernels.

Written with reshapes and min/max reductions instead of ``tl.sort``, whose xor reductions crawl under the CPU
interpreter; the same code runs on the GPU. Used by the top-n selection (:mod:`.select_blocks`) and the canonical
block lists (:mod:`.block_lists`).
"""
import triton
import triton.language as tl


@triton.jit
def _compare_exchange(x, stage: tl.constexpr, order: tl.constexpr, i: tl.constexpr, n_dims: tl.constexpr):
    """One bitonic round on the last dim (size ``2**n_dims``) of ``x``: positions that differ only in bit
    ``n_dims - 1 - i`` are put in order, ascending or descending by ``order`` (0 / 1) or, for ``order == 2``,
    alternating with bit ``stage`` of the position."""
    n_outer: tl.constexpr = x.numel >> n_dims
    inner: tl.constexpr = 2 ** (n_dims - i - 1)
    shape: tl.constexpr = [n_outer * 2 ** i, 2, inner]
    y = tl.reshape(x, shape)
    lo = tl.min(y, axis=1)[:, None, :]
    hi = tl.max(y, axis=1)[:, None, :]
    right = tl.arange(0, 2)[None, :, None]  # the pair's upper position
    if order == 2:
        outer = tl.arange(0, n_outer * 2 ** i)[:, None, None] % (2 ** i)
        position = (outer * 2 + right) * inner + tl.arange(0, inner)[None, None, :]
        descending = (position >> stage) & 1
    else:
        descending = order
    y = tl.where((right ^ descending) == 1, hi, lo)
    return tl.reshape(y, x.shape)


@triton.jit
def bitonic_merge(x, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """Sort the bitonic runs of length ``2**stage`` of the last dim (see :func:`_compare_exchange`)."""
    for i in tl.static_range(stage):
        x = _compare_exchange(x, stage, order, i + n_dims - stage, n_dims)
    return x


@triton.jit
def sort_rows(x, n_dims: tl.constexpr, descending: tl.constexpr):
    """Bitonic sort of the last dim (size ``2**n_dims``), ascending (``descending = 0``) or descending (1).
    Its last step is one :func:`bitonic_merge`, which callers also use alone to merge two sorted lists."""
    for stage in tl.static_range(1, n_dims):
        x = bitonic_merge(x, stage, 2, n_dims)
    return bitonic_merge(x, n_dims, descending, n_dims)
