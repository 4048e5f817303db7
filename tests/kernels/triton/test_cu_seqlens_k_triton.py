"""Triton ops with key segments (``cu_seqlens_k``) against the reference ops with the same key segments.

The reference is the ground truth. CPU: the Triton interpreter, fp32 inputs; on the same inputs the Triton
compressed, selected and window attention must give the reference's output and gradients (q and every K/V)
within atol = rtol = 1e-4, compressed attention the reference's lse with ``-inf`` exactly where the reference
has it, and select_blocks exactly the reference's indices (fed the same lse). Query segments are cut out of
the documents of a random packed sequence as the context-parallel layer cuts them (``tests/helpers/segments.py``): a
middle segment of a document spanning several query tiles (``L_q < L_k``), short pieces, an empty segment,
a document shorter than a compressed block, no length aligned to a block size. Key segments as the CP layer
builds them: the document prefix ``[0, p1)`` (compressed attention, select_blocks, selected attention), the
compact selection buffer (selected attention) and the window halo, exact and longer (window attention).
G in {1, 4, 16}, Dk != Dv, two geometries (one with l > l'), each op with the default tiles and with tiny
tiles (interior key tiles, split dK/dV work items, split GQA groups, split passes and key tiles of the
selection). Also: the host tile table row by row, ``cu_seqlens_k == cu_seqlens`` changing nothing (bitwise),
and malformed key segments raising the reference's errors. Fresh seeds (``NSA_TEST_SEED`` replays one).

GPU (``-m gpu``): bf16 on the zigzag CP layout of an 8k-token packed sequence (one rank of four) against the
fp32 reference on the upcast inputs (relative norm error < 1e-2, forward and backward); select_blocks with
``q = 0``, ``lse = 0`` (exact integer scores, so indices must match exactly in any summation order).
"""
from __future__ import annotations

import random
from typing import Callable, Dict

import pytest
import torch

from nsa_kernels import reference as R
from nsa_kernels.layout import compressed_cu_seqlens, num_compressed_blocks
from nsa_kernels.triton import selected_attention as SA
from nsa_kernels.triton import select_blocks as SEL
from nsa_kernels.triton.compressed_attention import compressed_attention
from nsa_kernels.triton.utils import tile_table
from nsa_kernels.triton.window_attention import window_attention
from tests.helpers.segments import (Case, Segment, chunk_segments, compact_key_segment, cut_segments, offsets,
                                    packed_rows, unaligned)
from tests.helpers.small_tiles import use_small_range_tiles

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: Triton kernels under the CPU interpreter

TOL = dict(atol=1e-4, rtol=1e-4)
DK, DV = 24, 16
MIDDLE = 8  # the middle segment of the longest document is longer than this (several small query tiles)
GEOMETRIES = {
    "l16d8s16n4w20": dict(block_len=16, stride=8, select_len=16, top_n=4, window=20, init_blocks=1, local_blocks=2),
    # a compressed block spans four selection blocks (l > l')
    "l32d8s8n5w7": dict(block_len=32, stride=8, select_len=8, top_n=5, window=7, init_blocks=1, local_blocks=1),
}
# each geometry meets every G once per tiling
CASES = [pytest.param(geo, G, tiles, id=f"{geo}-G{G}-{tiles}") for geo, G, tiles in (
    ("l16d8s16n4w20", 1, "default"), ("l32d8s8n5w7", 4, "default"), ("l16d8s16n4w20", 16, "default"),
    ("l32d8s8n5w7", 1, "small"), ("l16d8s16n4w20", 4, "small"), ("l32d8s8n5w7", 16, "small"))]


def _small_tiles(monkeypatch) -> None:
    """Tiny tiles everywhere: range attention 8-row query tiles, 16-key tiles and dK/dV work items of 12 query
    tokens (partials summed by the reduce kernel); selected attention 16-key slices and query lists split into
    several work items; select_blocks the group in several passes and a chunk's rows in several key tiles."""
    use_small_range_tiles(monkeypatch)
    monkeypatch.setattr(SA, "MAX_BLOCK_S", 16)
    monkeypatch.setattr(SA, "CHUNK_FACTOR", 0.05)
    monkeypatch.setattr(SEL, "QUERY_TILE_BYTES", 2048)
    monkeypatch.setattr(SEL, "KEY_TILE_BYTES", 1024)


