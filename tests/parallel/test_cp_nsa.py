"""Context-parallel NSA on 2, 4 and 8 gloo ranks equals the single-rank result: outputs and the gradients of q,
every branch's k/v, the gates and the compressor weights (functional op), and of x and every parameter
(NativeSparseAttention with cp_group). float32, max abs error <= 1e-5. Also: the sparse path is taken and
moves fewer bytes when selections stay local; bad groups and lengths raise errors naming the numbers. Layouts:
zigzag, contiguous and per_document (megatron-core's split of packed thd batches)."""
import functools
import os

import pytest
import torch
import torch.distributed as dist

import nsa_kernels
from tests.helpers.cp_cases import (BRANCH_INPUTS, GEOMETRY, Case, branch_inputs, compressors, cu_seqlens_of,
                                    functional_inputs, grad_or_zero, layout_of, module_and_inputs, parameter_grads,
                                    sum_over_ranks)
from tests.helpers.cp_harness import run_ranks, value_error_messages
from nsa_dist.parallel import CPLayout, ShardedSequence, context_parallel_nsa
from nsa_dist.parallel.selected_exchange import cheaper_selection_path

pytestmark = pytest.mark.slow  # spawns gloo process groups

# max abs error. Inputs' gradients come from loss = sum(o * dy); parameters' gradients sum over every token, so
# they are compared as gradients of the token-mean loss (divided by B * T), which keeps them O(1) like the rest:
# their float32 rounding (a different summation order on each rank) is then far below the tolerance, while a
# wrong contribution of a single token still shows up at ~1/(B*T) >> 1e-5. float64 cases check everything tightly.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
L_SEL = GEOMETRY["select_len"]

