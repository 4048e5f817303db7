"""Ulysses sequence parallelism for NSA: an all-to-all over heads around the branch computation.

The ``U`` ranks of a Ulysses group each hold ``1/U`` of the rows of one sequence (contiguous pieces, rank ``u``
the ``u``-th: :func:`split_sequence`). After the projections, :func:`sequence_to_heads` trades those pieces for
heads: every rank receives all ``U`` pieces (the whole sequence, in order) for its share of the heads; NSA then runs
on whole sequences with local heads, and :func:`heads_to_sequence` trades the output back. Heads move in GQA
groups (query head ``hq`` and its gates go with KV head ``hq // G``), contiguously:

- ``U <= H`` (``U`` divides ``H``): rank ``u`` computes KV heads ``u*H/U .. (u+1)*H/U - 1`` and their query heads
  ``u*HQ/U .. (u+1)*HQ/U - 1``.
- ``U > H`` (``H`` divides ``U``): each GQA group is replicated on ``U/H`` consecutive ranks, as DeepSpeed's ALST
  replicates KV heads; rank ``u`` receives KV head ``u // (U/H)`` *with its whole group's* ``G`` query heads and
  gates, computes the group, and keeps the output of its own ``HQ/U`` query heads (``u*HQ/U ..``). NSA picks the
  selected blocks once per group from the summed scores of all its ``G`` query heads, so a rank holding only
  ``HQ/U`` of them would pick other blocks. The cost: the attention of each group is computed ``U/H`` times (per
  rank ``G`` query heads instead of ``HQ/U``), and the all-to-all carries ``U/H`` copies of q, the gates and the K/V
  (the discarded heads' outputs get no gradient, the replicas' input gradients sum in backward).

Composed with context parallelism, the Ulysses group sits inside a context-parallel shard: the ``U`` ranks of one
group split that shard (in its ``cp_layout`` order), the all-to-all reassembles it, and the context-parallel
exchange then runs over the ranks holding the same heads (one per shard), as on a sequence of ``T / P`` rows.

The collective is torch's differentiable ``all_to_all_single_autograd`` of
``torch.distributed._functional_collectives`` (its backward is the reverse all-to-all; torch deprecates the older
``torch.distributed.nn.functional.all_to_all_single`` in its favour). DeepSpeed's ``_SeqAllToAll`` (under
``DistributedAttention``) is not used: it dispatches through ``deepspeed.comm`` (an optional dependency the plain
trainer and the Megatron layer do not initialise), refuses fewer KV heads than ranks instead of replicating them,
moves K/V only with the query heads' split (NSA's group-shared selection needs whole groups), and its uneven-head
path reads DeepSpeed's global sequence-parallel rank, which is not the Ulysses rank when the group sits inside
context parallelism. ALST's ``UlyssesSPAttentionHF`` replicates KV heads but is bound to Hugging Face attention
modules. One all-to-all carries q, every branch's K/V
and the gates together (packed per destination rank), one brings the output back.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .stats import UlyssesStats


def ulysses_local_heads(num_heads: int, num_kv_heads: int, size: int, setting: str = "Ulysses size") \
        -> Tuple[int, int]:
    """``(HQ/U, max(1, H/U))``: the query heads whose output each of ``size = U`` Ulysses ranks returns and the KV
    heads it holds (with ``U > H`` it computes the ``G`` query heads of its replicated group).

    Raises ValueError naming ``setting`` and the numbers unless ``U`` divides ``num_heads`` (each rank needs whole
    query heads) and ``U`` divides ``num_kv_heads`` or ``num_kv_heads`` divides ``U`` (KV heads split evenly, or
    each replicated on ``U / H`` ranks)."""
    if num_heads % size:
        raise ValueError(f"{setting}={size} must divide num_heads={num_heads}: each of the {size} ranks computes "
                         f"num_heads / {size} whole query heads")
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(f"{setting}={size} and num_kv_heads={num_kv_heads}: one must divide the other (a divisor "
                         f"splits the KV heads over the ranks, a multiple replicates each KV head on {setting} / "
                         "num_kv_heads ranks)")
    return num_heads // size, max(1, num_kv_heads // size)


def split_sequence(x: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``x [B, S, ...]`` among ``size`` Ulysses ranks: rows ``rank*S/size ..`` of dim 1
    (ValueError naming the numbers unless ``size`` divides ``S``)."""
    if x.shape[1] % size:
        raise ValueError(f"a sequence (shard) of {x.shape[1]} rows does not split over {size} Ulysses ranks: its "
                         f"length must be a multiple of {size}")
    return x.chunk(size, dim=1)[rank]


