"""Byte-level language modelling on a plain text file (vocabulary of 256 byte values)."""
from __future__ import annotations

from pathlib import Path

import torch

from .retrieval import Batch

BYTE_VOCAB = 256


SPLITS = ("all", "train", "valid")


class ByteTextDataset:
    """Random windows of a file's bytes: tokens are bytes ``[0, 256)``, targets the next byte.

    ``split``: ``"all"`` the whole file; ``"train"`` its first ``1 - valid_fraction`` of bytes, ``"valid"`` the
    rest (a held-out tail: no window of one split overlaps the other)."""

    vocab_size = BYTE_VOCAB

    def __init__(self, path: str | Path, split: str = "all", valid_fraction: float = 0.0):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text data file {str(path)!r} does not exist")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if split != "all" and not 0 < valid_fraction < 1:
            raise ValueError(f"split={split!r} needs 0 < valid_fraction < 1, got {valid_fraction!r}")
        self.path, self.split = path, split
        raw = path.read_bytes()
        if not raw:
            raise ValueError(f"text data file {str(path)!r} is empty (0 bytes): it needs more than seq_len bytes")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        cut = len(data) - int(len(data) * valid_fraction) if split != "all" else len(data)
        self.data = {"all": data, "train": data[:cut], "valid": data[cut:]}[split]

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """``batch_size`` windows of ``seq_len`` bytes starting at random offsets."""
        if len(self.data) < seq_len + 1:
            raise ValueError(f"{self.path} ({self.split} split) has {len(self.data)} bytes, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(0, len(self.data) - seq_len, (batch_size,), generator=generator)
        windows = torch.stack([self.data[s:s + seq_len + 1] for s in starts.tolist()]).long()
        return Batch(windows[:, :-1], windows[:, 1:])
