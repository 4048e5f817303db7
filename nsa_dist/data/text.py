"""Byte-level language modelling on a plain text file (vocabulary of 256 byte values)."""
from __future__ import annotations

from pathlib import Path

import torch

from .retrieval import Batch

BYTE_VOCAB = 256


class ByteTextDataset:
    """Random windows of a file's bytes: tokens are bytes ``[0, 256)``, targets the next byte."""

    vocab_size = BYTE_VOCAB

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text data file {str(path)!r} does not exist")
        self.path = path
        self.data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """``batch_size`` windows of ``seq_len`` bytes starting at random offsets."""
        if len(self.data) < seq_len + 1:
            raise ValueError(f"{self.path} has {len(self.data)} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(0, len(self.data) - seq_len, (batch_size,), generator=generator)
        windows = torch.stack([self.data[s:s + seq_len + 1] for s in starts.tolist()]).long()
        return Batch(windows[:, :-1], windows[:, 1:])