PER_DOCUMENT_P4 = (("block_len", 12), ("select_len", 12))  # stride 4
FUNCTIONAL = [
    # P = 2: T = 288 (not a power of two), chunks of 72 (zigzag) / 144 (contiguous)
    Case(2, "zigzag", "sparse", kv_heads=4, T=288),
    Case(2, "zigzag", "allgather", kv_heads=1, T=288),
    Case(2, "contiguous", "sparse", kv_heads=1, T=288),
    Case(2, "contiguous", "allgather", kv_heads=4, T=288, num_docs=0),
    Case(2, "zigzag", "auto", kv_heads=1, T=96, window=40),  # window 40 > chunk 24
    Case(2, "contiguous", "auto", kv_heads=2, T=224, window=0),  # no window branch
    # documents shorter than l and l' (some without any compressed block), a window of 3, one long document
    Case(2, "zigzag", "sparse", kv_heads=2, T=64, window=3, doc_lengths=(3, 1, 7, 2, 5, 0, 30, 4, 8, 4)),
    # P = 4: T = 320, chunks of 40 (zigzag) / 80 (contiguous)
    Case(4, "zigzag", "sparse", kv_heads=1, T=320, num_docs=5),
    Case(4, "zigzag", "allgather", kv_heads=4, T=320),
    Case(4, "contiguous", "sparse", kv_heads=4, T=320),
    Case(4, "contiguous", "allgather", kv_heads=1, T=320, num_docs=0),
    Case(4, "zigzag", "sparse", kv_heads=4, T=192, window=40, num_docs=2),  # window 40 > chunk 24: two halos
    # P = 8 (the largest CP of the 8-rank launches): zigzag chunks of 24 / 16, contiguous chunks of 40
    Case(8, "zigzag", "sparse", kv_heads=2, T=384, num_docs=5),
    Case(8, "contiguous", "auto", kv_heads=4, T=320, num_docs=0),
    Case(8, "zigzag", "allgather", kv_heads=1, T=256, window=40),  # window 40 > chunk 16: three halos
    # per_document (megatron-core's thd split): each document in 2P chunks, its length a multiple of 2P but not of
    # l = l' = 8 (P = 2); chunks of 1 .. 13 tokens, so selection blocks and windows span chunks of several ranks
    Case(2, "per_document", "sparse", kv_heads=4, T=288, doc_lengths=(52, 4, 0, 100, 12, 84, 36)),
    Case(2, "per_document", "allgather", kv_heads=1, T=288, num_docs=5),
    Case(2, "per_document", "auto", kv_heads=2, T=96, window=40, num_docs=3),
    Case(2, "per_document", "sparse", kv_heads=2, T=64, window=3, doc_lengths=(4, 12, 0, 28, 4, 8, 8)),
    # P = 4: lengths multiples of 8, not of l = l' = 12
    Case(4, "per_document", "sparse", kv_heads=1, T=320, doc_lengths=(56, 8, 120, 0, 40, 96),
         geometry=PER_DOCUMENT_P4),
    Case(4, "per_document", "allgather", kv_heads=4, T=320, num_docs=4, geometry=PER_DOCUMENT_P4),
    Case(4, "per_document", "auto", kv_heads=2, T=192, window=40, num_docs=2, geometry=PER_DOCUMENT_P4),
]
MODULE = [
    Case(2, "zigzag", "auto", kv_heads=1, T=160, num_docs=3),
    Case(2, "contiguous", "sparse", kv_heads=4, T=96, num_docs=0, batch=2, position_offset=5),
    Case(4, "zigzag", "allgather", kv_heads=4, T=192, num_docs=0, batch=2),
    Case(4, "contiguous", "auto", kv_heads=1, T=128, num_docs=3),
    Case(2, "zigzag", "sparse", kv_heads=2, T=128, num_docs=2, kv_sharing="shared"),
    Case(2, "zigzag", "sparse", kv_heads=4, T=160, num_docs=4, dtype=torch.float64),
    Case(4, "contiguous", "auto", kv_heads=1, T=128, num_docs=0, batch=2, dtype=torch.float64),
    Case(8, "zigzag", "auto", kv_heads=2, T=256, num_docs=0, batch=2),
    # key-bound selection (tile bounds all-reduced) and the full-selection warm-up (dense selected branch)
    Case(2, "zigzag", "auto", kv_heads=2, T=160, num_docs=3, selection_scoring="key_bound"),
    Case(4, "contiguous", "sparse", kv_heads=1, T=128, num_docs=3, selection_scoring="key_bound",
         dtype=torch.float64),
    Case(4, "zigzag", "auto", kv_heads=4, T=192, num_docs=0, batch=2, selection_scoring="key_bound"),
    Case(2, "zigzag", "sparse", kv_heads=2, T=160, num_docs=2, selection_scoring="key_bound", kv_sharing="shared"),
    # max-logit selection (selection keys all-gathered)
    Case(2, "zigzag", "auto", kv_heads=2, T=160, num_docs=3, selection_scoring="max_logit"),
    Case(4, "contiguous", "sparse", kv_heads=1, T=128, num_docs=3, selection_scoring="max_logit",
         dtype=torch.float64),
    Case(4, "zigzag", "allgather", kv_heads=4, T=192, num_docs=0, batch=2, selection_scoring="max_logit",
         kv_sharing="shared"),
    Case(2, "zigzag", "allgather", kv_heads=4, T=160, num_docs=3, full_selection=True),
    Case(4, "contiguous", "allgather", kv_heads=2, T=128, num_docs=0, batch=2, full_selection=True,
         dtype=torch.float64),
    # per_document, with every selection scoring and the full-selection warm-up
    Case(2, "per_document", "auto", kv_heads=1, T=160, num_docs=3),
    Case(2, "per_document", "sparse", kv_heads=4, T=160, doc_lengths=(36, 4, 92, 28), dtype=torch.float64),
    Case(4, "per_document", "auto", kv_heads=2, T=192, num_docs=3, geometry=PER_DOCUMENT_P4),
    Case(4, "per_document", "sparse", kv_heads=4, T=128, num_docs=3, kv_sharing="shared", dtype=torch.float64),
    Case(2, "per_document", "auto", kv_heads=2, T=160, num_docs=3, selection_scoring="key_bound"),
    Case(4, "per_document", "sparse", kv_heads=1, T=128, num_docs=3, selection_scoring="max_logit"),
    Case(2, "per_document", "allgather", kv_heads=4, T=160, num_docs=3, full_selection=True),
]
TRITON = Case(2, "zigzag", "sparse", kv_heads=2, T=64, window=3, doc_lengths=(3, 1, 7, 2, 5, 0, 30, 4, 8, 4))
# only the most recent blocks are selected: remote rows are at most one block and a tail halo per segment
LOCAL = dict(geometry=(("top_n", 2), ("init_blocks", 0), ("local_blocks", 2)), kv_heads=1, T=320, num_docs=0)
LOCALITY = [Case(4, "zigzag", "auto", **LOCAL), Case(4, "zigzag", "allgather", **LOCAL)]


