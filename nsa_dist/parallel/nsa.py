"""Context-parallel NSA: each rank computes the NSA output of its own query tokens, exchanging only what the
three branches need (DESIGN.md, "Context parallelism").

:func:`context_parallel_nsa` runs these stages on every rank of the group, in this order:

0. agreement: one small all-gather checks that every rank was given the same sequence (layout, batch,
   cu_seqlens) and local rows (:func:`.sharding.check_same_sequence`); then the exchanges that need no local
   compute start (:func:`_start_exchanges`: the compression and window halos and, when ``"allgather"`` is
   forced, the raw selection K/V);
1. compress and gather (:func:`_compress_and_gather`): the raw compression-branch K/V of each local segment plus
   a halo of fewer than ``l`` tokens from earlier chunks go through the compressors; the owned compressed K/V
   (rotated at their blocks' last token) are all-gathered (``T/d`` rows in all), gradients reduce-scattered in
   backward;
2. window (:func:`_window_branch`, while the compressed K/V travel): window attention with a halo of up to
   ``w - 1`` earlier tokens (possibly from several ranks);
3. compressed attention, then score and select (:func:`_score_and_select`): the local queries against their
   documents' global compressed K/V (block numbers are document-relative, i.e. global), or by the selected
   branch's own logits (:mod:`.scoring`: key bounds, one all-reduce of the tiles' key minima and maxima, or exact
   block maxima, one all-gather of the raw selection keys);
4. fetch the selected blocks and attend (:func:`.selected_exchange.attend_selected`): a compact key buffer per
   segment whose rows come from a sparse fetch or an all-gather of the raw selection K/V; with
   ``selection="all"`` (the full-selection warm-up) the selected branch is instead causal attention over the
   whole document (:func:`~.dense.allgather_dense_attention`);
5. combine: the gated sum of the branches.

Backward exchanges run synchronously inside autograd.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

import nsa_kernels
from nsa_kernels import NSAGeometry, compressed_cu_seqlens
from nsa_kernels.validation import check_attention_inputs, check_gates

from ..branch_kv import BranchKV
from .comm import (INDEX_BYTES, SMALL_INTS, ExchangePlan, Pending, all_gather_bytes, all_gather_rows, fetch_rows,
                   plan_from_requests, row_bytes, start_all_gather, start_fetch)
from .dense import allgather_dense_attention
from .key_geometry import (KeySegments, compressor_inputs, owned_compressed_rows, prefix_compressed_rows,
                           window_keys)
from .scoring import context_parallel_key_bound_blocks, context_parallel_max_logit_blocks
from .selected_exchange import attend_selected, check_selection_exchange, split_kv
from .sharding import RowSource, Segment, ShardedSequence, remote_requests
from .stats import CPStats

SELECTIONS = ("compressed", "key_bound", "max_logit", "all")


class _Call(NamedTuple):
    """Where one call runs: the sharded sequence, this rank, the group, every rank's segments, this rank's
    local ``cu_seqlens`` (its segments as packed documents), the call's statistics, and the softmax scale."""
    shards: ShardedSequence
    rank: int
    group: object
    segments: List[List[Segment]]
    local_cu: torch.Tensor
    stats: CPStats
    scale: Optional[float]

    @property
    def device(self) -> torch.device:
        return self.local_cu.device


class _Halo(NamedTuple):
    """A started fetch of rows every rank derives from the layout: plan, fetched positions, pending transfer."""
    plan: ExchangePlan
    positions: torch.Tensor
    pending: Pending


class _Started(NamedTuple):
    """The exchanges stage 0 starts: the compression and window halos (None without a window) and the raw
    selection K/V all-gather (None unless forced)."""
    cmp_inputs: List[KeySegments]
    cmp_halo: _Halo
    win_keys: Optional[List[KeySegments]]
    win_halo: Optional[_Halo]
    selection_gather: Optional[Pending]


def _start_halo(call: _Call, halos: List[torch.Tensor], x: torch.Tensor) -> _Halo:
    """Start fetching the rows of ``halos[rank]`` (global positions) held by other ranks; ``halos[r]`` is rank
    ``r``'s list, which every rank computes the same way."""
    requests, mine = [], None
    for r, halo in enumerate(halos):
        positions, owner_rank, owner_row = remote_requests(call.shards, r, halo)
        requests.append((owner_rank, owner_row))
        if r == call.rank:
            mine = positions
    plan = plan_from_requests(requests, call.rank)
    return _Halo(plan, mine[plan.recv_order], start_fetch(x, plan, call.group))


