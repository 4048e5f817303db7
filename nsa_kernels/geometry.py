"""``NSAGeometry``: the NSA hyper-parameters of one call, as one frozen value (the softmax scale travels beside it,
resolved per call by :func:`nsa_kernels.reference.tiles.default_scale`)."""
from __future__ import annotations

from typing import NamedTuple

from .validation import check_non_negative_int, check_selection_geometry


class NSAGeometry(NamedTuple):
    """Compression block ``l`` and stride ``d``, selection block ``l'``, blocks per query ``n``, window ``w``
    (0: no window branch), forced leading and most recent blocks (as :func:`nsa_kernels.nsa_attention` takes
    them)."""
    block_len: int
    stride: int
    select_len: int
    top_n: int
    window: int
    init_blocks: int
    local_blocks: int

    def checked(self) -> "NSAGeometry":
        """This geometry after :func:`~nsa_kernels.validation.check_selection_geometry` and a non-negative window
        (ValueError naming the offending value)."""
        check_selection_geometry(self.block_len, self.stride, self.select_len, self.top_n, self.init_blocks,
                                 self.local_blocks)
        check_non_negative_int("window", self.window)
        return self