@pytest.fixture(scope="module")
def cp_seed() -> int:
    env = os.environ.get("NSA_TEST_SEED")
    return int(env) if env else torch.seed() % (2 ** 63)


def functional_job(rank, world, case, seed):
    layout = layout_of(case, seed)
    inputs = branch_inputs(case, seed)
    local = {n: layout.shard(inputs[n], rank).requires_grad_() for n in BRANCH_INPUTS}
    compress_k, compress_v, rotary = compressors(case, seed)
    o, stats = context_parallel_nsa(*functional_inputs(local), geometry=case.nsa_geometry, shards=ShardedSequence(
        CPLayout(world, case.T, case.kind, L_SEL), cu_seqlens_of(case, seed)), group=None, compress_k=compress_k,
        compress_v=compress_v, rotary=rotary, selection_exchange=case.exchange)
    (o * layout.shard(inputs["dy"], rank)).sum().backward()
    params = {f"k.{n}": g for n, g in parameter_grads(compress_k).items()}
    params.update({f"v.{n}": g for n, g in parameter_grads(compress_v).items()})
    return {"o": o.detach(), "grads": {n: grad_or_zero(t) for n, t in local.items()}, "params": params,
            "stats": stats.to_dict()}


def triton_job(rank, world, case, seed):
    """:func:`functional_job` with the Triton kernels (Triton's interpreter on the CPU)."""
    with nsa_kernels.use_backend("triton"):
        return functional_job(rank, world, case, seed)


def module_job(rank, world, case, seed):
    layer, x, dy, pos = module_and_inputs(case, seed, cp_group=dist.group.WORLD)
    layout = layout_of(case, seed)
    x_local = layout.shard(x, rank).requires_grad_()
    y = layer(x_local, cu_seqlens=cu_seqlens_of(case, seed), position_ids=pos)
    (y * layout.shard(dy, rank)).sum().backward()
    return {"o": y.detach(), "grads": {"x": x_local.grad}, "params": parameter_grads(layer),
            "stats": layer.last_cp_stats.to_dict()}


def error_job(rank, world, seed):
    """Messages of the errors raised for a group/layout mismatch and for lengths that do not fit the layout."""
    case = Case(world, "zigzag", "auto", kv_heads=1, T=32 * world, num_docs=0)
    per_document = Case(world, "per_document", "auto", kv_heads=1, T=32 * world, num_docs=0)
    local = {n: t[:, :32] for n, t in branch_inputs(case, seed).items()}
    compress_k, compress_v, _ = compressors(case, seed)
    attempts = [
        lambda: context_parallel_nsa(*functional_inputs(local), geometry=case.nsa_geometry, shards=ShardedSequence(
            CPLayout(2 * world, 32 * world, "zigzag", L_SEL)), group=None, compress_k=compress_k,
            compress_v=compress_v),
        lambda: module_and_inputs(case, seed, dist.group.WORLD)[0](torch.randn(1, 30, 16)),
        lambda: module_and_inputs(case, seed, dist.group.WORLD)[0](
            torch.randn(1, 32, 16), cu_seqlens=torch.tensor([0, 10, 60], dtype=torch.int32)),
        lambda: module_and_inputs(per_document, seed, dist.group.WORLD)[0](torch.randn(1, 32, 16)),
        lambda: module_and_inputs(per_document, seed, dist.group.WORLD)[0](
            torch.randn(1, 32, 16), cu_seqlens=torch.tensor([0, 2 * world + 2, 32 * world], dtype=torch.int32)),
    ]
    return value_error_messages(attempts)


