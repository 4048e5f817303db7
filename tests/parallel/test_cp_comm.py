"""fetch_rows / all_gather_rows on gloo ranks: forward and gradients against a single-process computation, and
their byte counts."""
import pytest
import torch

from tests.helpers.cp_harness import generator, run_ranks
from nsa_dist.parallel.comm import (INDEX_BYTES, all_gather_bytes, all_gather_rows, encode_requests, fetch_rows,
                                    plan_by_request, plan_from_requests, row_bytes, start_all_gather, start_fetch)

pytestmark = pytest.mark.slow  # spawns gloo process groups

P = 3
ROWS = [11, 4, 9]  # local rows per rank (uneven)
FEATURES = (2, 3)


def local_rows(seed, rank):
    return torch.randn(ROWS[rank], *FEATURES, generator=generator(seed, 0, rank),
                       dtype=torch.float64)


def requests_of(seed, rank):
    """Distinct random (owner rank, owner row) pairs rank ``rank`` needs from the other ranks (shuffled)."""
    gen = generator(seed, 1, rank)
    pairs = [(s, i) for s in range(P) if s != rank for i in range(ROWS[s])]
    keep = torch.randperm(len(pairs), generator=gen)[:7 + 3 * rank].tolist()
    owner_rank = torch.tensor([pairs[k][0] for k in keep])
    owner_row = torch.tensor([pairs[k][1] for k in keep])
    return owner_rank, owner_row


def weights(seed, rank, n):
    return torch.randn(n, *FEATURES, generator=generator(seed, 2, rank),
                       dtype=torch.float64)


def exchange_worker(rank, world, seed):
    x = local_rows(seed, rank).requires_grad_()
    owner_rank, owner_row = requests_of(seed, rank)
    dynamic = plan_by_request(encode_requests(owner_rank, owner_row, world), None)
    static = plan_from_requests([requests_of(seed, r) for r in range(world)], rank)
    fetched_dyn = fetch_rows(x, dynamic, None)  # synchronous
    fetched_static = fetch_rows(x, static, None, start_fetch(x, static, None))  # started early
    counts = ROWS
    gathered = all_gather_rows(x, counts, None, start_all_gather(x, counts, None))
    gathered_sync = all_gather_rows(x * 2, counts, None)
    # undo the plans' receive order: row k answers request recv_order[k]
    as_requested = torch.empty_like(fetched_dyn).index_copy(0, dynamic.recv_order, fetched_dyn)
    as_requested_static = torch.empty_like(fetched_static).index_copy(0, static.recv_order, fetched_static)
    n = owner_rank.numel()
    loss = ((as_requested * weights(seed, rank, n)).sum() + 3 * (as_requested_static * weights(seed, rank, n)).sum()
            + (gathered * weights(seed, rank + 10, sum(counts))).sum() + gathered_sync.square().sum())
    loss.backward()
    return {"fetched": as_requested.detach(), "fetched_static": as_requested_static.detach(),
            "gathered": gathered.detach(), "grad": x.grad, "plan": dynamic, "static_plan": static,
            "row_bytes": row_bytes(x), "gather_bytes": all_gather_bytes(counts, row_bytes(x))}


def num_runs(owner_rank, owner_row):
    """Maximal runs of consecutive rows per owner, counted directly from the set of requested rows."""
    wanted = set(zip(owner_rank.tolist(), owner_row.tolist()))
    return sum(1 for s, i in wanted if (s, i - 1) not in wanted)


def test_fetch_rows_and_all_gather_rows_match_single_process(seed):
    results = run_ranks(exchange_worker, P, seed)
    xs = [local_rows(seed, r).requires_grad_() for r in range(P)]
    loss = 0
    for r in range(P):
        owner_rank, owner_row = requests_of(seed, r)
        expected = torch.stack([xs[s][i] for s, i in zip(owner_rank.tolist(), owner_row.tolist())])
        assert torch.equal(results[r]["fetched"], expected.detach()), f"seed {seed} rank {r}"
        assert torch.equal(results[r]["fetched_static"], expected.detach()), f"seed {seed} rank {r}"
        everything = torch.cat(xs)
        assert torch.equal(results[r]["gathered"], everything.detach())
        n = owner_rank.numel()
        loss = (loss + (expected * weights(seed, r, n)).sum() + 3 * (expected * weights(seed, r, n)).sum()
                + (everything * weights(seed, r + 10, sum(ROWS))).sum() + (2 * everything).square().sum())
    loss.backward()
    for r in range(P):
        torch.testing.assert_close(results[r]["grad"], xs[r].grad, rtol=0, atol=1e-12,
                                   msg=lambda m: f"seed {seed} rank {r}: {m}")

    rb = FEATURES[0] * FEATURES[1] * 8
    for r in range(P):
        plan, static = results[r]["plan"], results[r]["static_plan"]
        owner_rank, owner_row = requests_of(seed, r)
        received = owner_rank.numel() * rb
        sent = sum(int((requests_of(seed, q)[0] == r).sum()) for q in range(P)) * rb
        assert results[r]["row_bytes"] == rb
        assert plan.data_bytes(rb) == (sent, received) == static.data_bytes(rb)
        assert plan.setup_sent == INDEX_BYTES * (P - 1 + 2 * num_runs(owner_rank, owner_row))
        runs_in = sum(num_runs(*[t[requests_of(seed, q)[0] == r] for t in requests_of(seed, q)])
                      for q in range(P) if q != r)
        assert plan.setup_received == INDEX_BYTES * (P - 1 + 2 * runs_in)
        assert static.setup_sent == static.setup_received == 0
        assert results[r]["gather_bytes"] == ((P - 1) * max(ROWS) * rb,) * 2
