"""The next token from a row of logits: greedy, or sampling with temperature and top-k."""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_optional_positive_int, check_real


def check_sampling(temperature: float, top_k: Optional[int]) -> None:
    """``temperature >= 0`` (0: greedy) and ``top_k`` a positive int or None (ValueError naming them)."""
    check_real("temperature", temperature, 0)
    check_optional_positive_int("top_k", top_k)


def next_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """int64 ``[B]`` next tokens from ``logits [B, vocab]``: with ``temperature == 0`` the argmax (ties to the lowest
    id); else a draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (ties at the
    k-th kept too; None: all), with ``generator`` (on the logits' device) for reproducible draws."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]