def all_jobs(P, seed):
    jobs = [(functional_job, c) for c in FUNCTIONAL + LOCALITY if c.P == P]
    return jobs + [(module_job, c) for c in MODULE if c.P == P]


def run_jobs(rank, world, jobs, seed):
    out = [fn(rank, world, case, seed) for fn, case in jobs]
    return out + [error_job(rank, world, seed)]


@functools.lru_cache(maxsize=None)
def results_for(P, seed):
    """Per job of :func:`all_jobs`, the list of the P ranks' results (then the error messages per rank)."""
    jobs = all_jobs(P, seed)
    per_rank = run_ranks(run_jobs, P, jobs, seed, timeout=240)
    return {job: [per_rank[r][i] for r in range(P)] for i, job in enumerate(jobs + [(error_job, None)])}


def single_rank_functional(case, seed):
    inputs = branch_inputs(case, seed)
    leaves = {n: inputs[n].clone().requires_grad_() for n in BRANCH_INPUTS}
    compress_k, compress_v, rotary = compressors(case, seed)
    cu = cu_seqlens_of(case, seed)
    k_cmp, v_cmp = compress_k(leaves["k_c"], cu), compress_v(leaves["v_c"], cu)
    last = nsa_kernels.compressed_block_last_tokens(cu, case.T, case.nsa["block_len"], case.nsa["stride"])
    k_cmp = rotary(k_cmp, nsa_kernels.doc_local_positions(cu, case.T)[last])
    q, _, _, k_s, v_s, k_w, v_w, gates = (leaves[n] for n in BRANCH_INPUTS)
    o = nsa_kernels.nsa_attention(q, k_cmp, v_cmp, k_s, v_s, k_w, v_w, gates, cu_seqlens=cu, **case.nsa)
    (o * inputs["dy"]).sum().backward()
    params = {f"k.{n}": g for n, g in parameter_grads(compress_k).items()}
    params.update({f"v.{n}": g for n, g in parameter_grads(compress_v).items()})
    return o.detach(), {n: grad_or_zero(t) for n, t in leaves.items()}, params


def single_rank_module(case, seed):
    layer, x, dy, pos = module_and_inputs(case, seed)
    x = x.requires_grad_()
    y = layer(x, cu_seqlens=cu_seqlens_of(case, seed), position_ids=pos)
    (y * dy).sum().backward()
    return y.detach(), {"x": x.grad}, parameter_grads(layer)


def assert_matches(case, seed, ranks, expected):
    """Unshard the ranks' outputs and input gradients, sum their parameter gradients, compare (max abs)."""
    layout = layout_of(case, seed)
    o, grads, params = expected
    errors = {"o": (layout.unshard([r["o"] for r in ranks]) - o).abs().max().item()}
    for n, g in grads.items():
        errors[f"d{n}"] = (layout.unshard([r["grads"][n] for r in ranks]) - g).abs().max().item()
    tokens = case.batch * case.T
    for n, g in sum_over_ranks([r["params"] for r in ranks]).items():
        errors[f"d[{n}]/BT"] = ((g - params[n]) / tokens).abs().max().item()
        assert params[n].abs().max() > 0, f"{n}: zero reference gradient, the comparison would be vacuous"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= ATOL[case.dtype], (f"{case.name()} seed {seed}: max abs error {errors[worst]:.3g} in "
                                               f"{worst}; {errors}")


def check_stats(case, ranks):
    """Bytes are conserved (what ranks send, others receive) and the forced path is the one taken."""
    stats = [r["stats"] for r in ranks]
    for name in stats[0]["exchanges"]:
        sent = sum(s["exchanges"][name]["sent"] for s in stats)
        received = sum(s["exchanges"][name]["received"] for s in stats)
        assert sent == received, f"{case.name()}: exchange {name} sent {sent} B but received {received} B"
    paths = {s["selection_path"] for s in stats}
    assert len(paths) == 1, f"ranks disagree on the selection path: {paths}"
    if case.exchange != "auto":
        assert paths == {case.exchange}


