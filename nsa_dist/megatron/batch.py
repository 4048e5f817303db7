"""Batches under Megatron context parallelism: the zigzag split and packed-sequence boundaries."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..parallel import CPLayout


def get_batch_on_this_cp_rank(batch: Dict[str, Optional[torch.Tensor]], select_len: int = 64,
                              cp_group=None) -> Dict[str, Optional[torch.Tensor]]:
    """This context-parallel rank's part of a batch, in Megatron's zigzag layout.

    Every tensor with a sequence dim (``[b, s, ...]``, e.g. tokens, labels, loss_mask, position_ids) is cut into
    ``2 * CP`` chunks along dim 1 and rank ``r`` keeps chunks ``r`` and ``2 * CP - 1 - r``: the split of
    megatron's ``get_batch_on_this_cp_rank`` for ``sbhd``. Tensors of fewer dims (``None``, scalars, ``cu_seqlens``)
    pass unchanged: for packed (``thd``) batches the whole packed sequence is split this way and ``cu_seqlens``
    stays global (not Transformer Engine's per-document split).

    Args:
        batch: name -> ``[b, s, ...]`` tensor (or anything else, passed through).
        select_len: NSA's selection block length ``l'``; ``s / (2 * CP)`` must be a multiple of it.
        cp_group: the context-parallel group (default: ``parallel_state.get_context_parallel_group()``).
    """
    group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
    P = dist.get_world_size(group)
    if P == 1:
        return dict(batch)
    rank = dist.get_rank(group)
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            out[name] = CPLayout(P, value.shape[1], "zigzag", select_len).shard(value, rank, dim=1)
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
