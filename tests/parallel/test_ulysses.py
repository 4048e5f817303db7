"""NSA under Ulysses sequence parallelism (all-to-all over heads), alone and inside context parallelism, equals the
single-rank layer: the output, the gradient of x and the sum over ranks of every parameter's gradient (q, K/V and
gate projections, both compressors, output projection), with packed documents whose lengths are not multiples of
the block sizes and GQA ratios with fewer KV heads than Ulysses ranks (replicated) as well as more. The ranks form
the ``DP x CP x U`` grid of :class:`~nsa_dist.deepspeed.ContextDataParallelGroups` and shard batches as the
trainer does (:class:`~nsa_dist.training.ContextParallelGroup`). Also: the all-to-all bytes per rank, and the
errors for head counts and lengths that do not split."""
import functools
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_dist.deepspeed.groups import ContextDataParallelGroups
from nsa_dist.parallel import CPLayout, split_sequence, ulysses_local_heads
from nsa_dist.training import ContextParallelGroup
from tests.helpers.cp_cases import DK, DV, GEOMETRY, HQ, Case, cu_seqlens_of, module_and_inputs, parameter_grads, \
    sum_over_ranks
from tests.helpers.cp_harness import run_ranks, value_error_messages

pytestmark = pytest.mark.slow  # spawns gloo process groups

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
L_SEL = GEOMETRY["select_len"]


@dataclass(frozen=True)
class UlyssesCase:
    """``U`` Ulysses ranks inside each of ``case.P`` context-parallel shards (``case.P = 1``: no context
    parallelism); ``case`` is the layer and its inputs (HQ = 4 query heads, ``case.kv_heads`` KV heads)."""
    U: int
    case: Case

    @property
    def world(self) -> int:
        return self.U * self.case.P

    def name(self) -> str:
        return f"U{self.U}-CP{self.case.P}-{self.case.name()}"


CASES = [
    # U = 2 alone: one KV head replicated on both ranks, G = 2, G = 1 with shared K/V; T not a multiple of l, l'
    UlyssesCase(2, Case(1, "zigzag", "auto", kv_heads=1, T=150, num_docs=3)),
    UlyssesCase(2, Case(1, "zigzag", "auto", kv_heads=2, T=102, num_docs=0, batch=2, position_offset=5)),
    UlyssesCase(2, Case(1, "zigzag", "auto", kv_heads=4, T=122, num_docs=4, kv_sharing="shared")),
    UlyssesCase(2, Case(1, "zigzag", "auto", kv_heads=1, T=98, num_docs=3, dtype=torch.float64)),
    # U = 4: one query head per rank, each of the 2 KV heads replicated on 2 ranks
    UlyssesCase(4, Case(1, "zigzag", "auto", kv_heads=2, T=196, num_docs=4)),
    # U = 2 inside CP = 2 (4 ranks): packed documents straddle the CP chunks and the Ulysses pieces
    UlyssesCase(2, Case(2, "zigzag", "sparse", kv_heads=1, T=160, num_docs=4)),
    UlyssesCase(2, Case(2, "contiguous", "auto", kv_heads=2, T=96, num_docs=0, batch=2)),
    UlyssesCase(2, Case(2, "zigzag", "allgather", kv_heads=4, T=128, num_docs=3, dtype=torch.float64)),
]


@pytest.fixture(scope="module")
def seed() -> int:
    env = os.environ.get("NSA_TEST_SEED")
    return int(env) if env else torch.seed() % (2 ** 63)


def module_job(rank, world, ucase: UlyssesCase, seed):
    """One rank of the grid: its piece of x through the layer, backward of ``sum(y * dy)`` on its rows."""
    case = ucase.case
    groups = ContextDataParallelGroups(case.P, "cpu", ucase.U)
    cp_group = groups.cp_group if case.P > 1 else None
    layer, x, dy, pos = module_and_inputs(case, seed, cp_group=cp_group)
    layer.ulysses_group = groups.ulysses_group
    sequence = ContextParallelGroup(cp_group, case.kind, L_SEL, ulysses_group=groups.ulysses_group)
    assert (sequence.rank, sequence.ulysses_rank, sequence.sequence_rank) == (groups.cp_rank, groups.ulysses_rank,
                                                                              rank)
    x_local = sequence.shard(x).requires_grad_()
    y = layer(x_local, cu_seqlens=cu_seqlens_of(case, seed), position_ids=pos)
    (y * sequence.shard(dy)).sum().backward()
    return {"o": y.detach(), "dx": x_local.grad, "params": parameter_grads(layer),
            "stats": layer.last_ulysses_stats.to_dict(), "cp_rank": groups.cp_rank}


def error_job(rank, world):
    """Messages of the layer's errors on a Ulysses group of all ``world`` ranks: KV heads that do not split, a
    selection loss, and ``cu_seqlens`` that do not end at the gathered length ``world * T_local``."""
    def layer(**overrides):
        cfg = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, **GEOMETRY, window=16)
        return NativeSparseAttention(NSAConfig(**{**cfg, **overrides}), ulysses_group=dist.group.WORLD)

    x = torch.randn(1, 30, 16)
    return value_error_messages([
        lambda: layer(num_heads=6, num_kv_heads=3)(x),
        lambda: layer(selection_loss_weight=0.5)(x),
        lambda: layer()(x, cu_seqlens=torch.tensor([0, 10, 50], dtype=torch.int32)),
    ])


