"""``NSAGenerationCache``: the project's :class:`~nsa_dist.inference.ModelCache` as the ``cache`` transformers'
``generate`` hands from one forward to the next.

transformers' own caches (``DynamicCache``, ``StaticCache``) hold one K/V tensor pair per layer that the attention
reads whole; an NSA layer's decode state is more (compressed K/V, the raw tail of the unfinished block, window ring,
tile bounds) and its decode attention is the project's reference. So this ``Cache`` subclass holds no transformers
layers: it carries a ``ModelCache``, built at the first forward (when the batch is known) with room for
``capacity`` tokens per sequence, and the number of batch columns seen (``get_seq_length``, what ``generate`` counts,
left padding included)."""
from __future__ import annotations

from typing import Optional

from transformers import Cache

from nsa_kernels.validation import check_positive_int

from ..inference import ModelCache
from ..models.gpt import GPT


class NSAGenerationCache(Cache):
    """A :class:`~nsa_dist.inference.ModelCache` for up to ``capacity`` tokens per sequence (prompt and new tokens,
    padding excluded), allocated by :meth:`allocate` at the first forward."""

    def __init__(self, capacity: int):
        super().__init__(layers=[])
        check_positive_int("capacity", capacity)
        self.capacity = capacity
        self.model_cache: Optional[ModelCache] = None
        self.columns = 0

    def allocate(self, model: GPT, batch: int, length: int) -> ModelCache:
        """Build the ``ModelCache`` of ``model`` for ``batch`` sequences (room for ``max(capacity, length)`` tokens
        each, ``length`` the prompt columns) and return it."""
        self.model_cache = ModelCache(model, batch, max(self.capacity, length))
        return self.model_cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Batch columns passed through the model so far (padding included), as ``generate`` counts them."""
        return self.columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """Tokens per sequence the cache holds at most."""
        return self.capacity

    @property
    def is_compileable(self) -> bool:
        """The decode steps change shapes and call Python references: not for ``torch.compile``."""
        return False

    @property
    def is_croppable(self) -> bool:
        """Tokens cannot be taken back out of an NSA cache (compressed blocks are folded in)."""
        return False
