"""CPLayout and ShardedSequence: Megatron's zigzag formula, Transformer Engine's per-document thd split, round
trips, owners, packed-document segments, errors naming the setting and the numbers."""
import pytest
import torch

from tests.helpers.cp_cases import megatron_thd, megatron_zigzag, te_thd_partitioned_indices
from nsa_dist.parallel import CPLayout, ShardedSequence
from nsa_kernels import doc_local_positions


def random_documents(P: int, gen: torch.Generator) -> torch.Tensor:
    """int32 cu_seqlens of 6 random documents whose lengths are multiples of 2P: an empty one, one of exactly 2P
    (chunks of one token), the rest up to 11 chunks of every rank."""
    units = torch.randint(2, 12, (6,), generator=gen)
    units[1], units[3] = 0, 1
    return torch.cat([torch.zeros(1, dtype=torch.long), (units * 2 * P).cumsum(0)]).to(torch.int32)


def random_cu_seqlens(T: int, gen: torch.Generator) -> torch.Tensor:
    """Random document boundaries over T tokens, with an empty document and a 1-token one."""
    cuts = torch.randperm(T - 1, generator=gen)[:5] + 1
    bounds = sorted(set(cuts.tolist()))
    bounds = [0] + bounds[:1] + bounds[:1] + [bounds[1], bounds[1] + 1] + bounds[2:] + [T]
    return torch.tensor(sorted(bounds), dtype=torch.int32)


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [48, 240])
def test_zigzag_equals_megatron_and_contiguous_equals_chunk(seed, P, T):
    x = torch.randn(2, T, 3, 2)
    for r in range(P):
        if T % (2 * P) == 0:
            zig = CPLayout(P, T, "zigzag").shard(x, r)
            assert torch.equal(zig, megatron_zigzag(x, P, r)), f"P={P} T={T} rank {r}"
        if T % P == 0:
            assert torch.equal(CPLayout(P, T, "contiguous").shard(x, r), x.chunk(P, dim=1)[r])


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_per_document_equals_transformer_engine_thd_split(seed, P):
    """The per-document layout's local tokens are megatron-core's thd split (TE's indices), rank by rank."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        cu = random_documents(P, gen)
        T = int(cu[-1])
        x = torch.randn(1, T, 3)
        layout = CPLayout(P, T, "per_document", select_len=64, doc_bounds=cu.tolist())
        for r in range(P):
            assert torch.equal(layout.positions(r), te_thd_partitioned_indices(cu, T, P, r)), f"cu {cu.tolist()}"
            assert torch.equal(layout.shard(x, r), megatron_thd(x, cu, P, r)), f"P={P} rank {r} cu {cu.tolist()}"


def test_per_document_of_one_document_is_zigzag(seed):
    x = torch.randn(2, 96)
    for P in (2, 3):
        one = CPLayout(P, 96, "per_document", doc_bounds=(0, 96))
        assert all(torch.equal(one.shard(x, r), CPLayout(P, 96, "zigzag").shard(x, r)) for r in range(P))


def bound_layout(kind: str, P: int, gen: torch.Generator) -> CPLayout:
    """A layout over P ranks: zigzag and contiguous of 3 chunks of 16 per chunk, per_document of random
    documents."""
    if kind == "per_document":
        cu = random_documents(P, gen)
        return CPLayout(P, int(cu[-1]), kind, select_len=16).with_documents(cu)
    return CPLayout(P, 16 * 2 * P * 3, kind, select_len=16)


@pytest.mark.parametrize("kind", ["zigzag", "contiguous", "per_document"])
@pytest.mark.parametrize("P", [1, 2, 4])
def test_shard_unshard_round_trip_positions_and_owner(seed, kind, P):
    layout = bound_layout(kind, P, torch.Generator().manual_seed(seed))
    x = torch.randn(layout.seq_len, 5)
    shards = [layout.shard(x, r, dim=0) for r in range(P)]
    assert torch.equal(layout.unshard(shards, dim=0), x)
    T = torch.arange(layout.seq_len)
    for r in range(P):
        pos = layout.positions(r)
        assert torch.equal(pos, layout.shard(T, r, dim=0))
        rank, row = layout.owner(pos)
        assert torch.equal(rank, torch.full_like(pos, r)) and torch.equal(row, torch.arange(layout.local_len))


@pytest.mark.parametrize("kind", ["zigzag", "contiguous"])
@pytest.mark.parametrize("P", [2, 3, 4])
def test_packed_segments(seed, kind, P):
    """Local segments = local chunk x document, checked against the sharded document ids and positions."""
    gen = torch.Generator().manual_seed(seed)
    layout = CPLayout(P, 8 * 2 * P * 5, kind, select_len=8)
    T = layout.seq_len
    cu = random_cu_seqlens(T, gen)
    seq = ShardedSequence(layout, cu)
    doc_id = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    local_doc = doc_local_positions(cu, T)
    for r in range(P):
        assert torch.equal(seq.positions(r), layout.positions(r))
        assert torch.equal(seq.doc_positions(r), layout.shard(local_doc, r, dim=0))
        docs = layout.shard(doc_id, r, dim=0)
        chunk = torch.arange(layout.local_len) // layout.chunk_len
        new = torch.ones(layout.local_len, dtype=torch.bool)
        new[1:] = (docs[1:] != docs[:-1]) | (chunk[1:] != chunk[:-1])
        expected = torch.cat([torch.nonzero(new).flatten(), torch.tensor([layout.local_len])]).to(torch.int32)
        assert torch.equal(seq.local_cu_seqlens(r), expected), f"seed {seed} rank {r} cu {cu.tolist()}"
        for s in seq.segments(r):
            assert s.doc_start == int(cu[s.doc]) and int(docs[s.row]) == s.doc
            assert int(local_doc[s.doc_start + s.p0]) == s.p0 == int(seq.doc_positions(r)[s.row])


def test_batch_rows_are_documents(seed):
    layout = CPLayout(2, 64, "zigzag", select_len=8)
    seq = ShardedSequence(layout, batch=3)
    x = torch.randn(3, 64)
    flat = x.reshape(-1)
    for r in range(2):
        local = layout.shard(x, r).reshape(-1)  # [B, T/P] flattened: the module's local rows
        assert torch.equal(flat[seq.positions(r)], local)
        rank, row = seq.owner(seq.positions(r))
        assert bool((rank == r).all()) and torch.equal(row, torch.arange(seq.local_len))
        assert all(s.p1 <= 64 and s.doc_start == 64 * s.doc for s in seq.segments(r))
        assert int(seq.local_cu_seqlens(r)[-1]) == 96


def test_bad_layouts_name_the_numbers():
    with pytest.raises(ValueError, match=r"T=100 .*2P=8 chunks"):
        CPLayout(4, 100, "zigzag")
    with pytest.raises(ValueError, match=r"T=100 .*P=3 chunks"):
        CPLayout(3, 100, "contiguous")
    with pytest.raises(ValueError, match=r"chunk length 12 .*T=48.*l'=8"):
        CPLayout(2, 48, "zigzag", select_len=8)
    with pytest.raises(ValueError, match=r"kind='ring'"):
        CPLayout(2, 48, "ring")
    layout = CPLayout(2, 64, "zigzag", select_len=8)
    with pytest.raises(ValueError, match=r"ends at 60 .*T=64"):
        ShardedSequence(layout, torch.tensor([0, 30, 60], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"rank=2"):
        layout.chunks(2)
    with pytest.raises(ValueError, match=r"length 50 on dim 1.*T=64"):
        layout.shard(torch.zeros(1, 50), 0)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_per_document_segments_are_its_chunks(seed, P):
    """Per-document layout: every local segment is one chunk of one document, at the local row ``cu[n] / P`` of
    that document plus the chunk's slot; positions restart at each document."""
    cu = random_documents(P, torch.Generator().manual_seed(seed))
    T = int(cu[-1])
    seq = ShardedSequence(CPLayout(P, T, "per_document"), cu)
    local_doc = doc_local_positions(cu, T)
    for r in range(P):
        assert torch.equal(seq.positions(r), te_thd_partitioned_indices(cu, T, P, r))
        assert torch.equal(seq.doc_positions(r), local_doc[seq.positions(r)])
        expected = []
        for n, (b, e) in enumerate(zip(cu.tolist(), cu[1:].tolist())):
            c = (e - b) // (2 * P)
            expected += [(n, k * c, (k + 1) * c, b // P + slot * c) for slot, k in enumerate((r, 2 * P - 1 - r)) if c]
        assert [(s.doc, s.p0, s.p1, s.row) for s in seq.segments(r)] == expected, f"rank {r} cu {cu.tolist()}"


def test_per_document_errors_name_the_setting_and_numbers():
    with pytest.raises(ValueError, match=r"cp_layout='per_document'.*2\*CP = 4 chunks.*needs .*cu_seqlens"):
        ShardedSequence(CPLayout(2, 64, "per_document", select_len=8))
    with pytest.raises(ValueError, match=r"cp_layout='per_document'.*needs .*cu_seqlens"):
        CPLayout(2, 64, "per_document").shard(torch.zeros(1, 64), 0)
    with pytest.raises(ValueError, match=r"divisible by 4.*document 0 of length 30, document 1 of length 34"):
        ShardedSequence(CPLayout(2, 64, "per_document"), torch.tensor([0, 30, 64], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"by 8.*document 1 of length 12, document 2 of length 20 .*\[0, 16, 28, 48\]"):
        CPLayout(4, 48, "per_document", doc_bounds=(0, 16, 28, 48))
    with pytest.raises(ValueError, match=r"T=62 .*2P=4 chunks of every document \(per_document layout"):
        CPLayout(2, 62, "per_document")
    with pytest.raises(ValueError, match=r"doc_bounds given for kind='zigzag'"):
        CPLayout(2, 64, "zigzag", doc_bounds=(0, 64))
    with pytest.raises(ValueError, match=r"offsets \(cu_seqlens\) \[0, 32, 60\] must .*end at T=64"):
        CPLayout(2, 64, "per_document", doc_bounds=(0, 32, 60))
    bound = CPLayout(2, 64, "per_document", doc_bounds=(0, 32, 64))
    with pytest.raises(ValueError, match=r"bound to cu_seqlens \[0, 32, 64\] .*cu_seqlens \[0, 16, 64\]"):
        ShardedSequence(bound, torch.tensor([0, 16, 64], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"no single chunk length"):
        bound.chunk_len
    with pytest.raises(ValueError, match=r"cu_seqlens.*B = 1, got B=2"):
        ShardedSequence(CPLayout(2, 64, "per_document"), torch.tensor([0, 32, 64], dtype=torch.int32), batch=2)
