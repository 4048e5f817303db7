"""nsa-dist: Native Sparse Attention for distributed long-context training.

``import nsa_dist`` needs only torch (and triton on GPU machines); megatron-core, deepspeed, ray and
mpi4py are optional extras imported where they are used.
"""
from .attention import NativeSparseAttention
from .compression import BlockCompressor
from .config import NSAConfig
from .models import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = ["NSAConfig", "NativeSparseAttention", "BlockCompressor", "GPT", "GPTConfig", "__version__"]
