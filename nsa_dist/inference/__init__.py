"""Inference on one rank: KV caches for NSA and dense layers, the NSA decode-step reference, generation.

- :class:`NSALayerCache` (layout and memory per token in :mod:`~nsa_dist.inference.nsa_cache` and
  :mod:`~nsa_dist.inference.memory`), :class:`DenseLayerCache`, :class:`ModelCache` (one per GPT block).
- :func:`nsa_decode_reference`: one decode step of an NSA layer in plain PyTorch, the reference for decode kernels;
  :func:`dense_decode_reference` for dense layers.
- :func:`prefill`, :func:`decode_step`: a GPT's forward over prompts (filling the caches) and over new tokens.
- :func:`generate` (also ``GPT.generate``): greedy or sampled continuation of a batch of prompts.

Context parallelism is for training; decoding runs on one rank.
"""
from .decode_kv import DecodeKV
from .decode_reference import nsa_decode_reference
from .dense_cache import DenseLayerCache, dense_decode_reference
from .generate import Generation, generate
from .layer_step import decode_layer, prefill_layer
from .memory import dense_cache_bytes, nsa_bytes_per_token, nsa_cache_bytes
from .model_cache import ModelCache, decode_step, prefill
from .nsa_cache import NSALayerCache

__all__ = [
    "DecodeKV",
    "DenseLayerCache",
    "Generation",
    "ModelCache",
    "NSALayerCache",
    "decode_layer",
    "decode_step",
    "dense_cache_bytes",
    "dense_decode_reference",
    "generate",
    "nsa_bytes_per_token",
    "nsa_cache_bytes",
    "nsa_decode_reference",
    "prefill",
    "prefill_layer",
]
