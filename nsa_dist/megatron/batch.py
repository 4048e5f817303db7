"""Batches under Megatron context parallelism: megatron-core's split of a batch over the CP ranks (zigzag for
unpacked batches, per document for packed ``thd`` ones) and packed-sequence boundaries."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..parallel import CPLayout
from .config import megatron_layout_kind


# packed-sequence metadata that megatron-core's thd split leaves whole (Megatron-LM's batches may hold it as [1, n])
PACKED_METADATA = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")


def megatron_cp_layout(world_size: int, seq_len: int, select_len: int,
                       cu_seqlens: Optional[torch.Tensor] = None) -> CPLayout:
    """The :class:`CPLayout` megatron-core's own batch split produces over ``world_size`` CP ranks for a sequence
    of ``seq_len`` tokens (:func:`~.config.megatron_layout_kind`): zigzag for unpacked batches (``cu_seqlens``
    None; chunks of ``seq_len / 2CP`` tokens, multiples of ``select_len``), else per_document bound to the global
    ``cu_seqlens`` (packed ``thd``: every document in ``2CP`` chunks)."""
    kind = megatron_layout_kind(packed=cu_seqlens is not None)
    return CPLayout(world_size, seq_len, kind, select_len).with_documents(cu_seqlens)


def split_batch_for_cp_rank(batch: Dict[str, Optional[torch.Tensor]], select_len: int = 64, cp_group=None,
                            packed_seq_params=None) -> Dict[str, Optional[torch.Tensor]]:
    """This context-parallel rank's part of a batch, split as megatron-core splits it (:func:`megatron_cp_layout`).

    Every tensor with a sequence dim (``[b, s, ...]``, e.g. tokens, labels, loss_mask, position_ids) is split along
    dim 1: without ``packed_seq_params`` into ``2 * CP`` chunks of which rank ``r`` keeps ``r`` and ``2 * CP - 1 -
    r`` (megatron-core's ``get_batch_on_this_cp_rank``); with a ``thd`` ``packed_seq_params`` (``b = 1``) every
    document of its padded offsets (``cu_seqlens_q_padded``, else ``cu_seqlens_q``; each length divisible by
    ``2 * CP``) is cut into ``2 * CP`` chunks and rank ``r`` keeps chunks ``r`` and ``2 * CP - 1 - r`` of each,
    document after document (megatron-core's ``get_thd_batch_on_this_cp_rank``). Tensors of fewer dims (``None``,
    scalars) and the packed metadata of :data:`PACKED_METADATA` (as megatron-core) pass unchanged:
    ``packed_seq_params`` stays global. The NSA layer expects exactly this split (it picks the same layout from
    ``packed_seq_params``).

    Args:
        batch: name -> ``[b, s, ...]`` tensor (or anything else, passed through).
        select_len: NSA's selection block length ``l'``; unpacked, ``s / (2 * CP)`` must be a multiple of it.
        cp_group: the context-parallel group (default: ``parallel_state.get_context_parallel_group()``).
        packed_seq_params: megatron-core's ``PackedSeqParams`` of a packed batch, or None.
    """
    group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
    P = dist.get_world_size(group)
    cu_seqlens = cu_seqlens_from_packed_seq_params(packed_seq_params)
    if P == 1:
        return dict(batch)
    rank = dist.get_rank(group)
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and name not in PACKED_METADATA:
            out[name] = megatron_cp_layout(P, value.shape[1], select_len, cu_seqlens).shard(value, rank, dim=1)
        else:
            out[name] = value
    return out


def cu_seqlens_from_packed_seq_params(packed_seq_params) -> Optional[torch.Tensor]:
    """Global int32 ``cu_seqlens`` of a ``thd`` ``PackedSeqParams`` (its padded offsets when given), or None
    without packing. Query and key offsets must agree (self-attention)."""
    if packed_seq_params is None:
        return None
    fmt = getattr(packed_seq_params, "qkv_format", "thd")
    if fmt != "thd":
        raise ValueError(f"PackedSeqParams.qkv_format={fmt!r}: the NSA layer takes packed sequences as 'thd'")
    q = packed_seq_params.cu_seqlens_q_padded
    q = packed_seq_params.cu_seqlens_q if q is None else q
    k = packed_seq_params.cu_seqlens_kv_padded
    k = packed_seq_params.cu_seqlens_kv if k is None else k
    if q is None:
        raise ValueError("PackedSeqParams has no cu_seqlens_q")
    if k is not None and not torch.equal(q.to(k.device), k):
        raise ValueError(f"self-attention needs the same query and key document offsets, got cu_seqlens_q "
                         f"{q.tolist()} and cu_seqlens_kv {k.tolist()}")
    return q.to(torch.int32)
