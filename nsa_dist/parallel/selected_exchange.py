"""Stage 3 of context-parallel NSA: the selected blocks reach their queries, then selected attention.

Each local segment's selected blocks form a compact key buffer (:func:`~.key_geometry.compact_selection`). Its rows
come either from a sparse fetch of exactly the remote rows the rank needs (an all-to-all with a plan of row runs)
or from an all-gather of every rank's raw selection K/V, whichever moves fewer bytes summed over the group
(``"auto"``: one all-reduce of the request totals, so every rank decides the same), or as forced.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

import nsa_kernels

from .comm import (INDEX_BYTES, Pending, all_gather_bytes, all_gather_rows, encode_requests, fetch_rows,
                   plan_by_request, row_bytes)
from .key_geometry import CompactSelection, compact_selection
from .sharding import RowSource, ShardedSequence, remote_requests
from .stats import CPStats

SELECTION_EXCHANGES = ("auto", "sparse", "allgather")


def check_selection_exchange(value: str, name: str = "selection_exchange") -> None:
    """``value`` must be one of :data:`SELECTION_EXCHANGES` (ValueError naming the argument ``name`` and value)."""
    if value not in SELECTION_EXCHANGES:
        raise ValueError(f"{name}={value!r} is not one of {SELECTION_EXCHANGES}")


def cheaper_selection_path(rows_total: int, runs_total: int, bytes_per_row: int, world_size: int,
                           local_len: int) -> Tuple[str, int, int]:
    """The ``"auto"`` choice: ``(path, sparse_bytes, allgather_bytes)`` with the bytes summed over the group.

    The sparse fetch moves ``rows_total`` rows (the distinct remote rows every rank needs, summed over ranks)
    plus its plan (one count per rank pair and two int64 per run, ``runs_total`` runs in all); the all-gather
    moves every rank's ``local_len`` rows to each of the others. ``"allgather"`` iff it moves fewer bytes.
    """
    sparse = rows_total * bytes_per_row + INDEX_BYTES * (world_size * (world_size - 1) + 2 * runs_total)
    gather = world_size * (world_size - 1) * local_len * bytes_per_row
    return ("allgather" if gather < sparse else "sparse"), sparse, gather


def _unique_remote_blocks(shards: ShardedSequence, rank: int, selection: CompactSelection, select_len: int) -> int:
    """Distinct selected blocks with at least one row on another rank (a block may straddle several chunks when
    they are shorter than ``select_len``, as per-document chunks may be)."""
    starts = torch.unique(selection.block_starts)
    owners, _ = shards.owner(starts[:, None] + torch.arange(select_len, device=starts.device))
    return int((owners != rank).any(dim=1).sum())


def _selection_source(shards: ShardedSequence, rank: int, kv: torch.Tensor, selection: CompactSelection,
                      exchange: str, pending_gather: Optional[Pending], group, stats: CPStats) -> RowSource:
    """Rows for the compact selection buffers: a sparse fetch or an all-gather of ``kv [B*T/P, H, Dk+Dv]``."""
    P = shards.world_size
    positions, owner_rank, owner_row = remote_requests(shards, rank, selection.keys.halo)
    requests = encode_requests(owner_rank, owner_row, P)
    bytes_per_row = row_bytes(kv)
    counts = [shards.local_len] * P
    gather_bytes = all_gather_bytes(counts, bytes_per_row)
    if exchange == "auto":
        totals = torch.tensor([requests.num_rows, requests.num_runs], dtype=torch.long, device=kv.device)
        dist.all_reduce(totals, group=group)
        stats.add("selection_ids", 2 * INDEX_BYTES * (P - 1), 2 * INDEX_BYTES * (P - 1))
        exchange, stats.sparse_bytes_total, stats.allgather_bytes_total = cheaper_selection_path(
            *totals.tolist(), bytes_per_row, P, shards.local_len)
    stats.selection_path = exchange
    if exchange == "allgather":
        gathered = all_gather_rows(kv, counts, group, pending_gather)
        stats.add("selection_kv", *gather_bytes)
        return RowSource.gathered(shards, gathered)
    plan = plan_by_request(requests, group)
    stats.add("selection_ids", plan.setup_sent, plan.setup_received)
    fetched = fetch_rows(kv, plan, group)
    stats.add("selection_kv", *plan.data_bytes(bytes_per_row))
    return RowSource.local_and_fetched(shards, rank, kv, fetched, positions[plan.recv_order])


def attend_selected(q: torch.Tensor, kv_s: torch.Tensor, block_idx: torch.Tensor, *, shards: ShardedSequence,
                    rank: int, group, select_len: int, scale: Optional[float], local_cu: torch.Tensor,
                    exchange: str, pending_gather: Optional[Pending], stats: CPStats) -> torch.Tensor:
    """Selected attention of the local queries ``q [1, B*T/P, HQ, Dk]`` over ``block_idx [1, B*T/P, H, n]``
    (document-relative block numbers) against the compact key buffers, whose rows come from this rank's
    ``kv_s [B*T/P, H, Dk+Dv]`` and the exchange ``exchange`` (``pending_gather``: an all-gather of ``kv_s`` already
    started, for ``"allgather"``). Returns ``o [1, B*T/P, HQ, Dv]``; differentiable w.r.t. q and kv_s."""
    selection = compact_selection(block_idx, shards.segments(rank), select_len)
    stats.unique_remote_blocks = _unique_remote_blocks(shards, rank, selection, select_len)
    source = _selection_source(shards, rank, kv_s, selection, exchange, pending_gather, group, stats)
    k_s, v_s = split_kv(source.take(selection.keys.positions), q.shape[-1])
    return nsa_kernels.selected_attention(q, k_s, v_s, selection.block_idx, select_len, scale, local_cu,
                                          selection.keys.cu_seqlens_k)


def split_kv(kv: torch.Tensor, k_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[n, H, Dk + Dv]`` -> ``[1, n, H, Dk]``, ``[1, n, H, Dv]``."""
    k, v = kv[None].split([k_dim, kv.shape[-1] - k_dim], dim=-1)
    return k, v
