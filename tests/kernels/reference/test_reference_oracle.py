"""``nsa_kernels.reference`` against the brute-force oracle in ``tests/helpers/oracle.py`` (float64).

Every test draws fresh random inputs: the seed is printed in each failure message; rerun a failing
case with ``NSA_TEST_SEED=<seed> pytest ...``. Floating outputs must agree to ``TOL``; selection
indices must agree exactly.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.helpers import oracle as O

from nsa_kernels import layout as L
from nsa_kernels import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
F64 = torch.float64
DK, DV = 24, 16

# name -> NSA geometry (block_len l, stride d, select_len l', top_n n, window w, init, local)
GEOMETRIES = {
    # paper: at T <= 257 a document has at most 5 candidates, so everything is selected
    "paper": dict(block_len=32, stride=16, select_len=64, top_n=16, window=512, init_blocks=1, local_blocks=2),
    # small geometries where top-n really chooses
    "l16d8s16n4": dict(block_len=16, stride=8, select_len=16, top_n=4, window=20, init_blocks=1, local_blocks=2),
    "l16d8s16n3_i0l1": dict(block_len=16, stride=8, select_len=16, top_n=3, window=20, init_blocks=0, local_blocks=1),
    "l8d8s8n2_i0l0": dict(block_len=8, stride=8, select_len=8, top_n=2, window=8, init_blocks=0, local_blocks=0),
    "l16d8s16n4_i2l1": dict(block_len=16, stride=8, select_len=16, top_n=4, window=33, init_blocks=2, local_blocks=1),
    # a compressed block spans two selection blocks (l > l')
    "l32d8s16n5": dict(block_len=32, stride=8, select_len=16, top_n=5, window=40, init_blocks=1, local_blocks=2),
    # l' not a multiple of l
    "l8d4s24n3_i1l1": dict(block_len=8, stride=4, select_len=24, top_n=3, window=7, init_blocks=1, local_blocks=1),
    # weights 1,2,2,2,1
    "l16d8s32n3_i1l1": dict(block_len=16, stride=8, select_len=32, top_n=3, window=50, init_blocks=1, local_blocks=1),
}

# name -> (B, T, document lengths or None); packed boundaries are aligned to no block size and
# include documents shorter than every block_len above (1 and 5 tokens).
LAYOUTS = {
    "T1": (2, 1, None),
    "T1_packed": (1, 1, [1]),
    "T31": (2, 31, None),
    "T32": (2, 32, None),
    "T33": (2, 33, None),
    "T100": (1, 100, None),
    "T100_packed": (1, 100, [7, 40, 53]),
    "T257": (1, 257, None),
    "T257_packed": (1, 257, [1, 5, 70, 33, 148]),
}

GROUPS = [1, 2, 4, 16]


def _heads(G):
    """``(HQ, H)`` for group size ``G`` (two KV heads unless that makes too many query heads)."""
    H = 2 if G <= 4 else 1
    return G * H, H


def _cases():
    """Every layout x every geometry, with G rotating so each layout meets every G."""
    out = []
    for (li, lname), (gi, gname) in itertools.product(enumerate(LAYOUTS), enumerate(GEOMETRIES)):
        G = GROUPS[(li + gi) % len(GROUPS)]
        out.append(pytest.param(lname, gname, G, id=f"{lname}-{gname}-G{G}"))
    return out


CASES = _cases()


def _rotated(options, name):
    """layouts x G, with ``options`` rotating so that every layout and every G meets every option."""
    out = []
    for (li, lname), (gi, G) in itertools.product(enumerate(LAYOUTS), enumerate(GROUPS)):
        opt = options[(li + gi) % len(options)]
        opt = opt if isinstance(opt, tuple) else (opt,)
        out.append(pytest.param(lname, G, *opt, id=f"{lname}-G{G}-{name}{'_'.join(map(str, opt))}"))
    return out


WINDOW_CASES = _rotated([1, 7, 20, 512], "w")
SELECTED_CASES = _rotated([(16, 3), (8, 5), (64, 2), (24, 16)], "ls_n")
# compressed attention only depends on (l, d)
CMP_GEOMETRIES = [(32, 16), (16, 8), (8, 8), (32, 8), (8, 4)]
CMP_CASES = [
    pytest.param(lname, l, d, G, id=f"{lname}-l{l}d{d}-G{G}")
    for (li, lname), (ci, (l, d)) in itertools.product(enumerate(LAYOUTS), enumerate(CMP_GEOMETRIES))
    for G in [GROUPS[(li + ci) % len(GROUPS)]]
]




def _inputs(layout, G, geo=None, scale_given=False):
    """Random float64 inputs for one case: dict with q, k, v, k_cmp, v_cmp, gates, cu, scale."""
    B, T, docs = LAYOUTS[layout]
    cu = O.cu_seqlens_of(docs)
    HQ, H = _heads(G)
    x = dict(
        q=torch.randn(B, T, HQ, DK, dtype=F64),
        k=torch.randn(B, T, H, DK, dtype=F64),
        v=torch.randn(B, T, H, DV, dtype=F64),
        gates=torch.rand(B, T, HQ, 3, dtype=F64),
        cu=cu,
        scale=0.31 if scale_given else None,
        B=B, T=T, HQ=HQ, H=H,
    )
    if geo is not None:
        nc = O.oracle_compressed_offsets(T, geo["block_len"], geo["stride"], cu)[-1]
        x["k_cmp"] = torch.randn(B, nc, H, DK, dtype=F64)
        x["v_cmp"] = torch.randn(B, nc, H, DV, dtype=F64)
    return x


def _assert_close(actual, expected, what, ctx, tol=TOL):
    """Same shape, no NaN, identical -inf pattern, finite entries within ``tol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)} [{ctx}]"
    assert actual.dtype == F64, f"{what}: dtype {actual.dtype} [{ctx}]"
    assert not torch.isnan(actual).any(), f"{what}: NaN in reference output [{ctx}]"
    ninf_a, ninf_e = torch.isneginf(actual), torch.isneginf(expected)
    assert torch.equal(ninf_a, ninf_e), (
        f"{what}: -inf pattern differs at {torch.nonzero(ninf_a != ninf_e)[:5].tolist()} [{ctx}]")
    assert not torch.isinf(actual[~ninf_a]).any(), f"{what}: +inf in reference output [{ctx}]"
    if actual.numel():
        diff = (actual[~ninf_a] - expected[~ninf_e]).abs()
        err = diff.max().item() if diff.numel() else 0.0
        assert err <= tol, f"{what}: max abs err {err:.3e} > {tol} [{ctx}]"


