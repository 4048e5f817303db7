"""Padded batches as transformers passes them: an ``attention_mask [B, T]`` of ones at each row's tokens (left
padding for generation) moved to the right-padded layout of :mod:`nsa_dist.inference` and back."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Spans(NamedTuple):
    """Where each row's tokens lie in a padded ``[B, T]`` batch: int64 ``start [B]`` and ``lengths [B]``."""
    start: torch.Tensor
    lengths: torch.Tensor


def token_spans(attention_mask: Optional[torch.Tensor], batch: int, length: int, device) -> Spans:
    """The spans of a ``[batch, length]`` batch marked by ``attention_mask`` (1 at tokens, 0 at padding; None: no
    padding). Each row's ones must form one run of at least one token (left or right padding): ValueError naming
    ``attention_mask`` and the first bad row otherwise."""
    if attention_mask is None:
        return Spans(torch.zeros(batch, dtype=torch.long, device=device),
                     torch.full((batch,), length, dtype=torch.long, device=device))
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be [B, T] = [{batch}, {length}], got shape "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=device) != 0
    lengths = mask.sum(dim=1)
    start = mask.long().argmax(dim=1)
    columns = torch.arange(length, device=device)
    run = (columns >= start[:, None]) & (columns < (start + lengths)[:, None])
    bad = ((run != mask).any(dim=1) | (lengths == 0)).nonzero()
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"attention_mask row {row} is {attention_mask[row].tolist()}: each row's ones must form one "
                         "run of at least one token (left or right padding, no holes)")
    return Spans(start, lengths)


def to_right_padded(x: torch.Tensor, spans: Spans) -> torch.Tensor:
    """``x [B, T, ...]`` with each row's tokens moved to its start (``x[b, start[b] + t]`` at ``t``); the rows after
    ``lengths[b]`` repeat the last one (valid ids, not read)."""
    B, T = x.shape[:2]
    index = (torch.arange(T, device=x.device) + spans.start[:, None]).clamp(max=T - 1)
    return x[torch.arange(B, device=x.device)[:, None], index]


def from_right_padded(y: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The inverse of :func:`to_right_padded` for outputs ``y [B, T, ...]``: row ``t`` of each sequence back at column
    ``start[b] + t``, zeros at the padding columns."""
    B, T = y.shape[:2]
    columns = torch.arange(T, device=y.device)
    index = (columns - spans.start[:, None]).clamp(min=0)
    out = y[torch.arange(B, device=y.device)[:, None], index]
    inside = (index < spans.lengths[:, None]) & (columns >= spans.start[:, None])
    return torch.where(inside.view(B, T, *([1] * (y.dim() - 2))), out, torch.zeros((), dtype=y.dtype, device=y.device))
