"""Held-out evaluation of the training job, with the retrieval diagnostics on a single rank."""
from __future__ import annotations

import functools
from typing import Dict, List

import torch

from ..data import Batch
from ..diagnostics import retrieval_diagnostics
from ..models import GPT
from ..selection_warmup import set_full_selection
from .context_parallel import ContextParallelGroup
from .loss import autocast, batch_loss


@torch.no_grad()
def evaluate(model: GPT, batches: List[Batch], device: torch.device, cp: ContextParallelGroup,
             precision: str = "fp32", loss_chunk_tokens: int = 0) -> Dict[str, float]:
    """Mean loss and accuracy over fixed held-out batches, with the NSA layers' top-n selection (a full-selection
    warm-up is switched off; the training loop sets it again at its next step). ``loss_chunk_tokens``: see
    :func:`~nsa_dist.training.loss.loss_and_accuracy`."""
    set_full_selection(model, False)
    model.eval()
    values = [batch_loss(model, batch, device, cp, precision, loss_chunk_tokens)[2] for batch in batches]
    model.train()
    return {"loss": sum(v[0] for v in values) / len(values), "accuracy": sum(v[1] for v in values) / len(values)}


def evaluate_with_diagnostics(model: GPT, batches: List[Batch], device: torch.device, cp: ContextParallelGroup,
                              precision: str = "fp32", loss_chunk_tokens: int = 0) -> Dict:
    """:func:`evaluate`, plus ``"diagnostics"`` (:func:`nsa_dist.diagnostics.retrieval_diagnostics`: selection
    recall, compressed mass on the needle and gates per NSA layer and KV head, accuracy by needle depth) for
    retrieval batches on a single rank."""
    result = evaluate(model, batches, device, cp, precision, loss_chunk_tokens)
    if cp.sequence_size == 1 and batches and batches[0].needles is not None:
        result["diagnostics"] = retrieval_diagnostics(model, batches, device,
                                                      functools.partial(autocast, device, precision))
    return result
