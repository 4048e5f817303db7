"""Reference ops with key segments (``cu_seqlens_k``) against the same ops on the full packed sequence.

Exact property (float64, ``TOL``): cut query segments ``[p0, p1)`` out of the documents of a random packed
sequence and give each the key segment the context-parallel layer builds (docs/DESIGN.md, context parallelism):

* compressed attention and select_blocks: the document prefix ``[0, p1)``, i.e. the document's first
  ``num_compressed_blocks(p1)`` compressed rows;
* selected attention: the prefix ``[0, p1)`` with the original block numbers, and the compact buffer
  (blocks ``j < J0 = p0 // l'`` that the segment selected, in slots, then the tail ``[J0*l', p1)``, indices
  remapped);
* window attention: the halo ``[max(0, p0 - w + 1), p1)`` and a longer one.

Outputs, lse and indices must equal the full-sequence rows; the gradients of q and of the gathered K/V
(scattered back with ``index_add``) must equal the full-sequence gradients under the same upstream gradient
on the segment rows (zero elsewhere). Fresh seeds (printed on failure, ``NSA_TEST_SEED`` replays one).
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List

import pytest
import torch

from nsa_kernels import reference as R
from nsa_kernels.layout import compressed_cu_seqlens, num_compressed_blocks
from tests.helpers.segments import Case, Segment
from tests.helpers.segments import compact_key_segment as _compact_key_segment, cut_segments as _cut_segments
from tests.helpers.segments import offsets as _offsets, packed_rows as _packed_rows, unaligned as _unaligned

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TOL = 1e-12
H, DK, DV = 2, 12, 8
GEOMETRIES = {
    # top-n really chooses (about 10 candidate blocks in the long document, n = 4)
    "l16d8s32n4w40": dict(block_len=16, stride=8, select_len=32, top_n=4, window=40, init_blocks=1, local_blocks=2),
    # a compressed block spans two selection blocks (l > l')
    "l32d8s16n5w23": dict(block_len=32, stride=8, select_len=16, top_n=5, window=23, init_blocks=1, local_blocks=1),
}
CASES = [pytest.param(geo, G, id=f"{geo}-G{G}") for geo in GEOMETRIES for G in (1, 2, 4)]


def _document_lengths(geo: dict, rng: random.Random) -> List[int]:
    """A long document (its middle segment spans several query tiles), one shorter than ``block_len``
    and two medium ones, in random order, none a multiple of a block size."""
    sizes = (geo["block_len"], geo["stride"], geo["select_len"])
    lengths = [_unaligned(rng.randint(260, 360), sizes), rng.randint(1, geo["block_len"] - 1),
               _unaligned(rng.randint(geo["block_len"] + 1, 150), sizes), _unaligned(rng.randint(60, 200), sizes)]
    rng.shuffle(lengths)
    return lengths


def _case(geo_name: str, G: int, seed: int) -> Case:
    """Random float64 inputs on a packed sequence and random query segments of it."""
    geo = GEOMETRIES[geo_name]
    rng = random.Random(seed)
    lengths = _document_lengths(geo, rng)
    cu = _offsets(lengths)
    starts = cu[:-1].tolist()
    T = int(cu[-1])
    nc = int(compressed_cu_seqlens(cu, geo["block_len"], geo["stride"])[-1])
    x = dict(q=torch.randn(1, T, G * H, DK, dtype=F64), k=torch.randn(1, T, H, DK, dtype=F64),
             v=torch.randn(1, T, H, DV, dtype=F64), k_cmp=torch.randn(1, nc, H, DK, dtype=F64),
             v_cmp=torch.randn(1, nc, H, DV, dtype=F64))
    segments = _cut_segments(lengths, starts, rng)
    q_rows = torch.cat([s.start + torch.arange(s.p0, s.p1) for s in segments])
    cu_q = _offsets([s.p1 - s.p0 for s in segments])
    ctx = (f"seed={seed} geo={geo_name} G={G} docs={lengths} "
           f"segments={[(s.doc, s.p0, s.p1) for s in segments]}")
    return Case(geo, lengths, cu, x, segments, q_rows, cu_q, ctx)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, ctx: str) -> None:
    """Same shape, no NaN, identical -inf pattern, finite entries within ``TOL``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)} [{ctx}]"
    assert not torch.isnan(actual).any(), f"{what}: NaN [{ctx}]"
    ninf_a, ninf_e = torch.isneginf(actual), torch.isneginf(expected)
    assert torch.equal(ninf_a, ninf_e), f"{what}: -inf pattern differs [{ctx}]"
    if actual.numel():
        diff = (actual[~ninf_a] - expected[~ninf_e]).abs()
        err = diff.max().item() if diff.numel() else 0.0
        assert err <= TOL, f"{what}: max abs err {err:.3e} > {TOL} [{ctx}]"