def _finish_halo(call: _Call, x: torch.Tensor, halo: _Halo, name: str) -> RowSource:
    """Wait for ``halo``, count its bytes as exchange ``name``, return this rank's rows plus the fetched ones."""
    fetched = fetch_rows(x, halo.plan, call.group, halo.pending)
    call.stats.add(name, *halo.plan.data_bytes(row_bytes(x)))
    return RowSource.local_and_fetched(call.shards, call.rank, x, fetched, halo.positions)


def _check_call(q: torch.Tensor, kv: BranchKV, gates: torch.Tensor, shards: ShardedSequence, group,
                geo: NSAGeometry, scale: Optional[float], selection_exchange: str, selection: str) -> _Call:
    """Stage 0's checks (every rank raises the same errors, before any exchange of the NSA itself)."""
    geo.checked()
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is not one of {SELECTIONS}")
    check_selection_exchange(selection_exchange)
    rank = shards.rank_in(group, "context-parallel NSA", q)
    shards.layout.check_select_len(geo.select_len)
    dims = check_attention_inputs(q, kv.k_slc, kv.v_slc, k_name="k_slc", v_name="v_slc")
    check_attention_inputs(q, kv.k_win, kv.v_win, k_name="k_win", v_name="v_win")
    check_attention_inputs(q, kv.k_cmp_raw, kv.v_cmp_raw, k_name="k_cmp_raw", v_name="v_cmp_raw")
    check_gates(gates, dims)
    if dims.B != 1 or dims.T != shards.local_len:
        raise ValueError(f"q has shape {tuple(q.shape)}: expected [1, B*T/P={shards.local_len}, HQ, Dk] (the "
                         f"flattened local rows of rank {rank})")
    P = shards.world_size
    stats = CPStats(rank, P)
    stats.add("agreement", *all_gather_bytes([SMALL_INTS] * P, INDEX_BYTES))  # rank_in's check_same_sequence
    return _Call(shards, rank, group, [shards.segments(r) for r in range(P)],
                 shards.local_cu_seqlens(rank, q.device), stats, scale)


def _start_exchanges(call: _Call, geo: NSAGeometry, kv_c: torch.Tensor, kv_w: Optional[torch.Tensor],
                     kv_s: torch.Tensor, gather_selection: bool) -> _Started:
    """Stage 0: start the exchanges that depend on no local compute."""
    P, device = call.shards.world_size, call.device
    cmp_inputs = [compressor_inputs(call.segments[r], geo.block_len, geo.stride, device) for r in range(P)]
    cmp_halo = _start_halo(call, [c.halo for c in cmp_inputs], kv_c)
    win_keys = win_halo = None
    if kv_w is not None:
        win_keys = [window_keys(call.segments[r], geo.window, device) for r in range(P)]
        win_halo = _start_halo(call, [w.halo for w in win_keys], kv_w)
    gather = start_all_gather(kv_s, [call.shards.local_len] * P, call.group) if gather_selection else None
    return _Started(cmp_inputs, cmp_halo, win_keys, win_halo, gather)


