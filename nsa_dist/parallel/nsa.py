"""Context-parallel NSA: each rank computes the NSA output of its own query tokens, exchanging only what the
three branches need (DESIGN.md, "Context parallelism").

Per call, on every rank of the group:

0. agreement: one small all-gather checks that every rank was given the same sequence (layout, batch,
   cu_seqlens) and local rows (:func:`.agreement.check_same_sequence`);
1. compression: the raw compression-branch K/V of each local segment plus a halo of fewer than ``l`` tokens
   from earlier chunks go through the compressors; the owned compressed K/V (rotated at their blocks' last
   token) are all-gathered (``T/d`` rows in all), gradients reduce-scattered in backward;
2. compressed attention and top-n selection of the local queries against their documents' global compressed
   K/V (block numbers are document-relative, i.e. global), or by key bounds (``selection="key_bound"``: one
   all-reduce of the tiles' key minima and maxima, :mod:`.key_bounds`), or by each block's largest logit
   (``selection="max_logit"``: one all-gather of the raw selection keys, :mod:`.max_logits`);
3. selected attention against a compact key buffer per segment (:mod:`.selection`), whose rows come from a
   sparse fetch of exactly those rows (all-to-all) or from an all-gather of the raw selection K/V, whichever
   moves fewer bytes (``"auto"``, decided identically on all ranks) or as forced;
   with ``selection="all"`` (the full-selection warm-up) the selected branch is instead causal attention over
   the whole document (:func:`~.dense.allgather_dense_attention`, an all-gather of the raw selection K/V);
4. window attention with a halo of up to ``w - 1`` earlier tokens (possibly from several ranks);
5. the gated sum of the branches.

Overlap: the compression and window halos (and, when ``"allgather"`` is forced, the raw selection
all-gather) are started before any local compute; the compressed K/V all-gather runs while the window
branch computes. Backward exchanges run synchronously inside autograd.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

import nsa_kernels
from nsa_kernels import compressed_cu_seqlens
from nsa_kernels.validation import (check_attention_inputs, check_gates, check_non_negative_int,
                                    check_selection_geometry)

from .comm import (INDEX_BYTES, SMALL_INTS, ExchangePlan, Pending, all_gather_bytes, all_gather_rows,
                   encode_requests, fetch_rows, plan_by_request, plan_from_requests, row_bytes, start_all_gather,
                   start_fetch)
from .dense import allgather_dense_attention
from .geometry import (KeySegments, compressor_inputs, owned_compressed_rows, prefix_compressed_rows,
                       window_keys)
from .key_bounds import context_parallel_key_bound_blocks
from .max_logits import context_parallel_max_logit_blocks
from .rows import RowSource, remote_requests
from .segments import ShardedSequence
from .selection import CompactSelection, compact_selection
from .stats import CPStats

SELECTION_EXCHANGES = ("auto", "sparse", "allgather")
SELECTIONS = ("compressed", "key_bound", "max_logit", "all")


def check_selection_exchange(value: str, name: str = "selection_exchange") -> None:
    """``value`` must be one of :data:`SELECTION_EXCHANGES` (ValueError naming the argument ``name`` and value)."""
    if value not in SELECTION_EXCHANGES:
        raise ValueError(f"{name}={value!r} is not one of {SELECTION_EXCHANGES}")


class _Halo(NamedTuple):
    """A started fetch of rows every rank derives from the layout: plan, fetched positions, pending transfer."""
    plan: ExchangePlan
    positions: torch.Tensor
    pending: Pending


def _start_halo(shards: ShardedSequence, rank: int, halos: List[torch.Tensor], x: torch.Tensor, group) -> _Halo:
    """Start fetching the rows of ``halos[rank]`` (global positions) held by other ranks; ``halos[r]`` is rank
    ``r``'s list, which every rank computes the same way."""
    requests, mine = [], None
    for r, halo in enumerate(halos):
        positions, owner_rank, owner_row = remote_requests(shards, r, halo)
        requests.append((owner_rank, owner_row))
        if r == rank:
            mine = positions
    plan = plan_from_requests(requests, rank)
    return _Halo(plan, mine[plan.recv_order], start_fetch(x, plan, group))


