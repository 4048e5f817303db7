"""Tiny range-attention tiles for the kernel tests, so small inputs still run interior (unmasked) key and query
tiles, split GQA groups and compressed dK/dV work items of a few tokens."""
import torch

from nsa_kernels.triton import range_attention as RA

# 8-row tiles split a G = 16 group under the interpreter; compiled tl.dot needs >= 16 rows on a GPU
SMALL_ROWS = 16 if torch.cuda.is_available() else 8
SMALL_TILES = dict(fwd_rows=SMALL_ROWS, fwd_keys=16, dq_keys=16, dkdv_keys=16, dkdv_rows=SMALL_ROWS)


def use_small_range_tiles(monkeypatch) -> None:
    """:data:`SMALL_TILES` for the range kernels, and compressed dK/dV work items of 12 query tokens (not a
    multiple of the tile), so every key tile is split over many items whose partials the reduce kernel sums."""
    monkeypatch.setattr(RA, "CONFIG_OVERRIDE", SMALL_TILES)
    monkeypatch.setattr(RA, "DKDV_QUERY_CHUNK", 12)
    monkeypatch.setattr(RA, "DKDV_MAX_CHUNKS", 10 ** 6)
