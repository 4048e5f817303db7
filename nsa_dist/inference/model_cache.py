"""``ModelCache``: the caches of every attention layer of a :class:`~nsa_dist.GPT`, and its prefill and decode
steps (the model's forward with each attention layer run through :mod:`~nsa_dist.inference.layer_step`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional

import torch

from ..validation import check_token_ids
from .checks import check_prompt_lengths, check_single_rank
from .dense_cache import DenseLayerCache
from .layer_step import LayerCache, decode_layer, prefill_layer
from .nsa_cache import NSALayerCache

if TYPE_CHECKING:  # the GPT module imports this package for GPT.generate
    from ..models.gpt import GPT


class ModelCache:
    """One cache per block of a GPT (:class:`NSALayerCache` for ``attention: nsa``, :class:`DenseLayerCache` for
    ``attention: dense``), for ``batch`` sequences of up to ``capacity`` tokens in ``dtype`` (default: the model's
    parameter dtype) on the model's device."""

    def __init__(self, model: GPT, batch: int, capacity: int, dtype: Optional[torch.dtype] = None):
        check_single_rank(model)
        weight = model.embed.weight
        dtype = weight.dtype if dtype is None else dtype
        self.layers: List[LayerCache] = [layer_cache(model, batch, capacity, dtype, weight.device)
                                         for _ in range(model.config.num_layers)]

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[B]`` tokens held per sequence."""
        return self.layers[0].lengths

    def nbytes(self) -> int:
        """Bytes held by all layers' caches."""
        return sum(layer.nbytes() for layer in self.layers)


def layer_cache(model: GPT, batch: int, capacity: int, dtype: torch.dtype, device) -> LayerCache:
    """An empty cache for one attention layer of ``model`` (NSA or dense, as ``model.config.attention`` says)."""
    cfg = model.config
    if cfg.attention == "nsa":
        return NSALayerCache(cfg.nsa_config(), batch, capacity, dtype, device)
    return DenseLayerCache(cfg.num_kv_heads, cfg.head_dim, batch, capacity, dtype, device)


def run_blocks(model: GPT, tokens: torch.Tensor, cache: ModelCache, attend: Callable) -> torch.Tensor:
    """The GPT's forward (embedding, pre-norm blocks, final norm, LM head) over ``tokens [B, S]`` with each block's
    attention replaced by ``attend(attn, x, layer_cache)``. Returns logits ``[B, S, vocab]``."""
    check_token_ids(tokens, model.config.vocab_size)
    x = model.embed(tokens)
    for block, layer_cache in zip(model.blocks, cache.layers):
        x = x + attend(block.attn, block.attn_norm(x), layer_cache)
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x))


def prefill(model: GPT, tokens: torch.Tensor, cache: ModelCache,
            lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run right-padded prompts ``tokens [B, T]`` of ``lengths [B]`` tokens (default: all ``T``) through the model's
    training forward and fill ``cache``. Returns logits ``[B, T, vocab]`` (row ``lengths[b] - 1`` predicts the first
    new token; rows past a prompt's length are padding)."""
    lengths = check_prompt_lengths(tokens, lengths)
    return run_blocks(model, tokens, cache, lambda attn, x, layer: prefill_layer(attn, x, lengths, layer))


def decode_step(model: GPT, tokens: torch.Tensor, cache: ModelCache) -> torch.Tensor:
    """Append ``tokens [B, S]`` (``S >= 1``: one new token per sequence, or a few consecutive ones for speculative
    steps) at positions ``cache.lengths[b] + s``. Returns logits ``[B, S, vocab]``, equal to the full forward's rows
    at those positions."""
    return run_blocks(model, tokens, cache, decode_layer)
