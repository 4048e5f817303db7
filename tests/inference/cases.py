"""Tiny NSA layers and GPTs for the decoding tests, and the prefill-then-decode walk they compare with one forward."""
from __future__ import annotations

from typing import List

import torch

from nsa_dist import GPT, BlockCompressor, GPTConfig, NativeSparseAttention, NSAConfig
from nsa_dist.inference import NSALayerCache, decode_layer, prefill_layer

# geometry small enough that 61 tokens hold many compressed and selection blocks (top-n picks one block beyond
# the forced first and 2 most recent ones) and pass the window
GEOMETRY = dict(block_len=8, stride=4, select_len=8, top_n=4, window=12)


def nsa_config(num_heads: int = 4, num_kv_heads: int = 1, **overrides) -> NSAConfig:
    """An NSAConfig of hidden size 32, head dim 8 and :data:`GEOMETRY` (``overrides`` replace any field)."""
    return NSAConfig(**{**dict(hidden_size=32, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8,
                               **GEOMETRY), **overrides})


def make_active(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` in eval mode with every compressor's parameters drawn at random (they start at mean pooling, which
    would hide errors in the order of a block's tokens)."""
    generator = torch.Generator().manual_seed(seed)
    for compressor in module.modules():
        if isinstance(compressor, BlockCompressor):
            for p in compressor.parameters():
                p.data.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module.eval()


def nsa_layer(config: NSAConfig, seed: int = 0) -> NativeSparseAttention:
    """A randomly initialised layer (:func:`make_active`)."""
    torch.manual_seed(seed)
    return make_active(NativeSparseAttention(config), seed)


def tiny_gpt(attention: str = "nsa", seed: int = 0, **nsa) -> GPT:
    """A 2-layer GPT of width 32 over 50 tokens (:data:`GEOMETRY` for NSA, ``nsa`` overrides), randomly initialised."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       attention=attention, nsa={**GEOMETRY, **nsa}, init_std=0.3)
    return make_active(GPT(config), seed)


def rows_of(x: torch.Tensor, lengths: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """``[B, count, ...]``: rows ``lengths[b] + offset ...`` of each sequence of ``x [B, T, ...]``."""
    index = lengths[:, None] + offset + torch.arange(count, device=lengths.device)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


@torch.no_grad()
def layer_decode_walk(layer: NativeSparseAttention, x: torch.Tensor, lengths: torch.Tensor,
                      chunk: int = 1) -> List[torch.Tensor]:
    """Prefill each sequence of ``x [B, T, hidden]`` with its first ``lengths[b]`` rows, then decode the next rows
    ``chunk`` at a time until the longest prompt reaches ``T``. Returns per sequence its ``[T', hidden]`` outputs
    (prompt rows then decoded rows, ``T' = lengths[b] + decoded``)."""
    B, T, _ = x.shape
    cache = NSALayerCache(layer.config, B, T, x.dtype)
    prompt = int(lengths.max())
    outs = [prefill_layer(layer, x[:, :prompt], lengths, cache)]
    done = 0
    while prompt + done + chunk <= T:
        outs.append(decode_layer(layer, rows_of(x, lengths, done, chunk), cache))
        done += chunk
    return [torch.cat([outs[0][b, :lengths[b]], *(o[b] for o in outs[1:])]) for b in range(B)]
