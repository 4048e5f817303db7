"""One attention layer with a cache: prefill (the layer's training forward over the prompts, then the cache filled
from the same projections) and decode steps (new tokens against the cache: NSA through the Triton decode kernels on
a GPU, else through the decode references)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from nsa_kernels import NSAGeometry
from nsa_kernels.reference.tiles import compute_dtype, default_scale

from ..attention import NativeSparseAttention
from ..models.dense import DenseAttention
from .compressed_kv import KeyCompression
from .decode_kv import DecodeKV
from .decode_reference import decode_block_indices, nsa_decode_reference
from .dense_cache import DenseLayerCache, dense_decode_reference
from .nsa_cache import NSALayerCache
from .positions import step_positions
from .projections import dense_kv, dense_projections, nsa_branch_kv, nsa_projections, rotate, rotated_branch_kv

LayerCache = Union[NSALayerCache, DenseLayerCache]


def key_compression(layer: NativeSparseAttention) -> KeyCompression:
    """The layer's compressors and rotary, as the cache applies them to completed blocks."""
    return KeyCompression(layer.k_compressor, layer.v_compressor, layer.rotary)


def check_step_input(x: torch.Tensor, cache: LayerCache) -> None:
    """``x [B, S, hidden]`` must match the cache's batch and dtype (TypeError / ValueError naming both)."""
    if x.shape[0] != cache.batch:
        raise ValueError(f"the input has batch {x.shape[0]} but the cache was built for batch {cache.batch}")
    if x.dtype != cache.dtype:
        raise TypeError(f"the input has dtype {x.dtype} but the cache holds {cache.dtype}: build the cache in the "
                        "model's dtype")


def prefill_layer(layer: Union[NativeSparseAttention, DenseAttention], x: torch.Tensor, lengths: torch.Tensor,
                  cache: LayerCache) -> torch.Tensor:
    """The layer's forward over right-padded prompts ``x [B, T, hidden]`` of ``lengths [B]`` tokens (outputs at
    padding rows are not used), and the cache filled with the prompts' K/V (their projections computed once more).
    Returns ``[B, T, hidden]``."""
    check_step_input(x, cache)
    if getattr(layer, "full_selection", False):
        raise ValueError("the layer's full_selection (selection warm-up) is on, but decoding selects top-n blocks as "
                         "evaluation does: call nsa_dist.selection_warmup.set_full_selection(model, False) first")
    out = layer(x)
    positions = torch.arange(x.shape[1], device=x.device)
    if isinstance(cache, NSALayerCache):
        kv = nsa_branch_kv(layer, layer.kv_proj(x), cache.dtype)
        cache.fill(rotated_branch_kv(layer, kv, positions), lengths, key_compression(layer))
    else:
        k, v = dense_kv(layer, x)
        cache.fill(rotate(layer.rotary, k, positions), v, lengths)
    return out


def nsa_decode_step(q: torch.Tensor, positions: torch.Tensor, kv: DecodeKV, gates: torch.Tensor,
                    geometry: NSAGeometry, scoring: str, scale: Optional[float]) -> torch.Tensor:
    """One NSA decode step (the arguments of :func:`nsa_decode_reference`): the Triton kernels
    (:func:`nsa_kernels.triton.nsa_decode.nsa_decode`) for CUDA tensors, the reference otherwise. The kernels score
    ``selection_scoring="compressed"`` themselves; other scorings take the reference's selection."""
    if not q.is_cuda:
        return nsa_decode_reference(q, positions, kv, gates, geometry, scoring, scale)
    from nsa_kernels.triton.nsa_decode import nsa_decode  # lazily, as the dispatcher imports the Triton ops
    block_idx = None
    if scoring != "compressed":
        block_idx = decode_block_indices(q.to(compute_dtype(q.dtype)), positions, kv, None, geometry, scoring,
                                         default_scale(scale, q.shape[-1]))
    return nsa_decode(q, positions, kv, gates, geometry, scoring, scale, block_idx=block_idx)


def decode_layer(layer: Union[NativeSparseAttention, DenseAttention], x: torch.Tensor,
                 cache: LayerCache) -> torch.Tensor:
    """``S`` new tokens per sequence, ``x [B, S, hidden]`` at positions ``cache.lengths[b] + s``: appended to the
    cache, attended through :func:`nsa_decode_step` (NSA: Triton on a GPU, else the reference) or
    :func:`~nsa_dist.inference.dense_cache.dense_decode_reference` (dense). Returns ``[B, S, hidden]``."""
    check_step_input(x, cache)
    B, S = x.shape[:2]
    positions = step_positions(cache.lengths, S)
    if isinstance(cache, NSALayerCache):
        c = layer.config
        q, kv, gates = nsa_projections(layer, x)
        step_kv = cache.append(rotated_branch_kv(layer, kv, positions), key_compression(layer))
        o = nsa_decode_step(rotate(layer.rotary, q, positions), positions, step_kv, gates, c.geometry(),
                            c.selection_scoring, c.softmax_scale)
    else:
        q, k, v = dense_projections(layer, x)
        cache.append(rotate(layer.rotary, k, positions), v)
        o = dense_decode_reference(rotate(layer.rotary, q, positions), positions, cache.kv.k, cache.kv.v)
    return layer.o_proj(o.reshape(B, S, -1))
