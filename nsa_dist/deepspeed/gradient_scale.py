"""The loss factor that keeps DeepSpeed's gradient reduction a sum over the ranks sharing one sequence under ZeRO-3.

Each of the ``S = sequence_parallel_size`` ranks sharing a sequence (context x Ulysses parallelism) back-propagates
its share of the batch's loss, so the true gradient is the *sum* of their gradients, averaged over the ``DP``
data-parallel replicas. DeepSpeed's ZeRO stages 0-2 reduce that way: they divide the summed gradients by
``DP x S / S``. Its ZeRO-3 reduce-scatter (``DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads``, the path of the
default ``zero_optimization.reduce_scatter: true``; checked on DeepSpeed 0.19.8) divides by the whole
sequence-data-parallel group, ``DP x S``: the gradient comes out ``S`` times too small. Under Adam that changes the
step only through ``eps``, but gradient clipping then clips a different norm, and the weights drift from a single
process's (a CP 2 run under ZeRO-3 was 5.1e-4 away after three steps with Adam's ``eps`` at 1e-2). Multiplying the
loss by ``S`` before ``engine.backward`` restores the sum; the logged loss is not scaled.

``reduce_scatter: false`` under ZeRO-3 takes a path that does divide by ``DP`` for buckets up to
``reduce_bucket_size`` and falls back to the reduce-scatter for larger ones, so no single factor is right there:
it is refused with sequence parallelism.
"""
from __future__ import annotations

from typing import Any, Dict


def sequence_parallel_loss_scale(ds_config: Dict[str, Any], sequence_size: int) -> int:
    """The factor for the loss before ``engine.backward`` under DeepSpeed config ``ds_config`` with
    ``sequence_size = cp * ulysses`` ranks per sequence: ``sequence_size`` under ZeRO-3 with sequence parallelism,
    else 1. ValueError naming ``zero_optimization.reduce_scatter`` when ZeRO-3 with sequence parallelism has it off
    (see the module docstring)."""
    zero = ds_config.get("zero_optimization", {}) or {}
    if sequence_size <= 1 or int(zero.get("stage", 0)) != 3:
        return 1
    if not zero.get("reduce_scatter", True):
        raise ValueError(f"zero_optimization.reduce_scatter=false is not supported under ZeRO-3 with "
                         f"sequence_parallel_size={sequence_size} (context x Ulysses ranks): DeepSpeed then averages "
                         "the gradients of the ranks sharing a sequence for some buckets and sums them for others; "
                         "leave reduce_scatter at its default, true")
    return sequence_size
