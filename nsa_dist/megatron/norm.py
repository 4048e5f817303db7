"""A torch LayerNorm / RMSNorm for Megatron specs that also works under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` (its norm without Transformer Engine or apex) refuses
``sequence_parallel=True``. Under sequence parallelism each TP rank normalises only its sequence shard, so the norm
weights' gradients are partial; Megatron sums gradients of parameters marked ``sequence_parallel`` over the TP group
in ``finalize_model_grads``. This norm marks its parameters so and is otherwise torch's.
"""
from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """``SequenceParallelTorchNorm(config, hidden_size, eps)`` -> ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm``
    (``config.normalization``) whose parameters carry ``sequence_parallel = config.sequence_parallel``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization={config.normalization!r} is not one of {sorted(kinds)}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma needs Transformer Engine or apex norms")
        norm = kinds[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