def _assert_idx_equal(actual, expected, what, ctx):
    assert actual.dtype == torch.int32, f"{what}: dtype {actual.dtype}, want int32 [{ctx}]"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)} [{ctx}]"
    bad = torch.nonzero((actual != expected).any(-1))
    if bad.numel():
        b, t, h = bad[0].tolist()
        raise AssertionError(
            f"{what}: {len(bad)} rows differ; first [b={b}, t={t}, h={h}]: reference {actual[b, t, h].tolist()} "
            f"oracle {expected[b, t, h].tolist()} [{ctx}]")


# --------------------------------------------------------------------------------------------
# layout helpers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("l,d", [(32, 16), (16, 8), (8, 8), (8, 4), (32, 8)])
def test_layout_helpers_match_oracle(layout, l, d, seed):
    B, T, docs = LAYOUTS[layout]
    cu = O.cu_seqlens_of(docs)
    ctx = f"seed={seed} layout={layout} l={l} d={d}"
    for n in range(0, 80):
        assert L.num_compressed_blocks(n, l, d) == O.oracle_num_compressed_blocks(n, l, d), f"L={n} [{ctx}]"
    offsets = O.oracle_compressed_offsets(T, l, d, cu)
    assert L.total_compressed_blocks(T, l, d, cu) == offsets[-1], ctx
    if cu is not None:
        got = L.compressed_cu_seqlens(cu, l, d)
        assert got.dtype == torch.int32 and got.tolist() == offsets, f"{got.tolist()} != {offsets} [{ctx}]"
    x = torch.randn(B, T, 2, 3, dtype=F64)
    got = L.unfold_blocks(x, l, d, cu)
    want = O.oracle_unfold_blocks(x, l, d, cu)
    assert got.shape == want.shape and torch.equal(got, want), ctx