def _leaves(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}


def _run_full(fn: Callable, tensors: Dict[str, torch.Tensor], q_rows: torch.Tensor, grad_rows: torch.Tensor):
    """Run ``fn(**tensors) -> (o, *extras)`` on the full sequence; backward with ``grad_rows`` on the query
    rows ``q_rows`` and zero elsewhere. Returns the outputs restricted to ``q_rows`` and the gradients."""
    x = _leaves(tensors)
    o, *extras = fn(**x)
    o.backward(torch.zeros_like(o).index_copy_(1, q_rows, grad_rows))
    outs = [t.detach().index_select(1, q_rows) for t in (o, *extras)]
    return outs, {name: t.grad for name, t in x.items()}


def _check_segments(fn: Callable, tensors: Dict[str, torch.Tensor], rows: Dict[str, torch.Tensor], want, grad_rows,
                    what: str, ctx: str):
    """Run ``fn`` on the rows ``rows[name]`` (dim 1) gathered from each full tensor; its outputs must equal
    ``want[0]`` and its gradients, index-added back to the full tensors, ``want[1]``. Returns the outputs."""
    x = _leaves({name: tensors[name].index_select(1, r) for name, r in rows.items()})
    outs = fn(**x)
    for i, (got, expected) in enumerate(zip(outs, want[0])):
        _assert_close(got.detach(), expected, f"{what} output {i}", ctx)
    outs[0].backward(grad_rows)
    for name, r in rows.items():
        got = torch.zeros_like(tensors[name]).index_add_(1, r, x[name].grad)
        _assert_close(got, want[1][name], f"{what} d{name}", ctx)
    return [t.detach() for t in outs]


def _grad_rows(case: Case) -> torch.Tensor:
    return torch.randn(1, len(case.q_rows), case.x["q"].shape[2], DV, dtype=F64)


@pytest.mark.parametrize("geo_name,G", CASES)
def test_compressed_attention_and_select_blocks_on_document_prefixes(geo_name, G, seed):
    case = _case(geo_name, G, seed)
    geo, x = case.geo, case.x
    l, d = geo["block_len"], geo["stride"]
    cmp_start = compressed_cu_seqlens(case.cu, l, d).tolist()
    # key segment = document prefix [0, p1): the document's first num_compressed_blocks(p1) compressed rows
    cmp_rows = torch.cat([cmp_start[s.doc] + torch.arange(num_compressed_blocks(s.p1, l, d))
                          for s in case.segments])
    cu_k = _offsets([s.p1 for s in case.segments])

    def full(q, k_cmp, v_cmp):
        return R.compressed_attention(q, k_cmp, v_cmp, l, d, cu_seqlens=case.cu)

    def segmented(q, k_cmp, v_cmp):
        return R.compressed_attention(q, k_cmp, v_cmp, l, d, cu_seqlens=case.cu_q, cu_seqlens_k=cu_k)

    tensors = {name: x[name] for name in ("q", "k_cmp", "v_cmp")}
    g = _grad_rows(case)
    want = _run_full(full, tensors, case.q_rows, g)
    rows = dict(q=case.q_rows, k_cmp=cmp_rows, v_cmp=cmp_rows)
    _, lse_seg = _check_segments(segmented, tensors, rows, want, g, "compressed_attention", case.ctx)

    sel = {name: geo[name] for name in ("select_len", "top_n", "init_blocks", "local_blocks")}
    lse_full = full(x["q"], x["k_cmp"], x["v_cmp"])[1]
    idx_full = R.select_blocks(x["q"], x["k_cmp"], lse_full, l, d, cu_seqlens=case.cu, **sel)
    idx_seg = R.select_blocks(x["q"][:, case.q_rows], x["k_cmp"][:, cmp_rows], lse_seg, l, d, cu_seqlens=case.cu_q,
                              cu_seqlens_k=cu_k, **sel)
    expected = idx_full[:, case.q_rows]
    assert idx_seg.dtype == torch.int32 and idx_seg.shape == expected.shape, case.ctx
    bad = torch.nonzero((idx_seg != expected).any(-1))
    assert not bad.numel(), f"select_blocks: {len(bad)} rows differ, first {bad[0].tolist()} [{case.ctx}]"


