"""Random text and bytes for the byte tokenizer and export tests."""
from __future__ import annotations

import torch

# code point ranges of 1, 2, 3 and 4 UTF-8 bytes (no surrogates), NUL and controls included
CODE_POINTS = [(0, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]


def random_text(generator: torch.Generator, length: int) -> str:
    """``length`` characters drawn from every UTF-8 length class."""
    ranges = torch.randint(len(CODE_POINTS), (length,), generator=generator).tolist()
    chars = []
    for r in ranges:
        low, high = CODE_POINTS[r]
        chars.append(chr(int(torch.randint(low, high, (1,), generator=generator))))
    return "".join(chars)


def random_bytes(generator: torch.Generator, length: int) -> bytes:
    """``length`` uniform random bytes (almost surely not valid UTF-8)."""
    return bytes(torch.randint(256, (length,), generator=generator, dtype=torch.uint8).tolist())
