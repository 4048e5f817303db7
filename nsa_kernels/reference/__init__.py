"""Plain-PyTorch reference of every NSA branch: the ground truth the Triton kernels are tested against.

All ops take ``[B, T, heads, dim]`` tensors, optional packed-document ``cu_seqlens`` and (the four branch
ops) optional key segments ``cu_seqlens_k``; see each function's docstring and DESIGN.md for the exact
semantics.
"""
from .block_max import block_max_logits
from .compressed import compressed_attention
from .gate_combine import gate_combine
from .nsa import nsa_attention
from .selected import selected_attention
from .selection import overlap_weights, select_blocks
from .window import window_attention

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "nsa_attention",
    "gate_combine",
    "overlap_weights",
    "block_max_logits",
]
