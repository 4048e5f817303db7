"""Training data: the synthetic retrieval task and byte-level text."""
from .retrieval import IGNORE_INDEX, Batch, Needles, RetrievalTask
from .text import ByteTextDataset

__all__ = ["Batch", "IGNORE_INDEX", "Needles", "RetrievalTask", "ByteTextDataset"]
