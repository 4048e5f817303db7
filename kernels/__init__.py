"""nsa_kernels: the NSA ops (compressed, selected and sliding-window attention, block selection).

Knows nothing of ranks or modules. Today every op is the plain-PyTorch reference
(:mod:`nsa_kernels.reference`); Triton kernels with the same names and signatures take over for
CUDA tensors as they land.
"""
from .layout import (
    compressed_block_last_tokens,
    compressed_cu_seqlens,
    doc_local_positions,
    num_compressed_blocks,
    total_compressed_blocks,
    unfold_blocks,
)
from .reference import compressed_attention, nsa_attention, select_blocks, selected_attention, window_attention

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "nsa_attention",
    "compressed_block_last_tokens",
    "compressed_cu_seqlens",
    "doc_local_positions",
    "num_compressed_blocks",
    "total_compressed_blocks",
    "unfold_blocks",
]
