"""Checks of what decoding accepts: a model on one rank, prompts and their lengths."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..attention import NativeSparseAttention
from ..models.dense import DenseAttention


def check_single_rank(model: nn.Module) -> None:
    """Decoding runs on one rank: ValueError naming the layer and the setting when any attention layer has a
    context-parallel (``cp_group``) or Ulysses (``ulysses_group``) process group."""
    for name, module in model.named_modules():
        if not isinstance(module, (NativeSparseAttention, DenseAttention)):
            continue
        for setting in ("cp_group", "ulysses_group"):
            if getattr(module, setting, None) is not None:
                raise ValueError(f"decoding runs on one rank, but layer {name!r} has {setting} set (context "
                                 "parallelism, train.cp / train.ulysses, is for training): load the checkpoint into a "
                                 "model built without use_context_parallel")


def check_prompt_lengths(tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """int64 ``[B]`` prompt lengths of right-padded ``tokens [B, T]``: ``lengths`` (an integer tensor ``[B]`` of values
    in ``[1, T]``) or ``T`` for every prompt. ValueError / TypeError naming ``lengths`` and the numbers."""
    B, T = tokens.shape
    if T == 0:
        raise ValueError("tokens must hold at least one prompt token per sequence, got shape "
                         f"{tuple(tokens.shape)}")
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=tokens.device)
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor [B] = [{B}], got {lengths!r}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be [B] = [{B}] (one per prompt of tokens), got shape {tuple(lengths.shape)}")
    low, high = (int(v) for v in torch.aminmax(lengths))
    if low < 1 or high > T:
        raise ValueError(f"lengths must lie in [1, T={T}] (right-padded prompts of tokens [B, T]), got values in "
                         f"[{low}, {high}]")
    return lengths.to(device=tokens.device, dtype=torch.long)
