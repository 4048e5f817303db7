"""Ranks of one context-parallel call given different sequences (lengths, batch sizes, cu_seqlens, local rows)
all raise the same ValueError naming what differs and each rank's value, instead of mismatching in a collective
(gloo aborts) or hanging; afterwards the group still works. 2 gloo ranks, tiny shapes, both CP ops."""
import pytest
import torch
import torch.distributed as dist

from tests.helpers.cp_cases import Case, branch_inputs, compressors, functional_inputs
from tests.helpers.cp_harness import run_ranks, value_error_messages
from nsa_dist.parallel import CPLayout, ShardedSequence, context_parallel_nsa
from nsa_dist.parallel.dense import allgather_dense_attention

pytestmark = pytest.mark.slow  # spawns gloo process groups

P = 2
SEED = 0
L_SEL = 8


def cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def nsa_call(T, cu_seqlens=None, rows=None):
    """context_parallel_nsa on this rank's first ``rows`` (default T/P) rows of a length-``T`` sequence."""
    case = Case(P, "zigzag", "auto", kv_heads=1, T=T, num_docs=0)
    rows = T // P if rows is None else rows
    local = {n: t[:, :rows] for n, t in branch_inputs(case, SEED).items()}
    compress_k, compress_v, _ = compressors(case, SEED)
    shards = ShardedSequence(CPLayout(P, T, "zigzag", L_SEL), cu_seqlens)
    return context_parallel_nsa(*functional_inputs(local), geometry=case.nsa_geometry, shards=shards, group=None,
                                compress_k=compress_k, compress_v=compress_v)[0]


def dense_call(T, batch=1, cu_seqlens=None):
    """allgather_dense_attention on the B*T/P local rows of ``batch`` rows of length ``T``."""
    q = torch.randn(1, batch * T // P, 4, 8, generator=torch.Generator().manual_seed(SEED))
    shards = ShardedSequence(CPLayout(P, T, "contiguous"), cu_seqlens, batch)
    return allgather_dense_attention(q, q, q, shards=shards, group=dist.group.WORLD)


def mismatch_job(rank, world):
    """Each attempt's ValueError message on this rank (None where nothing was raised), then a call that agrees."""
    attempts = [
        lambda: nsa_call(64 if rank == 0 else 96),
        lambda: nsa_call(64, cu(0, 20 if rank == 0 else 30, 64)),
        lambda: nsa_call(64, rows=32 if rank == 0 else 30),
        lambda: dense_call(32 if rank == 0 else 64, batch=2 if rank == 0 else 1),
        lambda: dense_call(64, cu_seqlens=None if rank == 0 else cu(0, 10, 64)),
    ]
    return value_error_messages(attempts), tuple(dense_call(64, cu_seqlens=cu(0, 10, 64)).shape)


def test_ranks_given_different_sequences_all_raise_the_same_error():
    results = run_ranks(mismatch_job, P, timeout=90)
    expected = [
        ["context-parallel NSA: the 2 ranks", "sequence length T (rank 0: 64, rank 1: 96)",
         "local rows B*T/P (rank 0: 32, rank 1: 48)", "rows of the local q (dim 1) (rank 0: 32, rank 1: 48)"],
        ["cu_seqlens (rank 0: [0, 20, 64], rank 1: [0, 30, 64])"],
        ["rows of the local q (dim 1) (rank 0: 32, rank 1: 30)"],
        ["context-parallel dense attention", "sequence length T (rank 0: 32, rank 1: 64)",
         "batch B (rank 0: 2, rank 1: 1)"],
        ["cu_seqlens (rank 0: none, rank 1: [0, 10, 64])"],
    ]
    (messages, shape), (other, other_shape) = results
    assert messages == other, "the ranks raised different errors"
    for message, fragments in zip(messages, expected, strict=True):
        assert message is not None, fragments
        for fragment in fragments + ["Every rank must pass the same layout, batch B, T and cu_seqlens"]:
            assert fragment in message, message
    assert "local rows B*T/P (" not in messages[3], messages[3]  # B*T/P agrees (32): only B and T differ
    assert shape == other_shape == (1, 32, 4, 8)  # no rank was left inside a collective
