"""Selection (indexer) loss: teach the compressed scores that drive top-n where attention wants to look.

Top-n is not differentiable, so in plain NSA the block scores learn only through the compressed branch's
output. This loss gives them a direct signal, in the manner of DeepSeek V3.2's DSA indexer loss: for a random
sample of query rows, the *teacher* is full causal softmax attention of the query over the selection branch's
own raw keys, summed per selection block and over the heads of the KV group (detached: it only sets the target);
the *student* is the block importance that :func:`nsa_kernels.select_blocks` ranks,
``s_j = sum_{group heads} sum_i w_ij p_i`` (compressed-attention probabilities ``p``, overlap weights ``w``).
Both are restricted to the blocks top-n actually ranks (candidates that are not forced: not among the first
``init_blocks`` nor the ``local_blocks`` most recent) and normalised there; the loss is the mean over sampled rows
and KV heads of ``KL(teacher || student)``. It is only defined for rows with more rankable candidates than free
slots (``t // l' + 1 > top_n``): elsewhere every candidate is selected anyway.

Nothing ``[T, T]`` is built: the teacher takes ``rows_per_chunk`` rows at a time against all ``T`` keys, the student
is ``[B, R, HQ, Nc]`` for ``R`` sampled rows. Its gradient reaches only the compressed keys (so the compressor and
the compression branch's key projection): the student sees the queries detached, as DSA detaches its indexer's
input, so the loss cannot pull the attention's queries towards what the compressed keys can express. It is
attached to the layer output by :func:`attach_aux_loss`, so any trainer's ``loss.backward()`` applies it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from nsa_kernels import NSAGeometry, compressed_block_last_tokens, doc_local_positions
from nsa_kernels.reference import overlap_weights
from nsa_kernels.reference.tiles import compute_dtype

TEACHER_ROWS_PER_CHUNK = 32  # rows of the [rows, T] teacher logits materialised at once


class SequenceGeometry(NamedTuple):
    """Per-token document facts of one (possibly packed) sequence of length ``T``: ``doc [T]`` document id,
    ``local [T]`` position in the document; per compressed block: ``cmp_doc [Nc]``, ``cmp_index [Nc]`` its
    index within its document."""
    doc: torch.Tensor
    local: torch.Tensor
    cmp_doc: torch.Tensor
    cmp_index: torch.Tensor


def sequence_geometry(cu_seqlens: Optional[torch.Tensor], T: int, block_len: int, stride: int,
                      device) -> SequenceGeometry:
    """The :class:`SequenceGeometry` of a length-``T`` sequence (packed documents when ``cu_seqlens`` is given)."""
    local = doc_local_positions(cu_seqlens, T, device=device)
    doc = torch.cumsum((local == 0).long(), 0) - 1
    last = compressed_block_last_tokens(cu_seqlens, T, block_len, stride, device=device)
    return SequenceGeometry(doc, local, doc[last], torch.div(local[last] - (block_len - 1), stride,
                                                             rounding_mode="floor"))


def ranked_blocks(local_rows: torch.Tensor, num_sel: int, select_len: int, init_blocks: int,
                  local_blocks: int) -> torch.Tensor:
    """bool ``[R, num_sel]``: the selection blocks top-n ranks by score for queries at document positions
    ``local_rows [R]`` (candidates ``j * l' <= t`` that are not forced)."""
    j = torch.arange(num_sel, device=local_rows.device)
    last = torch.div(local_rows, select_len, rounding_mode="floor")[:, None]
    return (j[None, :] <= last) & (j[None, :] >= init_blocks) & (j[None, :] <= last - local_blocks)


def sample_rows(geometry: SequenceGeometry, num_rows: int, select_len: int, top_n: int) -> torch.Tensor:
    """int64 ``[R]`` (``R <= num_rows``), sorted: rows drawn uniformly without replacement (torch's global RNG)
    among the positions where top-n must choose (``local // l' + 1 > top_n``). Empty when there are none."""
    eligible = torch.nonzero(torch.div(geometry.local, select_len, rounding_mode="floor") + 1 > top_n).flatten()
    if eligible.numel() > num_rows:
        pick = torch.randperm(eligible.numel(), device=eligible.device)[:num_rows]
        eligible = eligible[pick].sort().values
    return eligible


@torch.no_grad()
def teacher_block_mass(q_rows: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, geometry: SequenceGeometry,
                       num_sel: int, select_len: int, scale: float) -> torch.Tensor:
    """Attention mass per selection block of full causal softmax attention over the raw selection keys.

    Args:
        q_rows: ``[B, R, HQ, Dk]`` (rotated) queries of the sampled ``rows [R]``; k: ``[B, T, H, Dk]`` (rotated)
            selection keys of the whole sequence.
    Returns:
        ``[B, R, H, num_sel]`` (float32; float64 for float64 inputs): for each row and KV head,
        ``sum_{group heads} sum_{keys in block j}`` of ``softmax(q k * scale)`` over the keys of the row's document
        up to the row (each row sums to ``G``).
    """
    B, R, HQ, Dk = q_rows.shape
    T, H = k.shape[1], k.shape[2]
    G = HQ // H
    key_block = torch.div(geometry.local, select_len, rounding_mode="floor")
    ct = compute_dtype(q_rows.dtype)
    out = torch.zeros(B, R, H, num_sel, device=q_rows.device, dtype=ct)
    keys = torch.arange(T, device=k.device)
    for r0 in range(0, R, TEACHER_ROWS_PER_CHUNK):
        r = rows[r0:r0 + TEACHER_ROWS_PER_CHUNK]
        qc = q_rows[:, r0:r0 + len(r)].reshape(B, len(r), H, G, Dk)
        logits = torch.einsum("brhgd,bthd->brhgt", qc, k).to(ct) * scale
        visible = (keys[None, :] <= r[:, None]) & (geometry.doc[None, :] == geometry.doc[r][:, None])  # [r, T]
        probs = torch.softmax(logits.masked_fill(~visible[None, :, None, None], float("-inf")), dim=-1)
        mass = torch.zeros(B, len(r), H, num_sel, device=out.device, dtype=ct)
        mass.scatter_add_(-1, key_block.expand(B, len(r), H, T), probs.sum(3))
        out[:, r0:r0 + len(r)] = mass
    return out


def student_block_importance(q_rows: torch.Tensor, k_cmp: torch.Tensor, rows: torch.Tensor,
                             geometry: SequenceGeometry, num_sel: int, block_len: int, stride: int,
                             select_len: int, scale: float) -> torch.Tensor:
    """The selection scores of :func:`nsa_kernels.select_blocks` for the sampled rows, differentiable.

    Args:
        q_rows: ``[B, R, HQ, Dk]`` (rotated) queries of ``rows [R]``; k_cmp: ``[B, Nc, H, Dk]`` compressed keys
            (rotated at their blocks' last tokens), packed per document.
    Returns:
        ``[B, R, H, num_sel]`` (float32; float64 for float64 inputs): ``s_j = sum_{group heads} sum_i w_ij p_i``
        with ``p`` the compressed-attention probabilities over the compressed blocks the row sees (zero where it
        sees none).
    """
    B, R, HQ, Dk = q_rows.shape
    H = k_cmp.shape[2]
    G = HQ // H
    qg = q_rows.reshape(B, R, H, G, Dk)
    ct = compute_dtype(q_rows.dtype)
    logits = torch.einsum("brhgd,bchd->brhgc", qg, k_cmp).to(ct) * scale
    visible = ((geometry.cmp_doc[None, :] == geometry.doc[rows][:, None])
               & (geometry.cmp_index[None, :] * stride + block_len - 1 <= geometry.local[rows][:, None]))
    logits = logits.masked_fill(~visible[None, :, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see no block: all zero
    weights = overlap_weights(int(geometry.cmp_index.max()) + 1 if geometry.cmp_index.numel() else 0, num_sel,
                              block_len, stride, select_len, ct, q_rows.device)[geometry.cmp_index]
    return probs.sum(3) @ weights


def selection_loss(q: torch.Tensor, k_cmp: torch.Tensor, k_sel: torch.Tensor, geometry: NSAGeometry, *,
                   scale: float, num_rows: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean ``KL(teacher || student)`` over ``num_rows`` sampled query rows (see the module docstring).

    Args:
        q: ``[B, T, HQ, Dk]`` rotated queries; k_cmp: ``[B, Nc, H, Dk]`` rotated compressed keys (packed per
            document); k_sel: ``[B, T, H, Dk]`` rotated selection keys; cu_seqlens: optional packed documents.
        geometry, scale: those of the NSA call (:class:`nsa_kernels.NSAGeometry`; its window is not used).
    Returns:
        A scalar, float32 (float64 for float64 inputs); 0, attached to k_cmp, when no row has to choose. Gradients
        flow to k_cmp only (q and k_sel are detached).
    """
    T = q.shape[1]
    l, d, l_sel = geometry.block_len, geometry.stride, geometry.select_len
    seq = sequence_geometry(cu_seqlens, T, l, d, q.device)
    rows = sample_rows(seq, num_rows, l_sel, geometry.top_n)
    if rows.numel() == 0:
        return k_cmp.sum().to(compute_dtype(q.dtype)) * 0.0
    num_sel = int(seq.local.max()) // l_sel + 1
    q_rows = q.detach()[:, rows]
    teacher = teacher_block_mass(q_rows, k_sel, rows, seq, num_sel, l_sel, scale)
    student = student_block_importance(q_rows, k_cmp, rows, seq, num_sel, l, d, l_sel, scale)
    ranked = ranked_blocks(seq.local[rows], num_sel, l_sel, geometry.init_blocks, geometry.local_blocks)
    return ranked_kl(teacher, student, ranked[None, :, None])


def ranked_kl(teacher: torch.Tensor, student: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(teacher || student)`` with both renormalised over the ``ranked`` blocks.

    Args:
        teacher, student: non-negative ``[..., num_sel]`` block weights (any scale); ranked: bool, broadcastable.
    Returns:
        A scalar: the mean over all leading positions of ``sum_j T_j log(T_j / S_j)`` over ranked ``j``.
    """
    tiny = torch.finfo(teacher.dtype).tiny
    teacher = torch.where(ranked, teacher, 0.0)
    teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(tiny)
    student = torch.where(ranked, student, 0.0)
    log_student = torch.log(student.clamp_min(tiny)) - torch.log(student.sum(-1, keepdim=True).clamp_min(tiny))
    kl = torch.where(ranked & (teacher > 0), teacher * (torch.log(teacher.clamp_min(tiny)) - log_student), 0.0)
    return kl.sum(-1).mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output``; backward also sends gradient ``weight`` to ``aux_loss`` (as megatron-core's
    ``MoEAuxLossAutoScaler``), so the auxiliary loss trains without the trainer adding it to its loss."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.weight = weight
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.weight), None


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor, weight: float) -> torch.Tensor:
    """``output`` unchanged, with ``weight * aux_loss`` added to whatever loss is backpropagated through it.

    Each backward through ``output`` applies the gradient of ``weight * aux_loss`` once (with gradient accumulation
    over ``k`` micro-steps it is applied ``k`` times, as each micro-step's own loss)."""
    return _AttachAuxLoss.apply(output, aux_loss, float(weight))