def _finish_halo(shards: ShardedSequence, rank: int, x: torch.Tensor, halo: _Halo, group, stats: CPStats,
                 name: str) -> RowSource:
    """Wait for ``halo``, count its bytes as exchange ``name``, return this rank's rows plus the fetched ones."""
    fetched = fetch_rows(x, halo.plan, group, halo.pending)
    stats.add(name, *halo.plan.data_bytes(row_bytes(x)))
    return RowSource.local_and_fetched(shards, rank, x, fetched, halo.positions)


def _unique_remote_blocks(shards: ShardedSequence, rank: int, selection: CompactSelection, select_len: int) -> int:
    """Distinct selected blocks with at least one row on another rank."""
    starts = torch.unique(selection.block_starts)
    first, _ = shards.owner(starts)
    last, _ = shards.owner(starts + select_len - 1)  # a block straddles at most one chunk boundary
    return int(((first != rank) | (last != rank)).sum())


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


def _attend_selected(q, kv_s, block_idx, shards, rank, segments, select_len, scale, local_cu, exchange,
                     pending_gather, group, stats: CPStats) -> torch.Tensor:
    """Stage 3: selected attention of the local queries over ``block_idx`` against the compact key buffers."""
    selection = compact_selection(block_idx, segments, select_len)
    stats.unique_remote_blocks = _unique_remote_blocks(shards, rank, selection, select_len)
    source = _selection_source(shards, rank, kv_s, selection, exchange, pending_gather, group, stats)
    k_s, v_s = _split_kv(source.take(selection.keys.positions), q.shape[-1])
    return nsa_kernels.selected_attention(q, k_s, v_s, selection.block_idx, select_len, scale, local_cu,
                                          selection.keys.cu_seqlens_k)


def _attend_every_block(q, k_slc, v_slc, shards, group, scale, stats: CPStats) -> torch.Tensor:
    """The selected branch with every block selected: causal attention over the whole document (an all-gather
    of the raw selection K/V, counted as ``selection_kv``)."""
    stats.selection_path = "allgather"
    kv_bytes = row_bytes(k_slc[0]) + row_bytes(v_slc[0])
    stats.add("selection_kv", *all_gather_bytes([shards.local_len] * shards.world_size, kv_bytes))
    stats.add("agreement", *all_gather_bytes([SMALL_INTS] * shards.world_size, INDEX_BYTES))  # its own check
    return allgather_dense_attention(q, k_slc, v_slc, shards=shards, group=group, scale=scale)


def _check_group(shards: ShardedSequence, group, q: torch.Tensor, select_len: int, exchange: str) -> Tuple[int, int]:
    check_selection_exchange(exchange)
    rank = shards.rank_in(group, "context-parallel NSA", q)
    shards.layout.check_select_len(select_len)
    return rank, shards.world_size