def _block_indices(case: Case, source: str) -> torch.Tensor:
    """int32 ``[1, T, H, n]``: from ``select_blocks`` on the full sequence, or random (-1, repeats, blocks past
    the query and past the document)."""
    geo, x = case.geo, case.x
    l, d, ls, n = geo["block_len"], geo["stride"], geo["select_len"], geo["top_n"]
    if source == "select_blocks":
        lse = R.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], l, d, cu_seqlens=case.cu)[1]
        return R.select_blocks(x["q"], x["k_cmp"], lse, l, d, ls, n, geo["init_blocks"], geo["local_blocks"],
                               cu_seqlens=case.cu)
    T = x["q"].shape[1]
    idx = torch.randint(-1, -(-max(case.lengths) // ls) + 2, (1, T, H, n), dtype=torch.int32)
    idx[:, ::5] = -1  # some queries with an empty selection
    return idx


@pytest.mark.parametrize("source", ["select_blocks", "random"])
@pytest.mark.parametrize("geo_name,G", CASES)
def test_selected_attention_on_prefix_and_compact_key_segments(geo_name, G, source, seed):
    case = _case(geo_name, G, seed)
    ls = case.geo["select_len"]
    block_idx = _block_indices(case, source)
    ctx = f"{case.ctx} indices={source}"

    def full(q, k, v):
        return (R.selected_attention(q, k, v, block_idx, ls, cu_seqlens=case.cu),)

    tensors = {name: case.x[name] for name in ("q", "k", "v")}
    g = _grad_rows(case)
    want = _run_full(full, tensors, case.q_rows, g)
    seg_idx = block_idx[:, case.q_rows]

    def check(key_rows, cu_k, idx, what):
        def segmented(q, k, v):
            return (R.selected_attention(q, k, v, idx, ls, cu_seqlens=case.cu_q, cu_seqlens_k=cu_k),)

        _check_segments(segmented, tensors, dict(q=case.q_rows, k=key_rows, v=key_rows), want, g, what, ctx)

    prefix_rows, cu_prefix = _packed_rows([s.start + torch.arange(s.p1) for s in case.segments])
    check(prefix_rows, cu_prefix, seg_idx, "selected_attention (document prefix)")

    q_offsets = case.cu_q.tolist()
    compact = [_compact_key_segment(s, seg_idx[:, q_offsets[i]:q_offsets[i + 1]], ls)
               for i, s in enumerate(case.segments)]
    compact_rows, cu_compact = _packed_rows([rows for rows, _ in compact])
    check(compact_rows, cu_compact, torch.cat([idx for _, idx in compact], 1), "selected_attention (compact)")


@pytest.mark.parametrize("geo_name,G", CASES)
def test_window_attention_on_halo_key_segments(geo_name, G, seed):
    case = _case(geo_name, G, seed)
    w = case.geo["window"]
    rng = random.Random(seed + 1)

    def full(q, k, v):
        return (R.window_attention(q, k, v, w, cu_seqlens=case.cu),)

    tensors = {name: case.x[name] for name in ("q", "k", "v")}
    g = _grad_rows(case)
    want = _run_full(full, tensors, case.q_rows, g)
    # the exact halo, then a longer one: keys before the window must not change anything
    for extra, what in ((0, "window_attention (halo)"), (rng.randint(1, 50), "window_attention (longer halo)")):
        key_rows, cu_k = _packed_rows([s.start + torch.arange(max(0, s.p0 - w + 1 - extra), s.p1)
                                       for s in case.segments])

        def segmented(q, k, v):
            return (R.window_attention(q, k, v, w, cu_seqlens=case.cu_q, cu_seqlens_k=cu_k),)

        _check_segments(segmented, tensors, dict(q=case.q_rows, k=key_rows, v=key_rows), want, g, what, case.ctx)


@pytest.mark.parametrize("G", [1, 2, 4])
def test_cu_seqlens_k_equal_to_cu_seqlens_changes_nothing(G, seed):
    """Key segments = the documents: every op returns exactly what it returns without ``cu_seqlens_k``."""
    case = _case("l16d8s32n4w40", G, seed)
    geo, x, cu = case.geo, case.x, case.cu
    l, d, ls, n = geo["block_len"], geo["stride"], geo["select_len"], geo["top_n"]
    for kw in (dict(cu_seqlens=cu), dict(cu_seqlens=cu, cu_seqlens_k=cu.clone())):
        o_cmp, lse = R.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], l, d, **kw)
        idx = R.select_blocks(x["q"], x["k_cmp"], lse, l, d, ls, n, **kw)
        outs = (o_cmp, lse, idx, R.selected_attention(x["q"], x["k"], x["v"], idx, ls, **kw),
                R.window_attention(x["q"], x["k"], x["v"], geo["window"], **kw))
        if "cu_seqlens_k" not in kw:
            expected = outs
    for name, got, want in zip(("o_cmp", "lse", "block_idx", "o_slc", "o_win"), outs, expected):
        assert torch.equal(got, want), f"{name} [{case.ctx}]"


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def test_cu_seqlens_k_errors():
    """Every malformed key-segment input is refused with a message naming the offending value."""
    q = torch.randn(1, 10, 4, 8)
    k, v = torch.randn(1, 14, 2, 8), torch.randn(1, 14, 2, 6)
    cu_q, cu_k = _i32(0, 4, 10), _i32(0, 6, 14)
    k_cmp, v_cmp = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 6)  # l=4, d=2: 2 + 3 blocks for L_k = 6, 8
    idx, lse = torch.zeros(1, 10, 2, 3, dtype=torch.int32), torch.zeros(1, 10, 4)

    def window(cu, cu_k_, keys=(k, v)):
        return lambda: R.window_attention(q, *keys, 4, cu_seqlens=cu, cu_seqlens_k=cu_k_)

    def selected(cu, cu_k_, keys=(k, v), block_idx=idx):
        return lambda: R.selected_attention(q, *keys, block_idx, 4, cu_seqlens=cu, cu_seqlens_k=cu_k_)

    def compressed(cu, cu_k_, rows=(k_cmp, v_cmp)):
        return lambda: R.compressed_attention(q, *rows, 4, 2, cu_seqlens=cu, cu_seqlens_k=cu_k_)

    def select(cu, cu_k_, rows=(k_cmp, v_cmp), lse_=lse):
        return lambda: R.select_blocks(q, rows[0], lse_, 4, 2, 4, 3, cu_seqlens=cu, cu_seqlens_k=cu_k_)

    def every(*args, **kwargs):
        return [make(*args, **kwargs) for make in (window, selected, compressed, select)]

    def raw(*args, **kwargs):
        return [make(*args, **kwargs) for make in (window, selected)]

    def cmp(*args, **kwargs):
        return [make(*args, **kwargs) for make in (compressed, select)]

    def refused(calls, message):
        for call in calls:
            with pytest.raises(ValueError, match=message):
                call()

    refused(every(None, cu_k),
            r"cu_seqlens_k \(key segments\) needs cu_seqlens \(the query segments, B = 1\), got cu_seqlens=None")
    refused(every(cu_q, cu_k.long()),
            r"cu_seqlens_k must be a 1-D int32 tensor \[N \+ 1\], got torch.int64 tensor of shape \(3,\)")
    refused(every(cu_q, _i32(0, 15, 14)), r"cu_seqlens_k must be non-decreasing, got \[0, 15, 14\]")
    refused(every(cu_q, _i32(0, 14)), "cu_seqlens_k has 2 entries but cu_seqlens has 3: one key segment per query")
    refused(every(cu_q, _i32(0, 3, 14)), "key segment n=0 has length L_k=3 < query segment length L_q=4")
    refused(raw(cu_q, _i32(1, 6, 14)), "cu_seqlens_k must start at 0 and end at T_k=14, got start 1 and end 14")
    refused(raw(cu_q, _i32(0, 6, 13)), "cu_seqlens_k must start at 0 and end at T_k=14, got start 0 and end 13")
    refused(raw(cu_q, cu_k, keys=(k, v[:, :13])),
            r"v has shape \(1, 13, 2, 6\): its first three dims must match k's \(1, 14, 2\)")
    refused([selected(cu_q, cu_k, block_idx=torch.zeros(1, 14, 2, 3, dtype=torch.int32))],
            r"block_idx has shape \(1, 14, 2, 3\): expected \[B, T, H, n\] with B=1, T=10, H=2")
    refused(cmp(cu_q, _i32(2, 6, 14)), "cu_seqlens_k must start at 0, got start 2")
    refused(cmp(_i32(0, 1, 10), _i32(0, 6, 11)), "key segment n=1 has length L_k=5 < query segment length L_q=9")
    refused(cmp(cu_q, cu_k, rows=(k_cmp[:, :4], v_cmp[:, :4])),
            r"k_cmp has shape \(1, 4, 2, 8\): key segments cu_seqlens_k=\[0, 6, 14\] with block_len=4, stride=2 "
            "gives 5 compressed blocks on dim 1")
    refused([select(cu_q, cu_k, lse_=torch.zeros(1, 14, 4))],
            r"lse must be \[B, T, HQ\] = \[1, 10, 4\], got \(1, 14, 4\)")
    q2, k2, v2 = (x.expand(2, -1, -1, -1) for x in (q, k, v))
    refused([lambda: R.window_attention(q2, k2, v2, 4, cu_seqlens=cu_q, cu_seqlens_k=cu_k)],
            "packed documents .* need batch size B = 1, got B=2")
    refused([window(None, None)], r"k has shape \(1, 14, 2, 8\): expected length T=10")