@pytest.mark.parametrize("l,d,ls", [(32, 16, 64), (16, 8, 16), (8, 8, 8), (32, 8, 16), (8, 4, 24), (16, 8, 32)])
def test_overlap_weights_match_oracle(l, d, ls):
    num_cmp, num_sel = 40, 12
    got = R.overlap_weights(num_cmp, num_sel, l, d, ls, F64)
    want = torch.tensor([[O.oracle_overlap_weight(i, j, l, d, ls) for j in range(num_sel)] for i in range(num_cmp)],
                        dtype=F64)
    assert torch.equal(got, want), f"l={l} d={d} l'={ls}"
    if (l, d, ls) == (32, 16, 64):  # DESIGN.md: a selection block's weights run 1, 2, 2, 2, 1
        assert [w for w in want[:, 2].tolist() if w] == [1, 2, 2, 2, 1]


# --------------------------------------------------------------------------------------------
# branches on random inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,G,window", WINDOW_CASES)
def test_window_attention_matches_oracle(layout, G, window, seed):
    x = _inputs(layout, G, scale_given=(window == 7))
    ctx = f"seed={seed} layout={layout} G={G} w={window} HQ={x['HQ']} H={x['H']}"
    got = R.window_attention(x["q"], x["k"], x["v"], window, scale=x["scale"], cu_seqlens=x["cu"])
    want = O.oracle_window_attention(x["q"], x["k"], x["v"], window, scale=x["scale"], cu_seqlens=x["cu"])
    _assert_close(got, want, "o_win", ctx)


@pytest.mark.parametrize("layout,G,select_len,top_n", SELECTED_CASES)
def test_selected_attention_matches_oracle(layout, G, select_len, top_n, seed):
    """Random block_idx: -1 and other negatives, repeats, blocks past t and past the document."""
    x = _inputs(layout, G, scale_given=(G == 4))
    B, T, H = x["B"], x["T"], x["H"]
    idx = torch.randint(-2, T // select_len + 3, (B, T, H, top_n), dtype=torch.int32)
    idx[:, ::7] = -1  # some queries with an empty selection
    if T > 3:
        idx[:, 3, :, :] = 0  # a row of repeats
    ctx = f"seed={seed} layout={layout} G={G} l'={select_len} n={top_n}"
    got = R.selected_attention(x["q"], x["k"], x["v"], idx, select_len, scale=x["scale"], cu_seqlens=x["cu"])
    want = O.oracle_selected_attention(x["q"], x["k"], x["v"], idx, select_len, scale=x["scale"], cu_seqlens=x["cu"])
    _assert_close(got, want, "o_slc", ctx)
    empty = (idx < 0).all(-1)  # [B, T, H]: these queries must get exactly 0
    for hq in range(x["HQ"]):
        rows = got[:, :, hq][empty[:, :, hq // G]]
        assert torch.equal(rows, torch.zeros_like(rows)), f"o_slc != 0 for an empty selection [{ctx}]"


@pytest.mark.parametrize("layout,l,d,G", CMP_CASES)
def test_compressed_attention_matches_oracle(layout, l, d, G, seed):
    x = _inputs(layout, G, dict(block_len=l, stride=d), scale_given=(G == 2))
    ctx = f"seed={seed} layout={layout} l={l} d={d} G={G} Nc={x['k_cmp'].shape[1]}"
    want_o, want_lse = O.oracle_compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], l, d, x["scale"], x["cu"])
    got_o, got_lse = R.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], l, d, scale=x["scale"], cu_seqlens=x["cu"])
    _assert_close(got_o, want_o, "o_cmp", ctx)
    _assert_close(got_lse, want_lse, "lse", ctx)
    blind = torch.isneginf(want_lse)
    assert torch.equal(got_o[blind], torch.zeros_like(got_o[blind])), f"o_cmp != 0 where no block is seen [{ctx}]"


@pytest.mark.parametrize("layout,gname,G", CASES)
def test_select_blocks_matches_oracle(layout, gname, G, seed):
    """select_blocks is fed the oracle's lse, so it is checked independently of compressed_attention."""
    geo = GEOMETRIES[gname]
    x = _inputs(layout, G, geo, scale_given=(G == 2))
    ctx = f"seed={seed} layout={layout} geometry={gname} G={G}"
    _, lse = O.oracle_compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], geo["block_len"], geo["stride"],
                                           x["scale"], x["cu"])
    sel = dict(block_len=geo["block_len"], stride=geo["stride"], select_len=geo["select_len"], top_n=geo["top_n"],
               init_blocks=geo["init_blocks"], local_blocks=geo["local_blocks"], scale=x["scale"], cu_seqlens=x["cu"])
    want = O.oracle_select_blocks(x["q"], x["k_cmp"], **sel)
    got = R.select_blocks(x["q"], x["k_cmp"], lse, **sel)
    _assert_idx_equal(got, want, "idx", ctx)