@pytest.mark.parametrize("case", FUNCTIONAL, ids=Case.name)
def test_functional_cp_equals_single_rank(cp_seed, case):
    ranks = results_for(case.P, cp_seed)[(functional_job, case)]
    assert_matches(case, cp_seed, ranks, single_rank_functional(case, cp_seed))
    check_stats(case, ranks)


@pytest.mark.parametrize("case", MODULE, ids=Case.name)
def test_module_cp_equals_single_rank(cp_seed, case):
    ranks = results_for(case.P, cp_seed)[(module_job, case)]
    assert_matches(case, cp_seed, ranks, single_rank_module(case, cp_seed))
    check_stats(case, ranks)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run Triton only through its interpreter, which "
                    "conftest enables on machines without CUDA")
def test_cp_through_the_triton_kernels_equals_single_rank_reference(cp_seed):
    """context_parallel_nsa calls the dispatching ops, so the Triton kernels (cu_seqlens_k included) serve it."""
    ranks = run_ranks(triton_job, TRITON.P, TRITON, cp_seed, timeout=240)
    assert_matches(TRITON, cp_seed, ranks, single_rank_functional(TRITON, cp_seed))


def test_local_selections_take_the_sparse_path_and_move_fewer_bytes(cp_seed):
    auto, gather = (results_for(4, cp_seed)[(functional_job, c)] for c in LOCALITY)
    assert_matches(LOCALITY[0], cp_seed, auto, single_rank_functional(LOCALITY[0], cp_seed))
    for r, (a, g) in enumerate(zip(auto, gather)):
        a, g = a["stats"], g["stats"]
        assert a["selection_path"] == "sparse" and g["selection_path"] == "allgather"
        assert a["sparse_bytes_total"] < a["allgather_bytes_total"]
        for direction in ("sent", "received"):
            sparse = a["exchanges"]["selection_ids"][direction] + a["exchanges"]["selection_kv"][direction]
            full = g["exchanges"]["selection_kv"][direction]
            assert sparse < full, f"rank {r}: sparse path {direction} {sparse} B, all-gather {full} B"
    assert sum(a["stats"]["unique_remote_blocks"] for a in auto) > 0  # the sparse fetch is exercised


@pytest.mark.parametrize("P", [2, 4, 8])
def test_bad_group_and_lengths_raise(cp_seed, P):
    for messages in results_for(P, cp_seed)[(error_job, None)]:
        group, short, cu, unpacked, odd_document = messages
        assert group is not None and f"group has {P} ranks" in group and f"P={2 * P} ranks" in group, group
        assert short is not None and f"T={30 * P}" in short, short
        assert cu is not None and "ends at 60" in cu and f"T={32 * P}" in cu, cu
        assert unpacked is not None and "cp_layout='per_document'" in unpacked and "cu_seqlens" in unpacked, unpacked
        assert odd_document is not None and f"divisible by {2 * P}" in odd_document, odd_document
        assert f"document 0 of length {2 * P + 2}" in odd_document, odd_document


def test_auto_choice_falls_back_to_all_gather_when_it_moves_fewer_bytes():
    """P = 4 ranks of 100 rows of 64 B: the all-gather moves 4 * 3 * 100 * 64 = 76800 B."""
    assert cheaper_selection_path(300, 30, 64, 4, 100) == ("sparse", 300 * 64 + 8 * (12 + 60), 76800)
    # every rank needs nearly all remote rows, in short runs: the plan tips the balance
    assert cheaper_selection_path(1150, 400, 64, 4, 100) == ("allgather", 1150 * 64 + 8 * (12 + 800), 76800)
    assert cheaper_selection_path(0, 0, 64, 1, 100) == ("sparse", 0, 0)  # one rank: nothing moves, no copy either