def _compress(source: RowSource, inputs: KeySegments, owned: Tuple[torch.Tensor, ...], k_dim: int,
              compress_k: Callable, compress_v: Callable, rotary: Optional[Callable],
              position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """This rank's compressed K/V ``[n, H, Dk + Dv]`` (keys rotated): the compressors run on ``inputs``, one packed
    document per segment (halo + segment), whose blocks are the ``owned`` ones (rows, last-token document
    positions and global positions, from :func:`owned_compressed_rows`)."""
    k_in, v_in = split_kv(source.take(inputs.positions), k_dim)
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


class _Compressed(NamedTuple):
    """Stage 1's result: this rank's compressed rows, every rank's owned rows and their counts, the all-gather in
    flight and the document offsets of the compressed rows."""
    own: torch.Tensor
    owned: List[Tuple[torch.Tensor, ...]]
    counts: List[int]
    pending: Pending
    cmp_offsets: List[int]


def _compress_and_gather(call: _Call, geo: NSAGeometry, kv_c: torch.Tensor, started: _Started, k_dim: int,
                         compress_k: Callable, compress_v: Callable, rotary: Optional[Callable],
                         position_ids: Optional[torch.Tensor]) -> _Compressed:
    """Stage 1: compress the blocks this rank owns, then start their all-gather."""
    source = _finish_halo(call, kv_c, started.cmp_halo, "compression_halo")
    cmp_offsets = compressed_cu_seqlens(torch.tensor(call.shards.doc_bounds, dtype=torch.int32), geo.block_len,
                                        geo.stride).tolist()
    owned = [owned_compressed_rows(segs, cmp_offsets, geo.block_len, geo.stride) for segs in call.segments]
    own = _compress(source, started.cmp_inputs[call.rank], owned[call.rank], k_dim, compress_k, compress_v, rotary,
                    position_ids)
    counts = [int(r.numel()) for r, _, _ in owned]
    return _Compressed(own, owned, counts, start_all_gather(own, counts, call.group), cmp_offsets)


def _finish_gather(call: _Call, geo: NSAGeometry, compressed: _Compressed,
                   k_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The end of stage 1: every local segment's document prefix of compressed K/V, ``(k_cmp, v_cmp, cu_cmp)``."""
    own, owned, counts = compressed.own, compressed.owned, compressed.counts
    gathered = all_gather_rows(own, counts, call.group, compressed.pending)
    call.stats.add("compressed_kv", *all_gather_bytes(counts, row_bytes(own)))
    gathered_row = torch.empty(compressed.cmp_offsets[-1], dtype=torch.long)
    gathered_row[torch.cat([r for r, _, _ in owned])] = torch.arange(sum(counts))
    prefix_rows, cu_cmp = prefix_compressed_rows(call.segments[call.rank], compressed.cmp_offsets, geo.block_len,
                                                 geo.stride)
    k_cmp, v_cmp = split_kv(gathered.index_select(0, gathered_row[prefix_rows].to(call.device)), k_dim)
    return k_cmp, v_cmp, cu_cmp.to(call.device)


def _window_branch(call: _Call, geo: NSAGeometry, q: torch.Tensor, kv_w: torch.Tensor,
                   started: _Started) -> torch.Tensor:
    """Stage 2: window attention of the local queries over their halo-extended key segments."""
    source = _finish_halo(call, kv_w, started.win_halo, "window_halo")
    keys = started.win_keys[call.rank]
    k_w, v_w = split_kv(source.take(keys.positions), q.shape[-1])
    return nsa_kernels.window_attention(q, k_w, v_w, geo.window, call.scale, call.local_cu, keys.cu_seqlens_k)


def _score_and_select(call: _Call, geo: NSAGeometry, selection: str, q: torch.Tensor, k_slc: torch.Tensor,
                      k_cmp: torch.Tensor, lse: torch.Tensor, cu_cmp: torch.Tensor) -> torch.Tensor:
    """Stage 3's selection: int32 ``[1, B*T/P, H, top_n]`` document-relative blocks of the local queries."""
    pick = dict(select_len=geo.select_len, top_n=geo.top_n, init_blocks=geo.init_blocks,
                local_blocks=geo.local_blocks)
    if selection == "compressed":
        return nsa_kernels.select_blocks(q, k_cmp, lse, geo.block_len, geo.stride, scale=call.scale,
                                         cu_seqlens=call.local_cu, cu_seqlens_k=cu_cmp, **pick)
    own_logits = dict(shards=call.shards, rank=call.rank, group=call.group, scale=call.scale or q.shape[-1] ** -0.5,
                      stats=call.stats, **pick)
    if selection == "key_bound":
        return context_parallel_key_bound_blocks(q, k_slc, tile_len=geo.stride, **own_logits)
    return context_parallel_max_logit_blocks(q, k_slc, **own_logits)


def _attend_every_block(call: _Call, q, k_slc, v_slc) -> torch.Tensor:
    """Stage 4 with every block selected: causal attention over the whole document (an all-gather of the raw
    selection K/V, counted as ``selection_kv``)."""
    shards, stats = call.shards, call.stats
    stats.selection_path = "allgather"
    kv_bytes = row_bytes(k_slc[0]) + row_bytes(v_slc[0])
    stats.add("selection_kv", *all_gather_bytes([shards.local_len] * shards.world_size, kv_bytes))
    stats.add("agreement", *all_gather_bytes([SMALL_INTS] * shards.world_size, INDEX_BYTES))  # its own check
    return allgather_dense_attention(q, k_slc, v_slc, shards=shards, group=call.group, scale=call.scale)


def context_parallel_nsa(q: torch.Tensor, kv: BranchKV, gates: torch.Tensor, *, geometry: NSAGeometry,
                         shards: ShardedSequence, group, compress_k: Callable, compress_v: Callable,
                         rotary: Optional[Callable] = None, position_ids: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None, selection_exchange: str = "auto",
                         selection: str = "compressed") -> Tuple[torch.Tensor, CPStats]:
    """NSA output of this rank's query tokens, equal to the single-rank ``nsa_attention`` rows of those tokens.

    Args:
        q: ``[1, B*T/P, HQ, Dk]`` local queries (flattened local rows of :class:`ShardedSequence` ``shards``),
            rotated as the caller wants.
        kv: the branches' ``[1, B*T/P, H, Dk|Dv]`` K/V (:class:`BranchKV`): the compression branch's raw
            (un-rotated, uncompressed) K/V, the selection and window branches' K/V (keys rotated like q).
        gates: ``[1, B*T/P, HQ, 3]`` gate values (compressed, selected, window).
        geometry: the NSA geometry (:class:`nsa_kernels.NSAGeometry`, as :func:`nsa_kernels.nsa_attention` takes
            it; ``window=0`` drops the window branch), checked here.
        shards: the layout of the packed global sequence over the group (global documents included).
        group: the context-parallel process group (``None``: the default group).
        compress_k, compress_v: ``phi(x [1, S, H, D], cu_seqlens [N+1]) -> [1, Nc, H, D]`` compressors with the
            semantics of :class:`nsa_dist.BlockCompressor` (blocks of each packed document, packed in order).
        rotary: optional ``rotary(x [1, n, H, Dk], positions [n]) -> rotated x`` applied to compressed keys
            at the position of each block's last token: its document position, or ``position_ids[...]`` of
            that token when ``position_ids`` (int ``[B*T]``, global packed) is given.
        scale: softmax scale (default ``1 / sqrt(Dk)``).
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
    call = _check_call(q, kv, gates, shards, group, geometry, scale, selection_exchange, selection)
    Dk = q.shape[-1]
    kv_c, kv_s = (torch.cat([k[0], v[0]], dim=-1) for k, v in ((kv.k_cmp_raw, kv.v_cmp_raw), (kv.k_slc, kv.v_slc)))
    kv_w = torch.cat([kv.k_win[0], kv.v_win[0]], dim=-1) if geometry.window > 0 else None

    started = _start_exchanges(call, geometry, kv_c, kv_w, kv_s,
                               gather_selection=selection_exchange == "allgather" and selection != "all")
    compressed = _compress_and_gather(call, geometry, kv_c, started, Dk, compress_k, compress_v, rotary, position_ids)
    o_win = _window_branch(call, geometry, q, kv_w, started) if geometry.window > 0 else None
    k_cmp, v_cmp, cu_cmp = _finish_gather(call, geometry, compressed, Dk)
    o_cmp, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, geometry.block_len, geometry.stride, scale,
                                                  call.local_cu, cu_cmp)
    if selection == "all":
        o_slc = _attend_every_block(call, q, kv.k_slc, kv.v_slc)
    else:
        block_idx = _score_and_select(call, geometry, selection, q, kv.k_slc, k_cmp, lse, cu_cmp)
        o_slc = attend_selected(q, kv_s, block_idx, shards=shards, rank=call.rank, group=group,
                                select_len=geometry.select_len, scale=scale, local_cu=call.local_cu,
                                exchange=selection_exchange, pending_gather=started.selection_gather,
                                stats=call.stats)
    o = nsa_kernels.gate_combine(gates, o_cmp, o_slc, o_win)
    call.stats.log()
    return o, call.stats