NSA_CASES = [
    pytest.param("T257_packed", "l16d8s16n4", 16, "separate", id="T257_packed-l16d8s16n4-G16"),
    pytest.param("T257", "l8d8s8n2_i0l0", 4, "separate", id="T257-l8d8s8n2_i0l0-G4"),
    pytest.param("T100_packed", "paper", 1, "separate", id="T100_packed-paper-G1"),
    pytest.param("T100", "l32d8s16n5", 2, "shared", id="T100-l32d8s16n5-G2-shared"),
    pytest.param("T33", "l16d8s16n4_i2l1", 2, "separate", id="T33-l16d8s16n4_i2l1-G2"),
    pytest.param("T32", "l8d4s24n3_i1l1", 4, "shared", id="T32-l8d4s24n3_i1l1-G4-shared"),
    pytest.param("T31", "l16d8s32n3_i1l1", 1, "separate", id="T31-l16d8s32n3_i1l1-G1"),
    pytest.param("T1", "paper", 2, "separate", id="T1-paper-G2"),
    pytest.param("T1_packed", "l8d8s8n2_i0l0", 16, "separate", id="T1_packed-l8d8s8n2_i0l0-G16"),
    pytest.param("T257_packed", "paper", 2, "shared", id="T257_packed-paper-G2-shared"),
    pytest.param("T257_packed", "l8d4s24n3_i1l1", 1, "separate", id="T257_packed-l8d4s24n3_i1l1-G1"),
    pytest.param("T100_packed", "l16d8s16n3_i0l1", 4, "separate", id="T100_packed-l16d8s16n3_i0l1-G4"),
    pytest.param("T257", "l16d8s32n3_i1l1", 16, "separate", id="T257-l16d8s32n3_i1l1-G16"),
]


@pytest.mark.parametrize("layout,gname,G,sharing", NSA_CASES)
def test_nsa_attention_is_gated_sum_of_oracle_branches(layout, gname, G, sharing, seed):
    """nsa_attention == g_cmp*o_cmp + g_slc*o_slc + g_win*o_win of the oracle, k_cmp = mean of raw blocks."""
    geo = GEOMETRIES[gname]
    l, d = geo["block_len"], geo["stride"]
    x = _inputs(layout, G)
    cu = x["cu"]
    k_slc, v_slc = x["k"], x["v"]
    if sharing == "shared":
        k_win, v_win = k_slc, v_slc
    else:
        k_win, v_win = torch.randn_like(k_slc), torch.randn_like(v_slc)
    k_cmp = O.oracle_unfold_blocks(torch.randn_like(k_slc) if sharing == "separate" else k_slc, l, d, cu).mean(3)
    v_cmp = O.oracle_unfold_blocks(torch.randn_like(v_slc) if sharing == "separate" else v_slc, l, d, cu).mean(3)
    ctx = f"seed={seed} layout={layout} geometry={gname} G={G} kv={sharing}"
    want, parts = O.oracle_nsa_attention(x["q"], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, x["gates"],
                                         cu_seqlens=cu, **geo)
    got = R.nsa_attention(x["q"], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, x["gates"], cu_seqlens=cu, **geo)
    _assert_close(got, want, "o_nsa", ctx)
    # the gates really weight separate branches: a one-hot gate isolates each branch (small T only, for time)
    for c, name in enumerate(["o_cmp", "o_slc", "o_win"] if x["T"] <= 100 else []):
        onehot = torch.zeros_like(x["gates"])
        onehot[..., c] = 1.0
        got_c = R.nsa_attention(x["q"], k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, onehot, cu_seqlens=cu, **geo)
        _assert_close(got_c, parts[name], f"nsa with one-hot gate {name}", ctx)


