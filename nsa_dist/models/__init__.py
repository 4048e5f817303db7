"""Models built on NSA: a compact GPT used by the examples and the main job."""
from .dense import DenseAttention
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "DenseAttention"]
