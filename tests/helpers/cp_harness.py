"""Test helpers: per-stream seeded generators and gloo ranks with deadlines, so that a hang fails the test."""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

from nsa_dist.launch import run_local_group

COLLECTIVE_TIMEOUT_S = 60  # a collective that waits longer (a rank died or diverged) raises in every rank


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for stream ``keys`` of test seed ``seed`` (identical in every process)."""
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key + 1) % (2 ** 63)
    return torch.Generator().manual_seed(value)


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 180) -> List[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (one thread each), killed after ``timeout`` s."""
    return run_local_group(fn, world_size, *args, threads=1, timeout=timeout,
                           collective_timeout_s=COLLECTIVE_TIMEOUT_S)


def value_error_messages(attempts: List[Callable[[], Any]]) -> List[Optional[str]]:
    """Run each attempt in turn: the message of the ValueError it raised, or None where it raised nothing."""
    messages = []
    for attempt in attempts:
        try:
            attempt()
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    return messages
