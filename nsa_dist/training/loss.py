"""The training objective of one rank: cross-entropy and accuracy over the labelled positions of its shard."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, Batch
from ..models import GPT
from .context_parallel import ContextParallelGroup


def autocast(device: torch.device, precision: str):
    """The forward's precision context: bf16 autocast for ``precision="bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_and_accuracy(model: GPT, batch: Batch, cp: ContextParallelGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the mean cross-entropy over the batch's labelled positions and of the fraction
    predicted exactly (argmax); summed over the context-parallel group (``cp.sum``) they are the batch's values."""
    targets = cp.shard(batch.targets)
    logits = model(cp.shard(batch.tokens))
    labelled = targets != IGNORE_INDEX
    count = (batch.targets != IGNORE_INDEX).sum().clamp_min(1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / count
    correct = (logits.argmax(-1) == targets) & labelled
    return loss, correct.sum() / count


def batch_loss(model: GPT, batch: Batch, device: torch.device, cp: ContextParallelGroup,
               precision: str = "fp32") -> tuple:
    """``(loss share, accuracy share, [loss, accuracy] of the whole batch)``: the shares carry gradients, the
    batch values are summed over the group. ``precision="bf16"`` runs the forward under bf16 autocast."""
    with autocast(device, precision):
        loss, acc = loss_and_accuracy(model, Batch(batch.tokens.to(device), batch.targets.to(device)), cp)
    return loss, acc, cp.sum(torch.stack([loss.detach(), acc.detach()]).float()).tolist()
