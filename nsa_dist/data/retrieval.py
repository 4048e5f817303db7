"""Synthetic long-context retrieval: key-value pairs scattered through noise, queried at the end.

A sequence of length ``T`` is random filler tokens with ``num_pairs`` (key, value) token pairs written
at random places in its first ``T - 3 * num_pairs`` positions; it ends with one query per pair, in a
random order: ``QUERY key value``. The model must predict each queried ``value`` right after
``QUERY key``; only those positions carry a loss, so a model that cannot look back across the
sequence stays at ``ln(num_values)``. Keys in a sequence are distinct.

With ``fused=True`` each needle in the context is one token standing for its (key, value) pair (``num_keys *
num_values`` such tokens), and the queries stay ``QUERY key value``: one attention hop from the queried key to
its needle finds the answer, where the two-token form needs an induction circuit (a previous-token head, then a
match) that takes far longer to form from scratch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

IGNORE_INDEX = -100


class Needles(NamedTuple):
    """Where the retrieval task's answers and their needles are: ``answer_rows [B, P]`` the positions whose
    target is a queried value (the queried key's position), ``needle_rows [B, P]`` the position holding the
    answer in the context (the fused needle token, or the pair's value token), in the same order."""
    answer_rows: torch.Tensor
    needle_rows: torch.Tensor


class Batch(NamedTuple):
    """``tokens [B, T]`` input ids; ``targets [B, T]`` next-token labels, ``IGNORE_INDEX`` where no loss;
    ``needles``: the answer and needle positions of a retrieval batch (None for other data)."""
    tokens: torch.Tensor
    targets: torch.Tensor
    needles: Optional[Needles] = None


@dataclass(frozen=True)
class RetrievalTask:
    """Token layout: ``[0, num_filler)`` filler, then keys, then values, then (``fused``) the ``num_keys *
    num_values`` needle tokens ``key * num_values + value``, then the QUERY marker."""

    num_pairs: int = 8
    num_keys: int = 32
    num_values: int = 32
    num_filler: int = 32
    fused: bool = False

    def __post_init__(self):
        for name in ("num_pairs", "num_keys", "num_values", "num_filler"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be true or false, got {self.fused!r}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds num_keys={self.num_keys}: keys must be distinct")

    @property
    def vocab_size(self) -> int:
        return self.num_filler + self.num_keys + self.num_values + self.fused * self.num_keys * self.num_values + 1

    @property
    def query_token(self) -> int:
        return self.vocab_size - 1

    def min_seq_len(self) -> int:
        """Shortest sequence that holds the pairs (2 tokens each, non-overlapping) and the queries (3 each)."""
        return 5 * self.num_pairs

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """A batch of ``batch_size`` independent sequences of ``seq_len`` tokens (CPU tensors), with its
        :class:`Needles`."""
        if seq_len < self.min_seq_len():
            raise ValueError(f"seq_len={seq_len} is too short for num_pairs={self.num_pairs}: "
                             f"need at least {self.min_seq_len()}")
        P = self.num_pairs
        context = seq_len - 3 * P
        tokens = torch.randint(0, self.num_filler, (batch_size, seq_len), generator=generator)
        targets = torch.full((batch_size, seq_len), IGNORE_INDEX)
        key_base, value_base = self.num_filler, self.num_filler + self.num_keys
        fused_base = value_base + self.num_values
        answer_rows = torch.empty(batch_size, P, dtype=torch.long)
        needle_rows = torch.empty(batch_size, P, dtype=torch.long)
        for b in range(batch_size):
            key_ids = torch.randperm(self.num_keys, generator=generator)[:P]
            value_ids = torch.randint(0, self.num_values, (P,), generator=generator)
            keys, values = key_ids + key_base, value_ids + value_base
            if self.fused:  # one needle token per pair at P distinct places
                places = torch.randperm(context, generator=generator)[:P]
                tokens[b, places] = fused_base + key_ids * self.num_values + value_ids
            else:  # P non-overlapping 2-token slots: choose P starts in a shrunk range, spread out
                starts = torch.sort(torch.randperm(context - P, generator=generator)[:P]).values + torch.arange(P)
                tokens[b, starts], tokens[b, starts + 1] = keys, values
                places = starts + 1
            order = torch.randperm(P, generator=generator)
            q_pos = context + 3 * torch.arange(P)
            tokens[b, q_pos] = self.query_token
            tokens[b, q_pos + 1] = keys[order]
            tokens[b, q_pos + 2] = values[order]
            targets[b, q_pos + 1] = values[order]  # predicted at the key, i.e. the token before the value
            answer_rows[b], needle_rows[b] = q_pos + 1, places[order]
        return Batch(tokens, targets, Needles(answer_rows, needle_rows))
