"""Generation with a GPT on one rank: prefill the prompts, then decode one token per step through the caches.

Prompts of different lengths come right-padded in one ``tokens [B, T]`` tensor with their ``lengths [B]``; every
sequence keeps its own positions, so each prompt gives what it gives alone (up to floating-point rounding of batched
matrix products; greedy decoding gives the same tokens). Context parallelism is for training: decoding runs on one
rank (a model whose layers have a ``cp_group`` is refused).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, NamedTuple, Optional

import torch

from ..selection_warmup import set_full_selection
from ..validation import check_optional_positive_int
from .checks import check_prompt_lengths, check_single_rank
from .model_cache import ModelCache, decode_step, prefill
from .sampling import check_sampling, next_tokens

if TYPE_CHECKING:  # the GPT module imports this one for GPT.generate
    from ..models.gpt import GPT


class Generation(NamedTuple):
    """What :func:`generate` returns: ``tokens`` int64 ``[B, max(lengths)]``, each row its prompt followed by its new
    tokens (a stop token included) and then ``pad_token_id``; ``lengths`` int64 ``[B]`` tokens per row (prompt plus
    new ones)."""
    tokens: torch.Tensor
    lengths: torch.Tensor


def new_token_budget(lengths: torch.Tensor, max_new_tokens: int, max_length: Optional[int]) -> torch.Tensor:
    """int64 ``[B]`` new tokens each prompt may get: ``max_new_tokens``, fewer where the prompt plus them would pass
    ``max_length`` (None: no limit). ValueError naming ``max_length`` for a prompt longer than it."""
    budget = torch.full_like(lengths, max_new_tokens)
    if max_length is None:
        return budget
    longest = int(lengths.max())
    if longest > max_length:
        raise ValueError(f"a prompt has {longest} tokens, more than max_length={max_length}")
    return torch.minimum(budget, max_length - lengths)


@torch.no_grad()
def generate(model: GPT, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, stop_tokens: Iterable[int] = (), lengths: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, max_length: Optional[int] = None,
             pad_token_id: int = 0) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens (the model is put in eval mode, no gradients; NSA
    layers select top-n blocks, as evaluation does, even if the selection warm-up flag was left on).

    Args:
        model: a :class:`~nsa_dist.GPT` (``attention`` nsa or dense) on one rank.
        tokens: int ``[B, T]`` prompts, right-padded (any ids after a prompt's end).
        max_new_tokens: new tokens per prompt at most (>= 0).
        temperature: 0 for greedy decoding (argmax), else sampling from ``softmax(logits / temperature)``.
        top_k: sample among the ``top_k`` most likely tokens (None: all).
        stop_tokens: ids that end a sequence (kept as its last token).
        lengths: int ``[B]`` prompt lengths in ``[1, T]`` (default: all ``T``).
        generator: a ``torch.Generator`` on the model's device for reproducible sampling (the draws of a row depend
            on the whole batch's draws before it).
        max_length: prompt plus new tokens per sequence at most (default: no limit beyond ``max_new_tokens``); a
            longer prompt is a ValueError.
        pad_token_id: the id after each row's end in the returned tokens.
    Returns:
        :class:`Generation`.
    """
    check_single_rank(model)
    check_optional_positive_int("max_length", max_length)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    check_sampling(temperature, top_k)
    model.eval()
    set_full_selection(model, False)
    lengths = check_prompt_lengths(tokens, lengths)
    budget = new_token_budget(lengths, max_new_tokens, max_length)
    steps = int(budget.max())
    B, T = tokens.shape
    cache = ModelCache(model, B, max(T, int(lengths.max()) + steps - 1))
    logits = prefill(model, tokens, cache, lengths)[torch.arange(B, device=tokens.device), lengths - 1]
    prompt = torch.arange(T, device=tokens.device) < lengths[:, None]
    out = torch.where(prompt, tokens, pad_token_id).to(torch.long)
    out = torch.cat([out, out.new_full((B, steps), pad_token_id)], dim=1)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=tokens.device)
    produced = torch.zeros_like(lengths)
    finished = budget == 0
    for step in range(steps):
        new = next_tokens(logits, temperature, top_k, generator)
        active = ~finished
        out[active, (lengths + produced)[active]] = new[active]
        produced += active.long()
        finished |= (produced >= budget) | torch.isin(new, stop)
        if bool(finished.all()):
            break
        logits = decode_step(model, new[:, None], cache)[:, 0]
    total = lengths + produced
    return Generation(out[:, :int(total.max())], total)