def test_window_zero_drops_the_window_branch(seed):
    """window=0 (flash-linear-attention's configuration): o = g_cmp*o_cmp + g_slc*o_slc, window gate ignored."""
    geo = dict(GEOMETRIES["l16d8s16n4"], window=0)
    x = _inputs("T100_packed", 4, geo)
    args = (x["q"], x["k_cmp"], x["v_cmp"], x["k"], x["v"], x["k"], x["v"])
    _, parts = O.oracle_nsa_attention(*args, x["gates"], cu_seqlens=x["cu"], **dict(geo, window=1))
    want = x["gates"][..., 0:1] * parts["o_cmp"] + x["gates"][..., 1:2] * parts["o_slc"]
    got = R.nsa_attention(*args, x["gates"], cu_seqlens=x["cu"], **geo)
    _assert_close(got, want, "o_nsa(window=0)", f"seed={seed}")


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("docs", [
    pytest.param([20, 20], id="early_queries"),          # every doc has a block, queries t < l-1 see none
    pytest.param([5, 15, 20], id="docs_shorter_than_l"),  # docs with no compressed block at all
    pytest.param([10], id="whole_batch_shorter_than_l"),
])
def test_query_seeing_no_compressed_block(docs, seed):
    geo = dict(block_len=16, stride=8, select_len=8, top_n=2, window=4, init_blocks=0, local_blocks=1)
    l, d = geo["block_len"], geo["stride"]
    cu = O.cu_seqlens_of(docs)
    T = sum(docs)
    HQ, H = 4, 2
    q = torch.randn(1, T, HQ, DK, dtype=F64)
    k, v = torch.randn(1, T, H, DK, dtype=F64), torch.randn(1, T, H, DV, dtype=F64)
    nc = O.oracle_compressed_offsets(T, l, d, cu)[-1]
    k_cmp, v_cmp = torch.randn(1, nc, H, DK, dtype=F64), torch.randn(1, nc, H, DV, dtype=F64)
    ctx = f"seed={seed} docs={docs} l={l} d={d}"
    want_o, want_lse = O.oracle_compressed_attention(q, k_cmp, v_cmp, l, d, None, cu)
    blind = torch.isneginf(want_lse)
    assert blind.any()
    o, lse = R.compressed_attention(q, k_cmp, v_cmp, l, d, cu_seqlens=cu)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), f"NaN [{ctx}]"
    assert torch.equal(torch.isneginf(lse), blind), f"lse == -inf exactly where no block is seen [{ctx}]"
    assert torch.equal(o[blind], torch.zeros_like(o[blind])), f"o_cmp must be exactly 0 [{ctx}]"
    _assert_close(o, want_o, "o_cmp", ctx)
    # selection with lse = -inf: every candidate scores 0 -> forced block(s), then the lowest indices
    idx = R.select_blocks(q, k_cmp, lse, l, d, geo["select_len"], geo["top_n"], geo["init_blocks"],
                          geo["local_blocks"], cu_seqlens=cu)
    _assert_idx_equal(idx, O.oracle_select_blocks(q, k_cmp, l, d, geo["select_len"], geo["top_n"],
                                                   geo["init_blocks"], geo["local_blocks"], None, cu), "idx", ctx)
    # the whole op: no NaN forward or backward
    gates = torch.rand(1, T, HQ, 3, dtype=F64, requires_grad=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k_cmp, v_cmp, k, v)]
    out = R.nsa_attention(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[3], leaves[4], gates,
                          cu_seqlens=cu, **geo)
    want, _ = O.oracle_nsa_attention(q, k_cmp, v_cmp, k, v, k, v, gates, cu_seqlens=cu, **geo)
    _assert_close(out, want, "o_nsa", ctx)
    out.square().sum().backward()
    for name, t in zip(["q", "k_cmp", "v_cmp", "k", "v", "gates"], leaves + [gates]):
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"grad of {name} not finite [{ctx}]"
    # queries that see no block get no gradient from the compressed branch
    gq = torch.autograd.grad(R.compressed_attention(leaves[0], leaves[1], leaves[2], l, d, cu_seqlens=cu)[0].sum(),
                             leaves[0])[0]
    assert torch.equal(gq[blind], torch.zeros_like(gq[blind])), f"dq != 0 for a blind query [{ctx}]"


