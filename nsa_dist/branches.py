"""The NSA branch computation shared by every layer front end (``NativeSparseAttention``, the Megatron
``NSASelfAttention``): compression, rotary, the three branches and the gates, on one rank or context-parallel."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

import nsa_kernels
from nsa_kernels import compressed_block_last_tokens, doc_local_positions
from nsa_kernels.validation import check_cu_seqlens

from .branch_kv import BranchKV
from .config import NSAConfig
from .diagnostics import observe_branches
from .logit_selection import own_logit_selection
from .parallel import CPLayout, CPStats, ShardedSequence, context_parallel_nsa
from .selection_loss import attach_aux_loss, selection_loss


class BranchOutput(NamedTuple):
    """What :func:`nsa_branches` returns: ``o [B, T, HQ, Dv]``, the :class:`CPStats` of a context-parallel call
    (else None) and the selection loss of the call (a detached float32 scalar; None when
    ``config.selection_loss_weight`` is 0 or gradients are off)."""
    o: torch.Tensor
    cp_stats: Optional[CPStats]
    selection_loss: Optional[torch.Tensor]


def nsa_branches(config: NSAConfig, q: torch.Tensor, kv: BranchKV, gates: torch.Tensor, *, k_compressor: Callable,
                 v_compressor: Callable, rotary: Optional[Callable] = None, cu_seqlens: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None, cp_group=None,
                 full_selection: bool = False) -> BranchOutput:
    """Gated NSA output of projected heads.

    Args:
        config: the geometry (``block_len`` ... ``local_blocks``, ``softmax_scale``, ``kv_sharing``,
            ``cp_layout``, ``cp_selection_exchange``); head counts come from the tensors, so a tensor-parallel
            caller passes its local heads.
        q: ``[B, T, HQ, Dk]`` un-rotated queries; gates ``[B, T, HQ, 3]`` (after the sigmoid; the gates of
            ``config.disabled_branches`` are zeroed here). Every input is cast to q's dtype (under autocast the
            projections, compressors and gates may come out in different dtypes).
        kv: the branches' ``[B, T, H, Dk]`` keys and ``[B, T, H, Dv]`` values (:class:`BranchKV`), all keys
            un-rotated: ``k_cmp_raw``, ``v_cmp_raw`` the compression branch's raw K/V (compressed here);
            ``k_slc``, ``v_slc`` the selection branch's, ``k_win``, ``v_win`` the window branch's K/V. With
            ``config.kv_sharing="shared"`` pass the same K/V for every branch (rotated once).
        k_compressor, v_compressor: ``phi(x [B, T, H, D], cu_seqlens) -> [B, Nc, H, D]``
            (:class:`~nsa_dist.BlockCompressor`).
        rotary: ``rotary(x [B, S, H, D], positions [S] or [B, S]) -> x`` or None (no rotary). q and the
            selection/window keys rotate at their positions, compressed keys at their block's last token.
        cu_seqlens: int32 ``[N + 1]`` packed documents (``B = 1``); global under context parallelism.
        position_ids: rotary positions ``[T]`` or ``[B, T]`` (default: position within the document); global
            under context parallelism.
        cp_group: context-parallel process group, or None. Then ``T`` is the local shard ``T_global / P`` in
            the ``config.cp_layout`` layout.
        full_selection: the selected branch attends every block (causal attention over ``kv.k_slc``, ``kv.v_slc``): the
            warm-up of :mod:`nsa_dist.selection_warmup`.
    Returns:
        A :class:`BranchOutput`. With ``config.selection_loss_weight > 0`` and gradients enabled, ``o`` carries
        the selection loss (:func:`~nsa_dist.selection_loss.attach_aux_loss`): backpropagating any loss through
        ``o`` also applies ``selection_loss_weight * selection_loss``.
    """
    c = config
    B, T = q.shape[:2]
    kv, gates = kv.map(lambda t: t.to(q.dtype)), gates.to(q.dtype)
    if c.branch_gate_mask is not None:
        gates = gates * gates.new_tensor(c.branch_gate_mask)
    k_compressor, v_compressor = (_output_cast_to(phi, q.dtype) for phi in (k_compressor, v_compressor))
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        if c.selection_loss_weight:
            raise ValueError(f"selection_loss_weight={c.selection_loss_weight} is not supported under context "
                             "parallelism (its teacher needs every rank's selection keys for each sampled query); "
                             "set it to 0 or run the layer on one rank")
        selection = "all" if full_selection else c.selection_scoring
        return _context_parallel(c, q, kv, gates, k_compressor, v_compressor, rotary, cu_seqlens, position_ids,
                                 cp_group, selection)
    check_cu_seqlens(cu_seqlens, B, T)
    k_cmp = k_compressor(kv.k_cmp_raw, cu_seqlens)
    v_cmp = v_compressor(kv.v_cmp_raw, cu_seqlens)
    if rotary is not None:
        if position_ids is None:
            position_ids = doc_local_positions(cu_seqlens, T, device=q.device)
        last = compressed_block_last_tokens(cu_seqlens, T, c.block_len, c.stride, device=q.device)
        q = rotary(q, position_ids)
        k_cmp = rotary(k_cmp, position_ids[..., last])
        kv = rotated_keys(c, kv, rotary, position_ids)
    observe_branches(c, q, k_cmp, v_cmp, kv.k_slc, gates, cu_seqlens)
    if full_selection or c.selection_scoring != "compressed":
        o = _composed_nsa(c, q, k_cmp, v_cmp, kv, gates, cu_seqlens, full_selection)
    else:
        o = nsa_kernels.nsa_attention(q, k_cmp, v_cmp, kv.k_slc, kv.v_slc, kv.k_win, kv.v_win, gates,
                                      **c.geometry()._asdict(), scale=c.softmax_scale, cu_seqlens=cu_seqlens)
    if not (c.selection_loss_weight and torch.is_grad_enabled()):
        return BranchOutput(o, None, None)
    loss = selection_loss(q, k_cmp, kv.k_slc, c.geometry(), scale=c.softmax_scale or q.shape[-1] ** -0.5,
                          num_rows=c.selection_loss_rows, cu_seqlens=cu_seqlens)
    return BranchOutput(attach_aux_loss(o, loss, c.selection_loss_weight), None, loss.detach())


def _composed_nsa(c: NSAConfig, q, k_cmp, v_cmp, kv: BranchKV, gates, cu_seqlens,
                  full_selection: bool) -> torch.Tensor:
    """The gated NSA output composed from the public branch ops, for the selections ``nsa_attention`` does not
    make: every block (``full_selection``: causal attention over all of ``kv.k_slc``, ``kv.v_slc``, a window as
    long as the sequence, equal to ``nsa_attention`` with ``top_n`` at least the number of blocks), or the blocks
    of :func:`own_logit_selection`. The compressed and window branches are the paper's. ``k_cmp``, ``v_cmp`` are
    the compressed K/V (keys rotated); of ``kv`` only the selection and window K/V are read (keys rotated)."""
    geometry = dict(block_len=c.block_len, stride=c.stride, scale=c.softmax_scale, cu_seqlens=cu_seqlens)
    o_cmp, _ = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, **geometry)
    if full_selection:
        o_slc = nsa_kernels.window_attention(q, kv.k_slc, kv.v_slc, max(q.shape[1], 1), c.softmax_scale, cu_seqlens)
    else:
        block_idx = own_logit_selection(c, q, kv.k_slc, cu_seqlens)
        o_slc = nsa_kernels.selected_attention(q, kv.k_slc, kv.v_slc, block_idx, c.select_len, c.softmax_scale,
                                               cu_seqlens)
    o_win = (nsa_kernels.window_attention(q, kv.k_win, kv.v_win, c.window, c.softmax_scale, cu_seqlens)
             if c.window else None)
    return nsa_kernels.gate_combine(gates, o_cmp, o_slc, o_win)


def _output_cast_to(compressor: Callable, dtype: torch.dtype) -> Callable:
    """``compressor`` whose output is cast to ``dtype`` (autocast may run its MLP in another precision)."""
    return lambda x, cu_seqlens: compressor(x, cu_seqlens).to(dtype)


def rotated_keys(c: NSAConfig, kv: BranchKV, rotary: Callable, positions: torch.Tensor) -> BranchKV:
    """``kv`` with the selection and window keys rotated at ``positions`` (with ``kv_sharing="shared"`` the
    window keys are the rotated selection keys); the compression branch's raw K/V stay un-rotated."""
    k_slc = rotary(kv.k_slc, positions)
    return kv._replace(k_slc=k_slc, k_win=k_slc if c.kv_sharing == "shared" else rotary(kv.k_win, positions))


