"""Sequence parallelism for NSA: context parallelism, the sequence split over a process group (zigzag, contiguous
or per-document layout, :mod:`.layout`) with exchanges of compressed K/V, selected blocks and halos (see
:func:`context_parallel_nsa`), and Ulysses parallelism, an all-to-all over heads around the layer's branches
(:mod:`.ulysses`)."""
from ..branch_kv import BranchKV
from .comm import ExchangePlan, all_gather_rows, fetch_rows, plan_by_request, plan_from_requests
from .nsa import context_parallel_nsa
from .selected_exchange import SELECTION_EXCHANGES
from .sharding import LAYOUTS, CPLayout, Segment, ShardedSequence
from .stats import CPStats, ExchangeBytes, UlyssesStats
from .ulysses import heads_to_sequence, sequence_to_heads, split_sequence, ulysses_local_heads

__all__ = [
    "CPLayout",
    "LAYOUTS",
    "ShardedSequence",
    "Segment",
    "context_parallel_nsa",
    "BranchKV",
    "SELECTION_EXCHANGES",
    "CPStats",
    "ExchangeBytes",
    "UlyssesStats",
    "sequence_to_heads",
    "heads_to_sequence",
    "split_sequence",
    "ulysses_local_heads",
    "ExchangePlan",
    "fetch_rows",
    "all_gather_rows",
    "plan_from_requests",
    "plan_by_request",
]