@pytest.mark.parametrize("init_blocks,local_blocks", [(1, 2), (2, 1), (0, 0), (0, 3), (3, 0), (1, 1)])
def test_first_selection_block(init_blocks, local_blocks, seed):
    """t < l': the only candidate is block 0 (init and local overlap on it) -> [0, -1, -1]."""
    l, d, ls, n = 16, 8, 32, 3
    docs = [33, 37, 30]  # the second document starts mid-block, the third is a single partial block
    cu = O.cu_seqlens_of(docs)
    T = sum(docs)
    q = torch.randn(1, T, 4, DK, dtype=F64)
    nc = O.oracle_compressed_offsets(T, l, d, cu)[-1]
    k_cmp = torch.randn(1, nc, 2, DK, dtype=F64)
    ctx = f"seed={seed} init={init_blocks} local={local_blocks}"
    _, lse = O.oracle_compressed_attention(q, k_cmp, k_cmp, l, d, None, cu)
    idx = R.select_blocks(q, k_cmp, lse, l, d, ls, n, init_blocks, local_blocks, cu_seqlens=cu)
    local = L.doc_local_positions(cu, T)
    first = local < ls
    assert first.sum() == 32 + 32 + 30
    want_row = torch.tensor([0, -1, -1], dtype=torch.int32)
    assert (idx[0][first] == want_row).all(), f"{idx[0][first][:3].tolist()} [{ctx}]"
    _assert_idx_equal(idx, O.oracle_select_blocks(q, k_cmp, l, d, ls, n, init_blocks, local_blocks, None, cu),
                      "idx", ctx)


def test_candidates_equal_n_and_n_plus_one(seed):
    """n candidates: all of them, no -1. n+1: forced 0 and the newest, plus the best n-2 of the middle."""
    l, d, ls, n = 8, 8, 8, 4
    T = 40  # local t in [24, 32) has 4 candidates, t in [32, 40) has 5
    q = torch.randn(2, T, 4, DK, dtype=F64)
    k_cmp = torch.randn(2, O.oracle_num_compressed_blocks(T, l, d), 2, DK, dtype=F64)
    ctx = f"seed={seed}"
    _, lse = O.oracle_compressed_attention(q, k_cmp, k_cmp, l, d, None, None)
    idx = R.select_blocks(q, k_cmp, lse, l, d, ls, n, 1, 1)
    _assert_idx_equal(idx, O.oracle_select_blocks(q, k_cmp, l, d, ls, n, 1, 1), "idx", ctx)
    assert (idx[:, 24:32] == torch.arange(4, dtype=torch.int32)).all(), ctx
    scores = O.oracle_block_scores(q, k_cmp, l, d, ls)
    for b, t, h in itertools.product(range(2), range(32, 40), range(2)):
        middle = [1, 2, 3]
        dropped = min(middle, key=lambda j: (scores[b, t, h, j].item(), -j))  # the worst-ranked middle block
        want = [0] + [j for j in middle if j != dropped] + [4]
        assert idx[b, t, h].tolist() == want, f"t={t}: {idx[b, t, h].tolist()} != {want} [{ctx}]"


@pytest.mark.parametrize("zero", ["k_cmp", "q"])
@pytest.mark.parametrize("geometry", ["l8d8s8", "l16d8s8"])
@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 0), (0, 1), (1, 1)])
def test_exact_ties_go_to_lower_index(zero, geometry, init_blocks, local_blocks, seed):
    """Uniform compressed probabilities make whole runs of blocks tie exactly.

    l=d=l'=8: every visible block scores G*p; the newest candidate (not yet compressed) scores 0.
    l=16, d=8, l'=8: block j scores p_{j-1} + p_j, so blocks 1..m-1 tie at 2p, block 0 and block m at p.
    """
    l, d, ls, n = (8, 8, 8, 3) if geometry == "l8d8s8" else (16, 8, 8, 3)
    docs = [45, 62]
    cu = O.cu_seqlens_of(docs)
    T = sum(docs)
    G, H = 2, 2
    q = torch.randn(1, T, G * H, DK, dtype=F64)
    nc = O.oracle_compressed_offsets(T, l, d, cu)[-1]
    k_cmp = torch.randn(1, nc, H, DK, dtype=F64)
    if zero == "q":
        q.zero_()
    else:
        k_cmp.zero_()
    ctx = f"seed={seed} zero={zero} geometry={geometry} init={init_blocks} local={local_blocks}"
    _, lse = O.oracle_compressed_attention(q, k_cmp, k_cmp, l, d, None, cu)
    idx = R.select_blocks(q, k_cmp, lse, l, d, ls, n, init_blocks, local_blocks, cu_seqlens=cu)
    _assert_idx_equal(idx, O.oracle_select_blocks(q, k_cmp, l, d, ls, n, init_blocks, local_blocks, None, cu),
                      "idx", ctx)
    # the expected rows, written out by hand from the tie structure above
    for t, t_local in enumerate(L.doc_local_positions(cu, T).tolist()):
        last = t_local // ls
        cands = list(range(last + 1))
        if len(cands) <= n:
            want = cands + [-1] * (n - len(cands))
        else:
            m = (t_local - l + 1) // d + 1 if t_local >= l - 1 else 0  # visible compressed blocks
            if geometry == "l8d8s8":
                rank = {j: (0 if j < m else 1) for j in cands}  # ties among visible, zeros after
            else:
                rank = {j: (0 if 1 <= j <= m - 1 else (1 if j in (0, m) else 2)) for j in cands}
            forced = [j for j in cands if j < init_blocks or last - local_blocks < j <= last]
            rest = sorted((j for j in cands if j not in forced), key=lambda j: (rank[j], j))
            want = sorted(forced + rest[: n - len(forced)])
        for h in range(H):
            got = idx[0, t, h].tolist()
            assert got == want, f"t={t} (local {t_local}) h={h}: {got} != {want} [{ctx}]"