def run_jobs(rank, world, cases, seed):
    return [module_job(rank, world, ucase, seed) for ucase in cases] + [error_job(rank, world)]


@functools.lru_cache(maxsize=None)
def results_for(world, seed):
    """Per case on ``world`` ranks, the list of the ranks' results (one spawn per world size); under the key
    ``"errors"`` the ranks' messages of :func:`error_job`."""
    cases = [c for c in CASES if c.world == world]
    per_rank = run_ranks(run_jobs, world, cases, seed, timeout=300)
    return {c: [per_rank[r][i] for r in range(world)] for i, c in enumerate(cases + ["errors"])}


def single_rank(case: Case, seed):
    layer, x, dy, pos = module_and_inputs(case, seed)
    x = x.requires_grad_()
    y = layer(x, cu_seqlens=cu_seqlens_of(case, seed), position_ids=pos)
    (y * dy).sum().backward()
    return y.detach(), x.grad, parameter_grads(layer)


def unshard(ucase: UlyssesCase, pieces):
    """The global ``[B, T, ...]`` from the ranks' pieces (rank order ``cp_rank * U + ulysses_rank``)."""
    U, case = ucase.U, ucase.case
    shards = [torch.cat(pieces[c * U:(c + 1) * U], dim=1) for c in range(case.P)]
    return shards[0] if case.P == 1 else CPLayout(case.P, case.T, case.kind, L_SEL).unshard(shards)


@pytest.mark.parametrize("ucase", CASES, ids=UlyssesCase.name)
def test_ulysses_equals_single_rank(seed, ucase):
    case = ucase.case
    ranks = results_for(ucase.world, seed)[ucase]
    o, dx, params = single_rank(case, seed)
    errors = {"o": (unshard(ucase, [r["o"] for r in ranks]) - o).abs().max().item(),
              "dx": (unshard(ucase, [r["dx"] for r in ranks]) - dx).abs().max().item()}
    tokens = case.batch * case.T
    summed = sum_over_ranks([r["params"] for r in ranks])
    assert len(summed) >= 10, sorted(summed)  # q/kv/gate/o projections and the two mlp compressors
    for n, g in summed.items():
        assert params[n].abs().max() > 0, f"{n}: zero reference gradient, the comparison would be vacuous"
        errors[f"d[{n}]/BT"] = ((g - params[n]) / tokens).abs().max().item()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= ATOL[case.dtype], (f"{ucase.name()} seed {seed}: max abs error {errors[worst]:.3g} in "
                                               f"{worst}; {errors}")


@pytest.mark.parametrize("ucase", CASES, ids=UlyssesCase.name)
def test_all_to_all_bytes_per_rank(seed, ucase):
    """Each rank sends ``(U - 1) / U`` of its q, K/V and gates (``U / H`` copies of each with ``U > H``) and of its
    output, and receives as much."""
    U, case = ucase.U, ucase.case
    rows = case.batch * case.T // ucase.world
    size = torch.finfo(case.dtype).bits // 8
    branches = 3 if case.kv_sharing == "separate" else 1
    copies = max(1, U // case.kv_heads)
    to_heads = rows * copies * (HQ * (DK + 3) + branches * case.kv_heads * (DK + DV)) * size * (U - 1) // U
    to_sequence = rows * HQ * DV * size * (U - 1) // U
    for r in results_for(ucase.world, seed)[ucase]:
        exchanges = r["stats"]["exchanges"]
        assert r["stats"]["world_size"] == U
        assert exchanges["to_heads"] == {"sent": to_heads, "received": to_heads}, exchanges
        assert exchanges["to_sequence"] == {"sent": to_sequence, "received": to_sequence}, exchanges


def test_layer_errors_name_the_setting(seed):
    for heads, loss, cu in results_for(2, seed)["errors"]:
        assert heads is not None and "Ulysses size=2 and num_kv_heads=3" in heads, heads
        assert loss is not None and "selection_loss_weight=0.5 is not supported under Ulysses" in loss, loss
        assert cu is not None and "end at T=60" in cu and "end 50" in cu, cu


@pytest.mark.parametrize("heads, kv_heads, size, words", [
    (6, 2, 4, ["Ulysses size=4 must divide num_heads=6"]),
    (12, 3, 2, ["Ulysses size=2 and num_kv_heads=3", "one must divide the other"]),
    (12, 6, 4, ["Ulysses size=4 and num_kv_heads=6"]),
])
def test_heads_that_do_not_split_are_refused(heads, kv_heads, size, words):
    with pytest.raises(ValueError) as err:
        ulysses_local_heads(heads, kv_heads, size)
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("heads, kv_heads, size, local", [(8, 2, 2, (4, 1)), (8, 2, 4, (2, 1)), (8, 1, 8, (1, 1)),
                                                          (8, 8, 2, (4, 4))])
def test_local_heads(heads, kv_heads, size, local):
    assert ulysses_local_heads(heads, kv_heads, size) == local


def test_sequence_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="of 10 rows does not split over 4 Ulysses ranks"):
        split_sequence(torch.zeros(1, 10, 2), 4, 0)
    assert torch.equal(split_sequence(torch.arange(8).view(1, 8), 4, 2), torch.tensor([[4, 5]]))
