"""Device-side loads shared by the kernels: a row of the tile tables of :mod:`.utils`, and masked row tiles."""
import triton
import triton.language as tl


@triton.jit
def load_tile(row):
    """The six fields of the tile-table row at pointer ``row``: ``q_start, q_end, tile_start, cmp_start,
    k_start, shift`` (see :mod:`.utils`)."""
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5))


@triton.jit
def tile_row(TABLE, index):
    """Row ``index`` of a tile table (``utils.TILE_COLUMNS = 6`` int32 columns), as :func:`load_tile`."""
    return load_tile(TABLE + index * 6)


@triton.jit
def load_rows(ptrs, row_ok, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_MASK: tl.constexpr):
    """Load a ``[rows, BLOCK_D]`` tile at pointers ``ptrs`` (columns ``offs_d``, ``D`` of them real); masked rows
    (``ROW_MASK`` and not ``row_ok``) and padded columns read 0. Without ``ROW_MASK`` every row is read."""
    if ROW_MASK:
        if D == BLOCK_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        if D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def store_rows(ptrs, x, row_ok, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the ``[rows, BLOCK_D]`` tile ``x`` at pointers ``ptrs``: the rows with ``row_ok``, the ``D`` real
    columns."""
    if D == BLOCK_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < D))