def _context_parallel(c, q, kv: BranchKV, gates, k_compressor, v_compressor, rotary, cu_seqlens, position_ids,
                      cp_group, selection: str):
    """The local shard's ``[B, T/P, ...]`` tensors flatten to one packed row (each batch row a document unless
    ``cu_seqlens`` packs them) for :func:`~nsa_dist.parallel.context_parallel_nsa`."""
    B, T_local = q.shape[:2]
    P = dist.get_world_size(cp_group)
    shards = ShardedSequence(CPLayout(P, T_local * P, c.cp_layout, c.select_len), cu_seqlens, B)
    rank = dist.get_rank(cp_group)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, B * T_local, *t.shape[2:])

    q, gates = flat(q), flat(gates)
    kv = kv.map(flat)
    if rotary is not None:
        pos = shards.rotary_positions(rank, position_ids, device=q.device)
        q = rotary(q, pos)
        kv = rotated_keys(c, kv, rotary, pos)
    o, stats = context_parallel_nsa(
        q, kv, gates, geometry=c.geometry(), shards=shards, group=cp_group, compress_k=k_compressor,
        compress_v=v_compressor, rotary=rotary, position_ids=shards.flat_position_ids(position_ids, q.device),
        scale=c.softmax_scale, selection_exchange=c.cp_selection_exchange, selection=selection)
    return BranchOutput(o.reshape(B, T_local, *o.shape[2:]), stats, None)
