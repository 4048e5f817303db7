"""The training job's sequence-parallel groups, context-parallel and Ulysses (shards batches along the sequence,
sums losses and gradients), and the switch that makes a model's attention layers parallel over them."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from ..attention import NativeSparseAttention
from ..models import DenseAttention, GPT
from ..parallel.sharding import CPLayout
from ..parallel.ulysses import split_sequence


class ContextParallelGroup:
    """One training process's view of the ranks sharing its sequences: its context-parallel group of ``P`` ranks
    and its Ulysses group of ``U`` ranks (:mod:`nsa_dist.parallel.ulysses`; the grid of
    :class:`nsa_dist.deepspeed.ContextDataParallelGroups`).

    Every rank sees the whole batch, keeps its piece of each sequence (:meth:`shard`: its :class:`CPLayout` shard,
    then the Ulysses rank's contiguous ``1/U`` of it), computes its share of the loss, and the ``P * U`` ranks sum
    losses (:meth:`sum`) and parameter gradients (:meth:`sum_gradients`), so every rank takes the same optimizer
    step as one process on the whole batch. Both groups None is the single-process case, where every method is the
    identity.

    Args:
        group: the context-parallel ``torch.distributed`` process group, or None.
        layout: the NSA layers' ``cp_layout`` (``"zigzag"`` or ``"contiguous"``: the training job feeds whole rows, so its
            config refuses ``"per_document"``).
        select_len: the NSA selection block length ``l'`` (chunk lengths must be multiples of it).
        ulysses_group: the Ulysses process group, or None.
    """

    def __init__(self, group=None, layout: str = "zigzag", select_len: int = 1, ulysses_group=None):
        self.group, self.layout, self.select_len, self.ulysses_group = group, layout, select_len, ulysses_group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.ulysses_rank = dist.get_rank(ulysses_group) if ulysses_group is not None else 0
        self.ulysses_size = dist.get_world_size(ulysses_group) if ulysses_group is not None else 1

    @classmethod
    def of_grid(cls, groups, layout: str, select_len: int) -> "ContextParallelGroup":
        """The view of a rank of the ``DP x CP x U`` grid ``groups``
        (:class:`~nsa_dist.deepspeed.ContextDataParallelGroups`); a group of one rank is None."""
        return cls(groups.cp_group if groups.cp > 1 else None, layout, select_len,
                   ulysses_group=groups.ulysses_group if groups.ulysses > 1 else None)

    @property
    def sequence_rank(self) -> int:
        """The place of this rank's piece in the sequence's ``P * U`` pieces (0: the rank that reports)."""
        return self.rank * self.ulysses_size + self.ulysses_rank

    @property
    def sequence_size(self) -> int:
        """Ranks sharing every sequence, ``P * U``."""
        return self.world_size * self.ulysses_size

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``x [B, T, ...]`` along the sequence (dim 1): ``[B, T / (P * U), ...]``."""
        if self.group is not None:
            x = CPLayout(self.world_size, x.shape[1], self.layout, self.select_len).shard(x, self.rank)
        if self.ulysses_group is not None:
            x = split_sequence(x, self.ulysses_size, self.ulysses_rank)
        return x

    def _groups(self) -> list:
        return [g for g in (self.group, self.ulysses_group) if g is not None]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ``P * U`` ranks (in place; over each group in turn), e.g. the ranks' loss shares."""
        for group in self._groups():
            dist.all_reduce(x, group=group)
        return x

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ``P * U`` ranks in one flat buffer (a missing gradient counts as
        0)."""
        if not self._groups():
            return
        params = list(parameters)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)


def use_context_parallel(model: GPT, group, ulysses_group=None) -> None:
    """Make every attention layer of ``model`` (NSA or dense) context-parallel over ``group`` (None: not) and the
    NSA layers Ulysses-parallel over ``ulysses_group`` (dense attention has no Ulysses mode: ValueError); dense
    layers take the NSA layers' ``cp_layout`` (``model.nsa``), the layout batches are sharded in."""
    for module in model.modules():
        if isinstance(module, NativeSparseAttention):
            module.cp_group, module.ulysses_group = group, ulysses_group
        elif isinstance(module, DenseAttention):
            if ulysses_group is not None:
                raise ValueError("Ulysses parallelism (train.ulysses > 1) applies to NSA attention only; dense "
                                 "attention shards the sequence with train.cp")
            module.cp_group, module.cp_layout = group, model.config.nsa_config().cp_layout
