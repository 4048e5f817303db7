"""The training job's context-parallel group (shards batches along the sequence, sums losses and gradients) and
the switch that makes a model's attention layers context-parallel over it."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from ..attention import NativeSparseAttention
from ..models import DenseAttention, GPT
from ..parallel.sharding import CPLayout


class ContextParallelGroup:
    """One training process's view of its context-parallel group.

    Every rank sees the whole batch, keeps its :class:`CPLayout` shard of each sequence (:meth:`shard`), computes
    its share of the loss, and the group sums losses (:meth:`sum`) and parameter gradients
    (:meth:`sum_gradients`), so every rank takes the same optimizer step as one process on the whole batch.
    ``group=None`` is the single-process case, where every method is the identity.

    Args:
        group: the ``torch.distributed`` process group, or None.
        layout: ``"zigzag"`` or ``"contiguous"`` (the NSA layers' ``cp_layout``).
        select_len: the NSA selection block length ``l'`` (chunk lengths must be multiples of it).
    """

    def __init__(self, group=None, layout: str = "zigzag", select_len: int = 1):
        self.group, self.layout, self.select_len = group, layout, select_len
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``x [B, T, ...]`` along the sequence (dim 1): ``[B, T / P, ...]``."""
        if self.group is None:
            return x
        return CPLayout(self.world_size, x.shape[1], self.layout, self.select_len).shard(x, self.rank)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the group (in place), e.g. the ranks' loss shares."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the group in one all-reduce (a missing gradient counts as 0)."""
        if self.group is None:
            return
        params = list(parameters)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)


def use_context_parallel(model: GPT, group) -> None:
    """Make every attention layer of ``model`` (NSA or dense) context-parallel over ``group``; dense layers take
    the NSA layers' ``cp_layout`` (``model.nsa``), the layout batches are sharded in."""
    for module in model.modules():
        if isinstance(module, NativeSparseAttention):
            module.cp_group = group
        elif isinstance(module, DenseAttention):
            module.cp_group, module.cp_layout = group, model.config.nsa_config().cp_layout
