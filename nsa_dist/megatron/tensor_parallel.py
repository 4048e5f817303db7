"""Tensor-parallel pieces megatron-core lacks: parameters replicated over TP ranks that see different heads
(compressors; K/V projections when TP exceeds the KV heads), and process-group lookup across versions."""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region


def process_groups(pg_collection=None, model_comm_pgs=None) -> Tuple[object, object]:
    """``(tp_group, cp_group)`` from ``pg_collection`` (megatron-core >= 0.15), ``model_comm_pgs`` (0.14) or,
    when neither is given, ``parallel_state``."""
    pgs = pg_collection if pg_collection is not None else model_comm_pgs
    tp = getattr(pgs, "tp", None) if pgs is not None else None
    cp = getattr(pgs, "cp", None) if pgs is not None else None
    tp = tp if tp is not None else parallel_state.get_tensor_model_parallel_group()
    cp = cp if cp is not None else parallel_state.get_context_parallel_group()
    return tp, cp


def replicate_over_tp(params: Iterable[torch.nn.Parameter], tp_group) -> None:
    """Keep ``params`` identical on every rank of ``tp_group`` although each rank uses them on its own heads:
    broadcast them from the group's first rank now, and sum each gradient over the group as autograd produces
    it (a tensor hook, so Megatron's DDP and plain ``.grad`` both see the full gradient). No-op for TP = 1."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    src = dist.get_global_rank(tp_group, 0)
    for p in params:
        with torch.no_grad():
            dist.broadcast(p.data, src=src, group=tp_group)
        p.register_hook(_sum_over(tp_group))


def _sum_over(group) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad
    return hook


class KVHeadReplicatedLinear(torch.nn.Module):
    """The K/V projection when tensor parallelism exceeds the KV heads (``TP % H == 0``, ``TP > H``).

    The weight ``[H * out_per_head, in]`` (head-major, like the column-parallel layout) is replicated on every TP
    rank; rank ``r`` computes only KV head ``r // (TP / H)``, the head of its query heads, and the gradient is
    summed over the group (:func:`replicate_over_tp`). ``forward(x [s(/TP), b, in]) -> ([s, b, out_per_head],
    None)``: under sequence parallelism the input shard is all-gathered first, as a column-parallel linear does.
    """

    def __init__(self, input_size: int, num_heads: int, out_per_head: int, *, config, init_method: Callable,
                 bias: bool, tp_group):
        super().__init__()
        tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        if tp % num_heads:
            raise ValueError(f"tensor_model_parallel_size={tp} must be a multiple of num_query_groups={num_heads} "
                             f"when it exceeds it (each rank needs one whole KV head)")
        self.head, self.out_per_head, self.tp_group = rank // (tp // num_heads), out_per_head, tp_group
        self.sequence_parallel = config.sequence_parallel
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(num_heads * out_per_head, input_size, device=device,
                                                     dtype=config.params_dtype))
        init_method(self.weight)
        self.bias = (torch.nn.Parameter(torch.zeros(num_heads * out_per_head, device=device,
                                                    dtype=config.params_dtype)) if bias else None)
        replicate_over_tp(self.parameters(), tp_group)

    def forward(self, x: torch.Tensor):
        """``x [s(/TP), b, in]`` -> ``([s, b, out_per_head], None)`` for this rank's KV head."""
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        rows = slice(self.head * self.out_per_head, (self.head + 1) * self.out_per_head)
        return F.linear(x, self.weight[rows], None if self.bias is None else self.bias[rows]), None