@pytest.fixture
def tiling(request, monkeypatch):
    """``"default"`` (the heuristics) or ``"small"`` (:func:`_small_tiles`), from the test's ``tiles`` parameter."""
    if request.getfixturevalue("tiles") == "small":
        _small_tiles(monkeypatch)


def _case(geo_name: str, G: int, seed: int) -> Case:
    """The longest document holds the middle segment; one document is shorter than a compressed block."""
    geo = GEOMETRIES[geo_name]
    rng = random.Random(seed)
    l, d, ls = geo["block_len"], geo["stride"], geo["select_len"]
    sizes = (l, d, ls)
    lengths = [unaligned(rng.randint(MIDDLE + 85, MIDDLE + 95), sizes), rng.randint(1, min(l - 1, 12)),
               unaligned(rng.randint(l + 1, l + 8), sizes)]
    rng.shuffle(lengths)
    cu = offsets(lengths)
    H = 2 if G < 16 else 1
    T, nc = int(cu[-1]), int(compressed_cu_seqlens(cu, l, d)[-1])
    x = dict(q=torch.randn(1, T, G * H, DK), k=torch.randn(1, T, H, DK), v=torch.randn(1, T, H, DV),
             k_cmp=torch.randn(1, nc, H, DK), v_cmp=torch.randn(1, nc, H, DV))
    segments = cut_segments(lengths, cu[:-1].tolist(), rng, middle=MIDDLE)
    q_rows = torch.cat([s.start + torch.arange(s.p0, s.p1) for s in segments])
    cu_q = offsets([s.p1 - s.p0 for s in segments])
    ctx = f"seed={seed} geo={geo_name} G={G} docs={lengths} segments={[(s.doc, s.p0, s.p1) for s in segments]}"
    return Case(geo, lengths, cu, x, segments, q_rows, cu_q, ctx)


def _prefix_compressed_rows(case: Case):
    """Key segments = document prefixes ``[0, p1)``: the rows of their compressed blocks in the full packed
    compressed K/V and ``cu_seqlens_k`` on the raw token axis."""
    l, d = case.geo["block_len"], case.geo["stride"]
    cmp_start = compressed_cu_seqlens(case.cu, l, d).tolist()
    rows = torch.cat([cmp_start[s.doc] + torch.arange(num_compressed_blocks(s.p1, l, d)) for s in case.segments])
    return rows, offsets([s.p1 for s in case.segments])


def _run(fn: Callable, inputs: Dict[str, torch.Tensor], do: torch.Tensor):
    """Outputs of ``fn(**inputs)`` (a tuple, the first one differentiable) and the gradients of every input
    for the upstream gradient ``do`` of the first output."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    outs = fn(**leaves)
    grads = torch.autograd.grad(outs[0], list(leaves.values()), do)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def _compare(triton_fn: Callable, reference_fn: Callable, inputs: Dict[str, torch.Tensor], what: str, ctx: str):
    """Triton against the reference on ``inputs``: outputs (an lse's -inf pattern exactly) and gradients."""
    do = torch.randn(*inputs["q"].shape[:3], DV)
    (got, got_grads), (want, want_grads) = _run(triton_fn, inputs, do), _run(reference_fn, inputs, do)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} output {i}: {a.dtype} {tuple(a.shape)} [{ctx}]"
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{what} output {i}: -inf pattern [{ctx}]"
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what} output {i} [{ctx}]: {m}")
    for name in inputs:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL,
                                   msg=lambda m: f"{what} d{name} [{ctx}]: {m}")
    return want


def _gather(case: Case, rows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: case.x[name].index_select(1, r) for name, r in rows.items()}