@pytest.mark.parametrize("init_blocks,local_blocks", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_all_zero_scores_tie_to_lowest(init_blocks, local_blocks, seed):
    """l=32, d=8, l'=8, n=2: queries t < 31 see no compressed block (lse = -inf) yet have up to 4
    candidates, all scoring exactly 0 -> forced blocks, then the lowest indices; no NaN from lse = -inf."""
    l, d, ls, n = 32, 8, 8, 2
    docs = [48, 37]
    cu = O.cu_seqlens_of(docs)
    T = sum(docs)
    q = torch.randn(1, T, 4, DK, dtype=F64)
    k_cmp = torch.randn(1, O.oracle_compressed_offsets(T, l, d, cu)[-1], 2, DK, dtype=F64)
    ctx = f"seed={seed} init={init_blocks} local={local_blocks}"
    _, lse = O.oracle_compressed_attention(q, k_cmp, k_cmp, l, d, None, cu)
    idx = R.select_blocks(q, k_cmp, lse, l, d, ls, n, init_blocks, local_blocks, cu_seqlens=cu)
    _assert_idx_equal(idx, O.oracle_select_blocks(q, k_cmp, l, d, ls, n, init_blocks, local_blocks, None, cu),
                      "idx", ctx)
    for t, t_local in enumerate(L.doc_local_positions(cu, T).tolist()):
        if t_local >= l - 1:
            continue
        last = t_local // ls
        if last + 1 <= n:
            want = list(range(last + 1)) + [-1] * (n - last - 1)
        elif local_blocks:
            want = [0, last]
        else:
            want = [0, 1]
        for h in range(2):
            assert idx[0, t, h].tolist() == want, f"t={t}: {idx[0, t, h].tolist()} != {want} [{ctx}]"


def test_minus_one_padding_paper_geometry(seed):
    """Paper geometry, n=16: with c = t//64 + 1 candidates the row is 0..c-1 then 16-c times -1."""
    geo = GEOMETRIES["paper"]
    docs = [40, 150, 67]  # all docs >= l so every doc has compressed blocks
    cu = O.cu_seqlens_of(docs)
    T = sum(docs)
    q = torch.randn(1, T, 4, DK, dtype=F64)
    nc = O.oracle_compressed_offsets(T, 32, 16, cu)[-1]
    k_cmp = torch.randn(1, nc, 2, DK, dtype=F64)
    _, lse = O.oracle_compressed_attention(q, k_cmp, k_cmp, 32, 16, None, cu)
    idx = R.select_blocks(q, k_cmp, lse, 32, 16, 64, 16, 1, 2, cu_seqlens=cu)
    assert idx.shape == (1, T, 2, 16) and idx.dtype == torch.int32
    for t, t_local in enumerate(L.doc_local_positions(cu, T).tolist()):
        c = t_local // 64 + 1
        want = list(range(c)) + [-1] * (16 - c)
        for h in range(2):
            assert idx[0, t, h].tolist() == want, f"seed={seed} t={t}: {idx[0, t, h].tolist()}"
