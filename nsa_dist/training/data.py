"""The training data a config names: the synthetic retrieval task or a byte-level text file."""
from __future__ import annotations

from ..data import ByteTextDataset, RetrievalTask
from .config import TrainConfig


def make_dataset(config: TrainConfig, split: str = "train"):
    """The retrieval task or the byte-level text dataset named by ``config.data``; ``split`` (``"train"`` or
    ``"valid"``) picks a text file's part when ``data.valid_fraction`` holds a tail out (the retrieval task draws
    fresh sequences for both)."""
    if config.data.kind == "text":
        if not config.data.valid_fraction:
            return ByteTextDataset(config.data.text_file)
        return ByteTextDataset(config.data.text_file, split, config.data.valid_fraction)
    return RetrievalTask(**config.data.retrieval)
