"""nsa_kernels: the NSA ops (compressed, selected and sliding-window attention, block selection).

Knows nothing of ranks or modules. Each public op has a plain-PyTorch reference
(:mod:`nsa_kernels.reference`, the ground truth) and a Triton kernel (:mod:`nsa_kernels.triton`) with the
same name and signature; the functions here pick one per call (:mod:`nsa_kernels.dispatch`): Triton for
CUDA tensors or under ``TRITON_INTERPRET=1``, else the reference; ``NSA_KERNELS_BACKEND`` or
:func:`use_backend` force either.
"""
from . import reference
from .dispatch import dispatching, selected_backend, use_backend
from .geometry import NSAGeometry
from .layout import (
    compressed_block_last_tokens,
    compressed_cu_seqlens,
    doc_local_positions,
    num_compressed_blocks,
    total_compressed_blocks,
    unfold_blocks,
)

compressed_attention = dispatching(reference.compressed_attention)
select_blocks = dispatching(reference.select_blocks)
selected_attention = dispatching(reference.selected_attention)
window_attention = dispatching(reference.window_attention)
nsa_attention = dispatching(reference.nsa_attention)
gate_combine = dispatching(reference.gate_combine)
block_max_logits = dispatching(reference.block_max_logits)

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "nsa_attention",
    "gate_combine",
    "block_max_logits",
    "use_backend",
    "NSAGeometry",
    "selected_backend",
    "compressed_block_last_tokens",
    "compressed_cu_seqlens",
    "doc_local_positions",
    "num_compressed_blocks",
    "total_compressed_blocks",
    "unfold_blocks",
]