@pytest.mark.parametrize("geo_name,G,tiles", CASES)
def test_compressed_attention_and_select_blocks(geo_name, G, tiles, tiling, seed):
    case = _case(geo_name, G, seed)
    geo = case.geo
    l, d = geo["block_len"], geo["stride"]
    cmp_rows, cu_k = _prefix_compressed_rows(case)
    inputs = _gather(case, dict(q=case.q_rows, k_cmp=cmp_rows, v_cmp=cmp_rows))
    kw = dict(cu_seqlens=case.cu_q, cu_seqlens_k=cu_k)

    def run(fn):
        return lambda q, k_cmp, v_cmp: fn(q, k_cmp, v_cmp, l, d, **kw)

    _, lse = _compare(run(compressed_attention), run(R.compressed_attention), inputs, "compressed_attention",
                      case.ctx)
    assert torch.isneginf(lse).any() and torch.isfinite(lse).any(), case.ctx

    sel = {name: geo[name] for name in ("select_len", "top_n", "init_blocks", "local_blocks")}
    q, k_cmp = inputs["q"], inputs["k_cmp"]
    got = SEL.select_blocks(q, k_cmp, lse, l, d, **sel, **kw)
    want = R.select_blocks(q, k_cmp, lse, l, d, **sel, **kw)
    assert got.dtype == torch.int32 and got.shape == want.shape, case.ctx
    bad = torch.nonzero((got != want).any(-1))
    assert not bad.numel(), (f"select_blocks: {len(bad)} rows differ, first {bad[0].tolist()}: "
                             f"{got[tuple(bad[0])].tolist()} vs {want[tuple(bad[0])].tolist()} [{case.ctx}]")


