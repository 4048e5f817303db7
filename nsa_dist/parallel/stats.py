"""Per-call statistics of a sequence-parallel NSA layer: bytes moved by each exchange of context parallelism
(:class:`CPStats`, with the selection path) and of the Ulysses all-to-all over heads (:class:`UlyssesStats`)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Dict

logger = logging.getLogger(__name__)

SELECTION_PATHS = ("sparse", "allgather")


@dataclass
class ExchangeBytes:
    """Bytes one rank sent to and received from the other ranks in one exchange (forward pass; the
    backward pass moves the same amounts in the opposite direction)."""
    sent: int = 0
    received: int = 0


@dataclass
class ExchangeRecord:
    """Bytes one rank moved in one forward call, per named exchange (the backward pass moves the same amounts in
    the opposite direction).

    Attributes:
        rank, world_size: this rank and the group size.
        exchanges: :class:`ExchangeBytes` per exchange name.
    """
    rank: int
    world_size: int
    exchanges: Dict[str, ExchangeBytes] = field(default_factory=dict)

    def add(self, name: str, sent: int, received: int) -> None:
        """Count ``sent`` / ``received`` bytes for exchange ``name``."""
        entry = self.exchanges.setdefault(name, ExchangeBytes())
        entry.sent += int(sent)
        entry.received += int(received)

    @property
    def sent_bytes(self) -> int:
        """Bytes sent by this rank over all exchanges."""
        return sum(e.sent for e in self.exchanges.values())

    @property
    def received_bytes(self) -> int:
        """Bytes received by this rank over all exchanges."""
        return sum(e.received for e in self.exchanges.values())

    def to_dict(self) -> dict:
        """Plain-data form for benchmark JSON."""
        return {**asdict(self), "sent_bytes": self.sent_bytes, "received_bytes": self.received_bytes}


@dataclass
class UlyssesStats(ExchangeRecord):
    """What one forward call of NSA under Ulysses sequence parallelism moved on one rank of its Ulysses group
    (:mod:`nsa_dist.parallel.ulysses`). Exchanges: ``to_heads`` (q, every branch's K/V and the gates, from
    sequence shards to head shards, with the KV heads replicated when the group is larger than the KV head count)
    and ``to_sequence`` (the attention output back to sequence shards)."""


@dataclass
class CPStats(ExchangeRecord):
    """What one forward call of context-parallel NSA moved on one rank.

    Attributes:
        rank, world_size: this rank and the group size.
        exchanges: bytes per exchange: ``agreement`` (the check that the ranks split the same sequence),
            ``compression_halo``, ``window_halo``, ``compressed_kv`` (all-gather),
            ``selection_ids`` (run lists of the sparse fetch and the all-reduced counts of the ``auto``
            choice), ``selection_kv`` (the selected blocks and the tail halo, or the raw all-gather),
            ``key_bounds`` (the all-reduce of key-bound scoring, a ring estimate), ``selection_keys`` (the
            all-gather of the raw selection keys for max-logit scoring).
        selection_path: ``"sparse"`` or ``"allgather"``.
        unique_remote_blocks: distinct selection blocks needed by this rank that hold rows of another rank.
        sparse_bytes_total, allgather_bytes_total: bytes (summed over ranks) of each selection path as
            estimated for the ``"auto"`` choice (``-1`` where the path was forced and nothing was estimated).
    """
    selection_path: str = ""
    unique_remote_blocks: int = 0
    sparse_bytes_total: int = -1
    allgather_bytes_total: int = -1

    def log(self) -> None:
        """One debug line: per-exchange bytes, the selection path and the remote block count."""
        if logger.isEnabledFor(logging.DEBUG):
            parts = ", ".join(f"{name} sent {e.sent} B recv {e.received} B" for name, e in self.exchanges.items())
            logger.debug("CP NSA rank %d/%d: %s; selection path %s, %d unique remote blocks", self.rank,
                         self.world_size, parts, self.selection_path, self.unique_remote_blocks)
