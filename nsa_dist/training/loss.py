"""The training objective of one rank: cross-entropy and accuracy over the labelled positions of its shard, from
the full logits or, for long shards, chunk by chunk through the LM head (:func:`chunked_head_loss`)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..data import IGNORE_INDEX, Batch
from ..models import GPT
from .context_parallel import ContextParallelGroup


def autocast(device: torch.device, precision: str):
    """The forward's precision context: bf16 autocast for ``precision="bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def summed_loss_and_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the labelled positions (computed in float32, or float64 for float64 logits) and
    the number of them whose argmax is the target. ``logits`` ``[..., vocab]``, ``targets`` ``[...]``."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(wide.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
    return loss, correct


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`summed_loss_and_correct` of ``head(hidden)``: one chunk of :func:`chunked_head_loss`."""
    return summed_loss_and_correct(head(hidden), targets)


def chunked_head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                      chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`summed_loss_and_correct` of ``head(hidden)`` without all logits at once: the ``hidden`` ``[..., H]``
    rows (sequence and batch flattened) go through the LM head and the cross-entropy ``chunk_tokens`` at a time,
    each chunk under non-reentrant :func:`torch.utils.checkpoint.checkpoint`, so the forward keeps no logits and
    the backward recomputes one chunk's logits at a time (one more LM-head matmul than the full loss). The count
    of correct predictions is the full loss's exactly (the same logits, the same argmax); the loss equals it up to
    the order of the float sum. Calling ``head`` as a module keeps DeepSpeed ZeRO-3's parameter gathering hooks
    working (it gathers the head's weight once per chunk, in forward and again in the backward's recompute).

    DeepSpeed's ``TiledFusedLogitsLoss`` (``deepspeed.runtime.sequence_parallel.ulysses_sp``, 0.19.8) does not fit:
    it accumulates the head weight's gradient inside its forward with an assumed output gradient of 1 and scales
    only the hidden states' gradient by the real one, which differs here (the loss is divided by the batch's
    labelled count and DeepSpeed scales it for gradient accumulation), and it returns no accuracy."""
    rows = hidden.flatten(0, -2).split(chunk_tokens)  # split (not slicing): one gradient concatenation in backward
    losses, correct = [], []
    for h, t in zip(rows, targets.flatten().split(chunk_tokens)):
        loss, right = torch.utils.checkpoint.checkpoint(_head_loss, head, h, t, use_reentrant=False)
        losses.append(loss)
        correct.append(right)
    return torch.stack(losses).sum(), torch.stack(correct).sum()


def _lm_head(model: nn.Module) -> nn.Module:
    """The LM head of a :class:`GPT`, also when ``model`` is a DeepSpeed engine wrapping it (``engine.module``)."""
    return getattr(model, "module", model).lm_head


def loss_and_accuracy(model: GPT, batch: Batch, cp: ContextParallelGroup,
                      loss_chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the mean cross-entropy over the batch's labelled positions and of the fraction
    predicted exactly (argmax); summed over the context-parallel group (``cp.sum``) they are the batch's values.
    A shard of more than ``loss_chunk_tokens`` tokens (when not 0) takes :func:`chunked_head_loss`."""
    targets = cp.shard(batch.targets)
    count = (batch.targets != IGNORE_INDEX).sum().clamp_min(1)
    if loss_chunk_tokens and targets.numel() > loss_chunk_tokens:
        hidden = model(cp.shard(batch.tokens), return_hidden=True)
        loss, correct = chunked_head_loss(_lm_head(model), hidden, targets, loss_chunk_tokens)
    else:
        loss, correct = summed_loss_and_correct(model(cp.shard(batch.tokens)), targets)
    return loss / count, correct / count


def batch_loss(model: GPT, batch: Batch, device: torch.device, cp: ContextParallelGroup,
               precision: str = "fp32", loss_chunk_tokens: int = 0) -> tuple:
    """``(loss share, accuracy share, [loss, accuracy] of the whole batch)``: the shares carry gradients, the
    batch values are summed over the group. ``precision="bf16"`` runs the forward under bf16 autocast;
    ``loss_chunk_tokens``: see :func:`loss_and_accuracy`."""
    with autocast(device, precision):
        loss, acc = loss_and_accuracy(model, Batch(batch.tokens.to(device), batch.targets.to(device)), cp,
                                      loss_chunk_tokens)
    return loss, acc, cp.sum(torch.stack([loss.detach(), acc.detach()]).float()).tolist()