def _compress(source: RowSource, inputs: KeySegments, owned: Tuple[torch.Tensor, ...], k_dim: int,
              compress_k: Callable, compress_v: Callable, rotary: Optional[Callable],
              position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """This rank's compressed K/V ``[n, H, Dk + Dv]`` (keys rotated): the compressors run on ``inputs``, one packed
    document per segment (halo + segment), whose blocks are the ``owned`` ones (rows, last-token document
    positions and global positions, from :func:`owned_compressed_rows`)."""
    k_in, v_in = _split_kv(source.take(inputs.positions), k_dim)
    k_own, v_own = compress_k(k_in, inputs.cu_seqlens_k), compress_v(v_in, inputs.cu_seqlens_k)
    rows, last_pos, last_global = owned
    if k_own.shape[1] != rows.numel() or v_own.shape[1] != rows.numel():
        raise ValueError(f"the compressors returned {k_own.shape[1]} / {v_own.shape[1]} blocks for inputs holding "
                         f"{rows.numel()} compressed blocks")
    if rotary is not None:
        device = k_own.device
        positions = last_pos.to(device) if position_ids is None else position_ids.reshape(-1)[last_global.to(device)]
        k_own = rotary(k_own, positions)
    return torch.cat([k_own[0], v_own[0]], dim=-1)


def _split_kv(kv: torch.Tensor, k_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[n, H, Dk + Dv]`` -> ``[1, n, H, Dk]``, ``[1, n, H, Dv]``."""
    k, v = kv[None].split([k_dim, kv.shape[-1] - k_dim], dim=-1)
    return k, v


def context_parallel_nsa(q: torch.Tensor, k_cmp_raw: torch.Tensor, v_cmp_raw: torch.Tensor, k_slc: torch.Tensor,
                         v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *,
                         shards: ShardedSequence, group, compress_k: Callable, compress_v: Callable,
                         rotary: Optional[Callable] = None, position_ids: Optional[torch.Tensor] = None,
                         block_len: int = 32, stride: int = 16, select_len: int = 64, top_n: int = 16,
                         window: int = 512, init_blocks: int = 1, local_blocks: int = 2,
                         scale: Optional[float] = None, selection_exchange: str = "auto",
                         selection: str = "compressed") -> Tuple[torch.Tensor, CPStats]:
    """NSA output of this rank's query tokens, equal to the single-rank ``nsa_attention`` rows of those tokens.

    Args:
        q: ``[1, B*T/P, HQ, Dk]`` local queries (flattened local rows of :class:`ShardedSequence` ``shards``),
            rotated as the caller wants.
        k_cmp_raw, v_cmp_raw: ``[1, B*T/P, H, Dk|Dv]`` raw (un-rotated, uncompressed) K/V of the compression
            branch.
        k_slc, v_slc, k_win, v_win: ``[1, B*T/P, H, Dk|Dv]`` K/V of the selection and window branches (keys
            rotated like q).
        gates: ``[1, B*T/P, HQ, 3]`` gate values (compressed, selected, window).
        shards: the layout of the packed global sequence over the group (global documents included).
        group: the context-parallel process group (``None``: the default group).
        compress_k, compress_v: ``phi(x [1, S, H, D], cu_seqlens [N+1]) -> [1, Nc, H, D]`` compressors with the
            semantics of :class:`nsa_dist.BlockCompressor` (blocks of each packed document, packed in order).
        rotary: optional ``rotary(x [1, n, H, Dk], positions [n]) -> rotated x`` applied to compressed keys
            at the position of each block's last token: its document position, or ``position_ids[...]`` of
            that token when ``position_ids`` (int ``[B*T]``, global packed) is given.
        block_len .. scale: the NSA geometry as in :func:`nsa_kernels.nsa_attention` (``window=0`` drops the
            window branch).
        selection_exchange: ``"auto"`` (fewer bytes, same choice on every rank), ``"sparse"`` or ``"allgather"``.
        selection: what picks the selected blocks: ``"compressed"`` (the paper's scores), ``"key_bound"``
            (:mod:`nsa_dist.key_bound_selection`, tiles of ``stride`` keys), ``"max_logit"``
            (:mod:`nsa_dist.max_logit_selection`) or ``"all"`` (every block: the
            selected branch is causal attention over the document, equal to ``top_n`` >= the number of blocks).
    Returns:
        ``o [1, B*T/P, HQ, Dv]`` in q's dtype and the call's :class:`CPStats` (also logged at debug level).
        Differentiable w.r.t. every tensor input and the compressors' and rotary's parameters; parameter
        gradients are this rank's share (all-reduce them over the group).
    """
    check_selection_geometry(block_len, stride, select_len, top_n, init_blocks, local_blocks)
    check_non_negative_int("window", window)
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not one of {SELECTIONS}")
    rank, P = _check_group(shards, group, q, select_len, selection_exchange)
    dims = check_attention_inputs(q, k_slc, v_slc, k_name="k_slc", v_name="v_slc")
    check_attention_inputs(q, k_win, v_win, k_name="k_win", v_name="v_win")
    check_attention_inputs(q, k_cmp_raw, v_cmp_raw, k_name="k_cmp_raw", v_name="v_cmp_raw")
    check_gates(gates, dims)
    if dims.B != 1 or dims.T != shards.local_len:
        raise ValueError(f"q has shape {tuple(q.shape)}: expected [1, B*T/P={shards.local_len}, HQ, Dk] (the "
                         f"flattened local rows of rank {rank})")
    device, Dk = q.device, dims.Dk
    stats = CPStats(rank, P)
    stats.add("agreement", *all_gather_bytes([SMALL_INTS] * P, INDEX_BYTES))  # rank_in's check_same_sequence
    segments = [shards.segments(r) for r in range(P)]
    local_cu = shards.local_cu_seqlens(rank, device)
    kv_c, kv_s = (torch.cat([k[0], v[0]], dim=-1) for k, v in ((k_cmp_raw, v_cmp_raw), (k_slc, v_slc)))

    # exchanges that depend on no local compute start first
    cmp_inputs = [compressor_inputs(segments[r], block_len, stride, device) for r in range(P)]
    cmp_halo = _start_halo(shards, rank, [c.halo for c in cmp_inputs], kv_c, group)
    if window > 0:
        kv_w = torch.cat([k_win[0], v_win[0]], dim=-1)
        win_keys = [window_keys(segments[r], window, device) for r in range(P)]
        win_halo = _start_halo(shards, rank, [w.halo for w in win_keys], kv_w, group)
    pending_gather = (start_all_gather(kv_s, [shards.local_len] * P, group)
                      if selection_exchange == "allgather" and selection != "all" else None)

    # 1. compress the owned blocks, then all-gather them
    source = _finish_halo(shards, rank, kv_c, cmp_halo, group, stats, "compression_halo")
    cmp_offsets = compressed_cu_seqlens(torch.tensor(shards.doc_bounds, dtype=torch.int32), block_len,
                                        stride).tolist()
    owned = [owned_compressed_rows(segments[r], cmp_offsets, block_len, stride) for r in range(P)]
    own = _compress(source, cmp_inputs[rank], owned[rank], Dk, compress_k, compress_v, rotary, position_ids)
    counts = [int(r.numel()) for r, _, _ in owned]
    pending_cmp = start_all_gather(own, counts, group)

    # 4. window branch while the compressed K/V travel
    if window > 0:
        source = _finish_halo(shards, rank, kv_w, win_halo, group, stats, "window_halo")
        k_w, v_w = _split_kv(source.take(win_keys[rank].positions), Dk)
        o_win = nsa_kernels.window_attention(q, k_w, v_w, window, scale, local_cu, win_keys[rank].cu_seqlens_k)

    # 2. compressed attention and selection against each document prefix [0, p1)
    gathered = all_gather_rows(own, counts, group, pending_cmp)
    stats.add("compressed_kv", *all_gather_bytes(counts, row_bytes(own)))
    gathered_row = torch.empty(cmp_offsets[-1], dtype=torch.long)
    gathered_row[torch.cat([r for r, _, _ in owned])] = torch.arange(sum(counts))
    prefix_rows, cu_cmp = prefix_compressed_rows(segments[rank], cmp_offsets, block_len, stride)
    k_cmp, v_cmp = _split_kv(gathered.index_select(0, gathered_row[prefix_rows].to(device)), Dk)
    cu_cmp = cu_cmp.to(device)
    o_cmp, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, block_len, stride, scale, local_cu, cu_cmp)
    if selection == "all":
        o_slc = _attend_every_block(q, k_slc, v_slc, shards, group, scale, stats)
    else:
        if selection == "key_bound":
            block_idx = context_parallel_key_bound_blocks(
                q, k_slc, shards=shards, rank=rank, group=group, select_len=select_len, tile_len=stride,
                top_n=top_n, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale or Dk ** -0.5,
                stats=stats)
        elif selection == "max_logit":
            block_idx = context_parallel_max_logit_blocks(
                q, k_slc, shards=shards, rank=rank, group=group, select_len=select_len, top_n=top_n,
                init_blocks=init_blocks, local_blocks=local_blocks, scale=scale or Dk ** -0.5, stats=stats)
        else:
            block_idx = nsa_kernels.select_blocks(q, k_cmp, lse, block_len, stride, select_len, top_n, init_blocks,
                                                  local_blocks, scale, local_cu, cu_cmp)
        # 3. selected attention against the compact key buffers
        o_slc = _attend_selected(q, kv_s, block_idx, shards, rank, segments[rank], select_len, scale, local_cu,
                                 selection_exchange, pending_gather, group, stats)

    # 5. gated sum
    o = nsa_kernels.gate_combine(gates, o_cmp, o_slc, o_win if window > 0 else None)
    stats.log()
    return o, stats
