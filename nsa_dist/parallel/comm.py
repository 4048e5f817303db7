"""Differentiable row exchanges over a process group (gloo or NCCL).

* :func:`fetch_rows`: an all-to-all in which every rank receives the rows of the other ranks' local tensors
  that it asked for (an :class:`ExchangePlan`); backward sends the gradients of the received rows back to
  their owners, which add them up.
* :func:`all_gather_rows`: every rank contributes a variable number of rows and receives all of them in rank
  order; backward reduce-scatters the gradients (each rank gets the sum over ranks of its rows' gradients).
* :func:`all_gather_ints`: a few integers of every rank in one fixed-size all-gather (checks that the ranks
  of a call agree before they exchange anything).

Both can be started early (:func:`start_fetch`, :func:`start_all_gather`, asynchronous collectives) and
finished later, so local work overlaps the transfer. Tensors exchange along dim 0; index tensors live on
the data's device (NCCL needs CUDA tensors, gloo CPU ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

INDEX_BYTES = 8  # int64 entries of the plan messages
SMALL_INTS = 16  # int64 entries of every all_gather_ints message, whatever a rank passes

# torch >= 2.10 renamed the tensor collectives; older releases only have the first names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def row_bytes(x: torch.Tensor) -> int:
    """Bytes of one dim-0 row of ``x``."""
    return math.prod(x.shape[1:]) * x.element_size()


@dataclass(frozen=True)
class ExchangePlan:
    """One all-to-all of rows: what this rank sends to and receives from every rank of the group.

    Attributes:
        send_rows: int64 ``[sum(send_counts)]`` local rows to send, grouped by destination rank (ascending).
        send_counts, recv_counts: rows sent to / received from each rank (``[P]``; 0 for this rank itself).
        recv_order: int64 ``[sum(recv_counts)]``: received row ``k`` answers request ``recv_order[k]`` (the
            order of the requests the plan was built from).
        setup_sent, setup_received: bytes moved to agree on the plan (0 when every rank derived it locally).
    """
    send_rows: torch.Tensor
    send_counts: List[int]
    recv_counts: List[int]
    recv_order: torch.Tensor
    setup_sent: int = 0
    setup_received: int = 0

    def data_bytes(self, bytes_per_row: int) -> tuple:
        """``(sent, received)`` bytes of the rows themselves for rows of ``bytes_per_row`` bytes."""
        return sum(self.send_counts) * bytes_per_row, sum(self.recv_counts) * bytes_per_row


def request_order(owner_rank: torch.Tensor, owner_row: torch.Tensor) -> torch.Tensor:
    """Permutation sorting requests by owner rank, then by the owner's row (the order rows travel in)."""
    by_row = torch.argsort(owner_row, stable=True)
    return by_row[torch.argsort(owner_rank[by_row], stable=True)]


def plan_from_requests(requests: Sequence[tuple], rank: int) -> ExchangePlan:
    """Plan of an exchange that every rank can derive on its own (e.g. halos fixed by the layout).

    Args:
        requests: for every rank ``r`` of the group, ``(owner_rank, owner_row)`` int64 ``[n_r]`` of the rows
            ``r`` needs from other ranks (no row owned by ``r`` itself); identical on all ranks.
        rank: this rank.
    """
    P = len(requests)
    send_rows = []
    for owner_rank, owner_row in requests:
        order = request_order(owner_rank, owner_row)
        send_rows.append(owner_row[order][owner_rank[order] == rank])
    owner_rank, owner_row = requests[rank]
    _check_not_own(owner_rank, rank)
    return ExchangePlan(torch.cat(send_rows), [int(rows.numel()) for rows in send_rows],
                        torch.bincount(owner_rank, minlength=P).tolist(), request_order(owner_rank, owner_row))


def _check_not_own(owner_rank: torch.Tensor, rank: int) -> None:
    if bool((owner_rank == rank).any()):
        raise ValueError(f"rank {rank} requests rows it owns itself; only other ranks' rows are exchanged")


class RowRequests(NamedTuple):
    """Rows one rank needs from the others, as runs of consecutive rows per owner (see :func:`encode_requests`)."""
    order: torch.Tensor      # int64 [n]: the requests sorted by (owner rank, owner row)
    owner_rank: torch.Tensor  # int64 [n], in that order
    runs: torch.Tensor       # int64 [R, 2]: (first owner row, length), grouped by owner rank
    runs_to: torch.Tensor    # int64 [P]: runs per owner rank

    @property
    def num_rows(self) -> int:
        """Rows requested."""
        return int(self.owner_rank.numel())

    @property
    def num_runs(self) -> int:
        """Runs of consecutive rows (one ``(start, length)`` message entry each)."""
        return int(self.runs.shape[0])