def _block_indices(case: Case, rng: random.Random) -> torch.Tensor:
    """int32 ``[1, T, H, n]`` document-relative indices: the reference selection on the full sequence, with
    every fourth query's row replaced by raw entries (negative, repeated, past the query and the document)."""
    geo, x = case.geo, case.x
    l, d, ls, n = geo["block_len"], geo["stride"], geo["select_len"], geo["top_n"]
    lse = R.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], l, d, cu_seqlens=case.cu)[1]
    idx = R.select_blocks(x["q"], x["k_cmp"], lse, l, d, ls, n, geo["init_blocks"], geo["local_blocks"],
                          cu_seqlens=case.cu)
    raw = torch.randint(-2, -(-max(case.lengths) // ls) + 2, idx.shape, dtype=torch.int32, device="cpu",
                        generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
    idx[:, ::4] = raw[:, ::4].to(idx.device)
    return idx


@pytest.mark.parametrize("geo_name,G,tiles", CASES)
def test_selected_attention_on_prefix_and_compact_key_segments(geo_name, G, tiles, tiling, seed):
    case = _case(geo_name, G, seed)
    ls = case.geo["select_len"]
    idx = _block_indices(case, random.Random(seed + 1))[:, case.q_rows]
    bounds = case.cu_q.tolist()
    compact = [compact_key_segment(s, idx[:, bounds[i]:bounds[i + 1]], ls) for i, s in enumerate(case.segments)]
    layouts = {
        "document prefix": (*packed_rows([s.start + torch.arange(s.p1) for s in case.segments]), idx),
        "compact": (*packed_rows([rows for rows, _ in compact]), torch.cat([i for _, i in compact], 1)),
    }
    for what, (key_rows, cu_k, block_idx) in layouts.items():
        def run(fn):
            return lambda q, k, v: (fn(q, k, v, block_idx, ls, cu_seqlens=case.cu_q, cu_seqlens_k=cu_k),)

        inputs = _gather(case, dict(q=case.q_rows, k=key_rows, v=key_rows))
        _compare(run(SA.selected_attention), run(R.selected_attention), inputs, f"selected_attention ({what})",
                 case.ctx)


@pytest.mark.parametrize("geo_name,G,tiles", CASES)
def test_window_attention_on_halo_key_segments(geo_name, G, tiles, tiling, seed):
    case = _case(geo_name, G, seed)
    w = case.geo["window"]
    for extra in (0, random.Random(seed + 2).randint(1, 30)):  # the exact halo, then a longer one
        key_rows, cu_k = packed_rows([s.start + torch.arange(max(0, s.p0 - w + 1 - extra), s.p1)
                                      for s in case.segments])

        def run(fn):
            return lambda q, k, v: (fn(q, k, v, w, cu_seqlens=case.cu_q, cu_seqlens_k=cu_k),)

        inputs = _gather(case, dict(q=case.q_rows, k=key_rows, v=key_rows))
        _compare(run(window_attention), run(R.window_attention), inputs, f"window_attention (halo + {extra})",
                 case.ctx)


@pytest.mark.parametrize("over", ["queries", "keys", "compressed"])
def test_tile_table_rows(over, seed):
    """Every row is ``[q_start, q_end, tile_start, cmp_start, k_start, shift]`` of its segment, the tiles cover
    the chosen axis once in order; with ``cu_seqlens_k = cu_seqlens`` the table is the one without it."""
    rng = random.Random(seed)
    l, d, tile = 8, 4, 5
    len_q = [rng.randint(0, 20) for _ in range(5)]
    len_k = [n + rng.choice([0, rng.randint(1, 30)]) for n in len_q]
    cu_q, cu_k = offsets(len_q), offsets(len_k)
    cmp = compressed_cu_seqlens(cu_k, l, d).tolist()
    axis = {"queries": cu_q.tolist(), "keys": cu_k.tolist(), "compressed": cmp}[over]
    expected = [[int(cu_q[n]), int(cu_q[n + 1]), start, cmp[n], int(cu_k[n]), len_k[n] - len_q[n]]
                for n in range(5) for start in range(axis[n], axis[n + 1], tile)]
    table, segment = tile_table(cu_q, int(cu_q[-1]), tile, cu_seqlens_k=cu_k, block_len=l, stride=d, over=over)
    assert table.tolist() == expected, f"seed={seed} L_q={len_q} L_k={len_k}"
    assert segment.tolist() == [n for n in range(5) for _ in range(axis[n], axis[n + 1], tile)]
    plain = tile_table(cu_q, int(cu_q[-1]), tile, block_len=l, stride=d, over=over)[0]
    same = tile_table(cu_q, int(cu_q[-1]), tile, cu_seqlens_k=cu_q.clone(), block_len=l, stride=d, over=over)[0]
    assert torch.equal(plain, same) and torch.equal(plain[:, 4], plain[:, 0]) and not plain[:, 5].any()


def test_key_segments_equal_to_documents_change_nothing(seed):
    """``cu_seqlens_k = cu_seqlens``: every Triton op returns bitwise what it returns without ``cu_seqlens_k``,
    outputs and gradients."""
    case = _case("l16d8s16n4w20", 1, seed)
    geo, cu = case.geo, case.cu
    l, d, ls, n, w = geo["block_len"], geo["stride"], geo["select_len"], geo["top_n"], geo["window"]
    do = torch.randn(*case.x["q"].shape[:3], DV)
    for kw in (dict(cu_seqlens=cu), dict(cu_seqlens=cu, cu_seqlens_k=cu.clone())):
        (o_cmp, lse), g_cmp = _run(lambda q, k_cmp, v_cmp: compressed_attention(q, k_cmp, v_cmp, l, d, **kw),
                                   {name: case.x[name] for name in ("q", "k_cmp", "v_cmp")}, do)
        idx = SEL.select_blocks(case.x["q"], case.x["k_cmp"], lse, l, d, ls, n, **kw)
        qkv = {name: case.x[name] for name in ("q", "k", "v")}
        (o_slc,), g_slc = _run(lambda q, k, v: (SA.selected_attention(q, k, v, idx, ls, **kw),), qkv, do)
        (o_win,), g_win = _run(lambda q, k, v: (window_attention(q, k, v, w, **kw),), qkv, do)
        results = [o_cmp, lse, idx, o_slc, o_win, *g_cmp.values(), *g_slc.values(), *g_win.values()]
        if "cu_seqlens_k" not in kw:
            expected = results
    for i, (got, want) in enumerate(zip(results, expected)):
        assert torch.equal(got, want), f"result {i} [{case.ctx}]"


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the type and message are compared
        return type(exc), str(exc)
    return None


# malformation -> how many of the four ops read the malformed input (and must refuse it)
MALFORMED = {"no_cu_seqlens": 4, "int64": 4, "decreasing": 4, "count": 4, "short_key_segment": 4, "raw_end": 2,
             "compressed_rows": 2, "block_idx_rows": 1}


@pytest.mark.parametrize("bad", list(MALFORMED))
def test_errors_match_reference(bad):
    """Malformed key segments: each Triton op raises exactly the reference's error (type and message)."""
    q, k, v = torch.randn(1, 10, 4, 8), torch.randn(1, 14, 2, 8), torch.randn(1, 14, 2, 6)
    k_cmp, v_cmp = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 6)  # l=4, d=2: 2 + 3 blocks for L_k = 6, 8
    idx, lse = torch.zeros(1, 10, 2, 3, dtype=torch.int32), torch.zeros(1, 10, 4)
    cu_q, cu_k = _i32(0, 4, 10), _i32(0, 6, 14)
    if bad == "no_cu_seqlens":
        cu_q = None
    elif bad == "int64":
        cu_k = cu_k.long()
    elif bad == "decreasing":
        cu_k = _i32(0, 15, 14)
    elif bad == "count":
        cu_k = _i32(0, 14)
    elif bad == "short_key_segment":
        cu_k = _i32(0, 3, 14)
    elif bad == "raw_end":
        k, v = k[:, :13], v[:, :13]
    elif bad == "compressed_rows":
        k_cmp, v_cmp = k_cmp[:, :4], v_cmp[:, :4]
    else:
        idx = torch.zeros(1, 14, 2, 3, dtype=torch.int32)
    kw = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    pairs = [
        (compressed_attention, R.compressed_attention, lambda fn: fn(q, k_cmp, v_cmp, 4, 2, **kw)),
        (SEL.select_blocks, R.select_blocks, lambda fn: fn(q, k_cmp, lse, 4, 2, 4, 3, **kw)),
        (SA.selected_attention, R.selected_attention, lambda fn: fn(q, k, v, idx, 4, **kw)),
        (window_attention, R.window_attention, lambda fn: fn(q, k, v, 4, **kw)),
    ]
    raised = 0
    for triton_fn, reference_fn, call in pairs:
        want = _error(lambda: call(reference_fn))
        assert _error(lambda: call(triton_fn)) == want, f"{reference_fn.__name__}: {want}"
        raised += want is not None
    assert raised == MALFORMED[bad], bad


# ------------------------------------------------------------------------------------------------------- GPU

def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _gpu_check(triton_fn: Callable, reference_fn: Callable, inputs: Dict[str, torch.Tensor], dv: int, what: str,
               ctx: str):
    """bf16 Triton against the fp32 reference on the upcast inputs: relative error < 1e-2, outputs and grads."""
    do = torch.randn(*inputs["q"].shape[:3], dv, device="cuda")
    got, got_grads = _run(triton_fn, inputs, do.bfloat16())
    want, want_grads = _run(reference_fn, {k: t.float() for k, t in inputs.items()}, do)
    pairs = [("o", got[0], want[0])] + [(f"d{name}", got_grads[name], want_grads[name]) for name in inputs]
    for name, a, b in pairs:
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), f"{what} {name} [{ctx}]"
        assert _rel(a, b) < 1e-2, f"{what} {name}: relative error {_rel(a, b):.2e} [{ctx}]"
    return got, want