def sequence_to_heads(tensors: Sequence[torch.Tensor], num_kv_heads: int, group,
                      stats: Optional[UlyssesStats] = None) -> List[torch.Tensor]:
    """Trade sequence pieces for heads over the Ulysses ``group`` of ``U`` ranks, differentiably.

    Args:
        tensors: ``[B, S, N_i, D_i]`` this rank's ``S`` rows of each tensor, all in one dtype, heads in GQA groups
            of ``num_kv_heads`` = ``H`` KV heads (``N_i`` a multiple of ``H``: ``HQ`` for q and the gates, ``H``
            for a branch's K/V); ``U`` divides ``H`` or ``H`` divides ``U`` (:func:`ulysses_local_heads`).
        group: the Ulysses process group; rank ``u`` holds the ``u``-th piece of the sequence.
        stats: counts the bytes as exchange ``to_heads``.
    Returns:
        ``[B, U*S, N_i * max(1, H/U) / H, D_i]`` per tensor: the whole sequence (pieces in rank order) for this
        rank's GQA groups (``u*H/U ..``; with ``U > H`` the one group ``u // (U/H)``, replicated).
    """
    size = dist.get_world_size(group)
    B, S = tensors[0].shape[:2]
    grouped = [t.reshape(B, S, num_kv_heads, -1) for t in tensors]  # [B, S, H, heads per group * D]
    if num_kv_heads < size:
        grouped = [t.repeat_interleave(size // num_kv_heads, dim=2) for t in grouped]
    widths = [t.shape[2] // size * t.shape[3] for t in grouped]
    packed = torch.cat([t.reshape(B, S, size, w) for t, w in zip(grouped, widths)], dim=-1)
    received = _exchange(packed.permute(2, 0, 1, 3), group, stats, "to_heads")  # [source rank, B, S, F]
    whole = received.transpose(0, 1).reshape(B, size * S, sum(widths))
    return [part.unflatten(-1, (-1, t.shape[3])) for t, part in zip(tensors, whole.split(widths, -1))]


def heads_to_sequence(x: torch.Tensor, num_kv_heads: int, group, stats: Optional[UlyssesStats] = None) \
        -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads` for the attention output ``x [B, U*S, n, D]`` (the whole sequence,
    this rank's heads) -> ``[B, S, HQ, D]`` (this rank's rows, all ``HQ = U * n`` heads, or ``U * n * H / U`` with
    replicated groups); bytes counted as exchange ``to_sequence``. With ``U > H = num_kv_heads`` ``x`` holds the
    whole replicated group and only this rank's ``n * H / U`` query heads of it are sent."""
    size = dist.get_world_size(group)
    if num_kv_heads < size:
        replicas = size // num_kv_heads
        x = x.chunk(replicas, dim=2)[dist.get_rank(group) % replicas]
    B, _, n, D = x.shape
    pieces = x.unflatten(1, (size, -1)).transpose(0, 1)  # [destination rank, B, S, n, D]
    received = _exchange(pieces, group, stats, "to_sequence")  # [source rank = head block, B, S, n, D]
    return received.permute(1, 2, 0, 3, 4).reshape(B, -1, size * n, D)


def _exchange(x: torch.Tensor, group, stats: Optional[UlyssesStats], name: str) -> torch.Tensor:
    """Differentiable all-to-all of ``x [U, ...]`` (slice ``r`` goes to rank ``r``; slice ``r`` of the result came
    from rank ``r``), its bytes counted in ``stats`` under ``name``."""
    x = x.contiguous()
    if stats is not None:
        moved = x.numel() // x.shape[0] * (x.shape[0] - 1) * x.element_size()
        stats.add(name, moved, moved)
    return all_to_all_single_autograd(x, None, None, group)