def encode_requests(owner_rank: torch.Tensor, owner_row: torch.Tensor, world_size: int) -> RowRequests:
    """Sort the requested rows (int64 ``[n]`` owner rank and local row each) by owner and merge consecutive
    rows of an owner into runs, the form in which :func:`plan_by_request` sends them."""
    order = request_order(owner_rank, owner_row)
    ranks, rows = owner_rank[order], owner_row[order]
    new_run = torch.ones_like(rows, dtype=torch.bool)
    new_run[1:] = (rows[1:] != rows[:-1] + 1) | (ranks[1:] != ranks[:-1])
    starts = torch.nonzero(new_run).flatten()
    lengths = torch.diff(starts, append=torch.tensor([rows.numel()], device=rows.device))
    runs = torch.stack([rows[starts], lengths], dim=1)
    return RowRequests(order, ranks, runs, torch.bincount(ranks[starts], minlength=world_size))


def plan_by_request(requests: RowRequests, group) -> ExchangePlan:
    """Plan of an exchange whose requests only the requester knows: an all-to-all of the run counts, then one
    of the ``(start, length)`` runs, tell every owner which of its rows to send.

    Args:
        requests: this rank's :func:`encode_requests` (no rows of its own).
        group: the process group.
    """
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_not_own(requests.owner_rank, rank)
    device = requests.runs.device
    runs_from = torch.empty_like(requests.runs_to)
    dist.all_to_all_single(runs_from, requests.runs_to, group=group)
    runs_in = requests.runs.new_empty(int(runs_from.sum()), 2)
    dist.all_to_all_single(runs_in, requests.runs.contiguous(), runs_from.tolist(), requests.runs_to.tolist(),
                           group=group)
    send_lengths = runs_in[:, 1]
    offsets = torch.arange(int(send_lengths.sum()), device=device) - torch.repeat_interleave(
        torch.cumsum(send_lengths, 0) - send_lengths, send_lengths)
    send_rows = torch.repeat_interleave(runs_in[:, 0], send_lengths) + offsets
    requester = torch.repeat_interleave(torch.arange(P, device=device), runs_from)
    send_counts = torch.zeros(P, dtype=torch.long, device=device).index_add_(0, requester, send_lengths).tolist()
    recv_counts = torch.bincount(requests.owner_rank, minlength=P).tolist()
    return ExchangePlan(send_rows, send_counts, recv_counts, requests.order,
                        setup_sent=plan_setup_bytes(P, requests.num_runs),
                        setup_received=plan_setup_bytes(P, int(runs_in.shape[0])))


def plan_setup_bytes(world_size: int, num_runs: int) -> int:
    """Bytes one rank sends (or receives) in :func:`plan_by_request` for ``num_runs`` runs: one count per
    other rank plus two int64 per run."""
    return INDEX_BYTES * (world_size - 1 + 2 * num_runs)


class Pending(NamedTuple):
    """A started asynchronous collective: its work handle, its output and its input buffer (kept alive)."""
    work: object
    output: torch.Tensor
    keep_alive: torch.Tensor

    def wait(self) -> torch.Tensor:
        """Block until the collective is done (on CUDA: make the current stream wait) and return the output."""
        self.work.wait()
        return self.output


def start_fetch(x: torch.Tensor, plan: ExchangePlan, group) -> Pending:
    """Start the all-to-all of ``plan`` on ``x [n, ...]`` (asynchronously); finish it with :func:`fetch_rows`."""
    send = x.detach().index_select(0, plan.send_rows).contiguous()
    recv = x.new_empty((sum(plan.recv_counts), *x.shape[1:]))
    work = dist.all_to_all_single(recv, send, plan.recv_counts, plan.send_counts, group=group, async_op=True)
    return Pending(work, recv, send)


class _FetchRows(torch.autograd.Function):
    """Forward: the all-to-all of a plan; backward: the reverse all-to-all, index-added into the owners' rows."""

    @staticmethod
    def forward(ctx, x, plan, group, pending):
        ctx.plan, ctx.group, ctx.shape = plan, group, x.shape
        return (pending if pending is not None else start_fetch(x, plan, group)).wait()

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        back = grad.new_empty((sum(plan.send_counts), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), plan.send_counts, plan.recv_counts, group=ctx.group)
        return grad.new_zeros(ctx.shape).index_add_(0, plan.send_rows, back), None, None, None