@pytest.mark.gpu
@pytest.mark.parametrize("G,dk,dv", [(8, 128, 128), (16, 192, 128)])
def test_gpu_bf16_zigzag_rank(G, dk, dv, seed):
    """Rank 1 of 4 in the zigzag layout of T = 8192 (chunks 1 and 6 of 1024 tokens), documents straddling
    chunks; paper geometry l = 32, d = 16, l' = 64, n = 16, w = 512."""
    dev, H = "cuda", 2
    l, d, ls, n, w = 32, 16, 64, 16, 512
    lengths = [1, 3001, 97, 5093]
    segments = chunk_segments(lengths, [(1024, 2048), (6144, 7168)])
    cu = offsets(lengths).to(dev)
    T = sum(lengths)
    nc = int(compressed_cu_seqlens(cu, l, d)[-1])
    x = dict(q=torch.randn(1, T, G * H, dk, device=dev), k=torch.randn(1, T, H, dk, device=dev),
             v=torch.randn(1, T, H, dv, device=dev), k_cmp=torch.randn(1, nc, H, dk, device=dev),
             v_cmp=torch.randn(1, nc, H, dv, device=dev))
    x = {name: t.bfloat16() for name, t in x.items()}
    q_rows = torch.cat([s.start + torch.arange(s.p0, s.p1, device=dev) for s in segments])
    cu_q = offsets([s.p1 - s.p0 for s in segments]).to(dev)
    ctx = f"seed={seed} G={G} segments={[(s.doc, s.p0, s.p1) for s in segments]}"

    def gather(rows):
        return {name: x[name].index_select(1, r.to(dev)) for name, r in rows.items()}

    cmp_start = compressed_cu_seqlens(cu, l, d).tolist()
    cmp_rows = torch.cat([cmp_start[s.doc] + torch.arange(num_compressed_blocks(s.p1, l, d)) for s in segments])
    cu_k = offsets([s.p1 for s in segments]).to(dev)
    kw = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    _, (_, lse) = _gpu_check(lambda q, k_cmp, v_cmp: compressed_attention(q, k_cmp, v_cmp, l, d, **kw),
                             lambda q, k_cmp, v_cmp: R.compressed_attention(q, k_cmp, v_cmp, l, d, **kw),
                             gather(dict(q=q_rows, k_cmp=cmp_rows, v_cmp=cmp_rows)), dv, "compressed_attention", ctx)

    k_cmp = x["k_cmp"].index_select(1, cmp_rows.to(dev))
    zero_q, zero_lse = torch.zeros_like(x["q"][:, q_rows]), torch.zeros_like(lse)
    got = SEL.select_blocks(zero_q, k_cmp, zero_lse, l, d, ls, n, **kw)
    assert torch.equal(got, R.select_blocks(zero_q.float(), k_cmp.float(), zero_lse, l, d, ls, n, **kw)), ctx

    q_seg = x["q"][:, q_rows].float()
    idx = R.select_blocks(q_seg, k_cmp.float(), lse, l, d, ls, n, **kw)
    bounds = cu_q.tolist()
    compact = [compact_key_segment(s, idx[:, bounds[i]:bounds[i + 1]], ls) for i, s in enumerate(segments)]
    key_rows, cu_c = packed_rows([rows for rows, _ in compact])
    block_idx = torch.cat([i for _, i in compact], 1)
    _gpu_check(lambda q, k, v: (SA.selected_attention(q, k, v, block_idx, ls, cu_seqlens=cu_q,
                                                      cu_seqlens_k=cu_c.to(dev)),),
               lambda q, k, v: (R.selected_attention(q, k, v, block_idx, ls, cu_seqlens=cu_q,
                                                     cu_seqlens_k=cu_c.to(dev)),),
               gather(dict(q=q_rows, k=key_rows, v=key_rows)), dv, "selected_attention (compact)", ctx)

    key_rows, cu_w = packed_rows([s.start + torch.arange(max(0, s.p0 - w + 1), s.p1, device=dev) for s in segments])
    _gpu_check(lambda q, k, v: (window_attention(q, k, v, w, cu_seqlens=cu_q, cu_seqlens_k=cu_w.to(dev)),),
               lambda q, k, v: (R.window_attention(q, k, v, w, cu_seqlens=cu_q, cu_seqlens_k=cu_w.to(dev)),),
               gather(dict(q=q_rows, k=key_rows, v=key_rows)), dv, "window_attention (halo)", ctx)
