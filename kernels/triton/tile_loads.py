"""Device side of the tile tables of :mod:`.utils`: reading one row inside a kernel."""
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