def fetch_rows(x: torch.Tensor, plan: ExchangePlan, group, pending: Optional[Pending] = None) -> torch.Tensor:
    """Rows of the other ranks' ``x`` requested by ``plan``: ``[sum(plan.recv_counts), ...]``, grouped by
    source rank (see ``plan.recv_order``). Differentiable: the gradient of each received row is added to its
    owner's ``x``. ``pending`` is the result of :func:`start_fetch` on the same ``x`` and plan, if started."""
    return _FetchRows.apply(x, plan, group, pending)


def _valid_rows(counts: Sequence[int], width: int, device) -> torch.Tensor:
    """Rows of the padded all-gather output (``width`` rows per rank) that hold real data."""
    return torch.cat([torch.arange(r * width, r * width + c, device=device) for r, c in enumerate(counts)])


def start_all_gather(x: torch.Tensor, counts: Sequence[int], group) -> Pending:
    """Start the all-gather of ``x [counts[rank], ...]`` (padded to ``max(counts)`` rows per rank)."""
    width = max(counts)
    padded = x.detach().new_zeros((width, *x.shape[1:]))
    padded[:x.shape[0]] = x.detach()
    out = x.new_empty((len(counts) * width, *x.shape[1:]))
    work = _all_gather_single(out, padded, group=group, async_op=True)
    return Pending(work, out, padded)


class _AllGatherRows(torch.autograd.Function):
    """Forward: padded all-gather, padding dropped; backward: padded reduce-scatter of the gradients."""

    @staticmethod
    def forward(ctx, x, counts, group, pending):
        ctx.counts, ctx.group, ctx.rows = counts, group, x.shape[0]
        out = (pending if pending is not None else start_all_gather(x, counts, group)).wait()
        return out.index_select(0, _valid_rows(counts, max(counts), x.device))

    @staticmethod
    def backward(ctx, grad):
        counts, width = ctx.counts, max(ctx.counts)
        padded = grad.new_zeros((len(counts) * width, *grad.shape[1:]))
        padded.index_copy_(0, _valid_rows(counts, width, grad.device), grad)
        mine = grad.new_empty((width, *grad.shape[1:]))
        _reduce_scatter_single(mine, padded, group=ctx.group)
        return mine[:ctx.rows], None, None, None


def all_gather_rows(x: torch.Tensor, counts: Sequence[int], group, pending: Optional[Pending] = None) -> torch.Tensor:
    """All ranks' rows concatenated in rank order: ``[sum(counts), ...]`` where rank ``r`` contributes
    ``counts[r]`` rows (``x`` is this rank's ``[counts[rank], ...]``). Backward: each rank's gradient is the
    sum over ranks of the gradients of its rows (a reduce-scatter). ``pending`` from :func:`start_all_gather`."""
    rank = dist.get_rank(group)
    if x.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} contributes {x.shape[0]} rows but counts[{rank}]={counts[rank]}")
    return _AllGatherRows.apply(x, list(counts), group, pending)


def all_gather_bytes(counts: Sequence[int], bytes_per_row: int) -> tuple:
    """``(sent, received)`` bytes of one rank in :func:`all_gather_rows` (padded rows travel too)."""
    moved = (len(counts) - 1) * max(counts) * bytes_per_row
    return moved, moved


def all_gather_ints(values: Sequence[int], group, device) -> List[List[int]]:
    """Every rank's ``values`` (at most :data:`SMALL_INTS` integers) in rank order, each list as long as this
    rank's ``values``. One all-gather of a ``[SMALL_INTS]`` int64 tensor on ``device`` (a CUDA device under
    NCCL), zero-padded: its size is the same on every rank whatever the ranks pass, so it cannot mismatch."""
    if len(values) > SMALL_INTS:
        raise ValueError(f"all_gather_ints takes at most SMALL_INTS={SMALL_INTS} values, got {len(values)}")
    mine = torch.zeros(SMALL_INTS, dtype=torch.long, device=device)
    mine[:len(values)] = torch.tensor(list(values), dtype=torch.long)
    out = mine.new_empty(dist.get_world_size(group) * SMALL_INTS)
    _all_gather_single(out, mine, group=group)
    return [row[:len(values)] for row in out.view(-1, SMALL_INTS).tolist()]
