"""Triton ``select_blocks`` against ``nsa_kernels.reference.select_blocks``.

On the CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``) on
small shapes; ``@pytest.mark.gpu`` tests run long sequences on CUDA. Every test draws fresh inputs from the
``seed`` fixture (replay with ``NSA_TEST_SEED=<seed>``).

How indices are compared: the kernel and the reference both score in fp32 but sum in different orders, so
two blocks whose scores agree to a few ulps can legitimately be ranked differently. Rows must therefore equal
the reference exactly, except rows where the kernel's choice is still a correct top-n under the exact
(fp64) block scores up to a relative tolerance ``NEAR_TIE = 1e-5`` (forced blocks present, only candidates,
right count, ascending, -1 padded, and every block left out scores at most ``1 + NEAR_TIE`` times the lowest
freely chosen one); such rows must also be rare. Inputs whose scores tie exactly in any summation order
(``q = 0``, ``lse = 0``: every visible p is exactly 1) and queries that see no compressed block must match
the reference exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

from nsa_kernels import reference as R
from nsa_kernels.layout import document_spans, total_compressed_blocks
from nsa_kernels.reference.compressed import compressed_doc_ranges
from nsa_kernels.reference.selection import overlap_weights

sel = pytest.importorskip("nsa_kernels.triton.select_blocks", reason="needs the triton package")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: Triton kernels under the CPU interpreter

NEAR_TIE = 1e-5

# name -> (block_len l, stride d, select_len l', top_n n, init_blocks, local_blocks)
GEOMETRIES = {
    "paper": (32, 16, 64, 16, 1, 2),  # T <= 150: at most 3 candidates, everything is selected
    "l8d4s16n4": (8, 4, 16, 4, 1, 2),  # weights 1,2,2,2,1 over 4 rows per selection block
    "l16d8s8n3_i0l1": (16, 8, 8, 3, 0, 1),  # l > l': a compressed block spans two selection blocks
    "l12d4s4n5_i2l0": (12, 4, 4, 5, 2, 0),  # l/d = 3 > l'/d = 1: rows reach two blocks past their own
    "l8d4s24n3_i0l0": (8, 4, 24, 3, 0, 0),  # nothing forced; l' not a multiple of l
    "l4d4s8n20": (4, 4, 8, 20, 1, 2),  # R = 1 (no spill), top_n > 16 (running list of 32), > candidates
}


def _inputs(B, T, HQ, H, Dk, geo, cu=None, dtype=torch.float32, q_gain=1.0):
    """q, k_cmp and the lse that ``compressed_attention`` (reference) gives for them."""
    l, d = geo[0], geo[1]
    nc = total_compressed_blocks(T, l, d, cu)
    q = (torch.randn(B, T, HQ, Dk) * q_gain).to(dtype)
    k_cmp = torch.randn(B, nc, H, Dk).to(dtype)
    v_cmp = torch.randn(B, nc, H, 8).to(dtype)  # Dv != Dk; only lse is used
    _, lse = R.compressed_attention(q, k_cmp, v_cmp, l, d, cu_seqlens=cu)
    return q, k_cmp, lse


def _run(fn, q, k_cmp, lse, geo, scale=None, cu=None):
    l, d, ls, n, init, local = geo
    return fn(q, k_cmp, lse, l, d, ls, n, init_blocks=init, local_blocks=local, scale=scale, cu_seqlens=cu)


def _token_scores64(q, k_cmp, lse, geo, scale, cu, b, t):
    """Exact block scores ``[H, num_sel]`` (fp64) of global token ``t`` of batch row ``b``, and its position."""
    l, d, ls = geo[0], geo[1], geo[2]
    T, HQ, Dk = q.shape[1], q.shape[2], q.shape[3]
    H = k_cmp.shape[2]
    G = HQ // H
    scale = Dk ** -0.5 if scale is None else scale
    spans = document_spans(cu, T)
    doc = next(i for i, (s, e) in enumerate(spans) if s <= t < e)
    start, end = spans[doc]
    c0, c1 = compressed_doc_ranges(cu, k_cmp.shape[1], l, d)[doc]
    pos = t - start
    qt = q[b, t].double().view(H, G, Dk)
    kk = k_cmp[b, c0:c1].double()
    logits = torch.einsum("hgd,nhd->hgn", qt, kk) * scale
    visible = torch.arange(c1 - c0, device=q.device) * d + l - 1 <= pos
    shifted = logits - lse[b, t].double().view(H, G, 1)
    probs = torch.where(visible, shifted, torch.full_like(shifted, -math.inf)).exp()
    num_sel = -(-(end - start) // ls)
    w = overlap_weights(c1 - c0, num_sel, l, d, ls, torch.float64, q.device)
    return probs.sum(1) @ w, pos


def _check_row(row, scores, pos, geo):
    """None if ``row`` is a correct top-n for exact ``scores`` up to NEAR_TIE, else what is wrong."""
    ls, n, init, local = geo[2:]
    valid = [j for j in row if j >= 0]
    if row != valid + [-1] * (len(row) - len(valid)) or valid != sorted(set(valid)):
        return f"not ascending, unique and -1 padded: {row}"
    last = pos // ls
    cand = set(range(last + 1))
    forced = {j for j in cand if j < init or j > last - local}
    chosen = set(valid)
    if not chosen <= cand or not forced <= chosen or len(chosen) != min(n, len(cand)):
        return f"bad set {row}: candidates 0..{last}, forced {sorted(forced)}"
    free, left = chosen - forced, cand - chosen
    if free and left:
        low = min(scores[j].item() for j in free)
        high = max(scores[j].item() for j in left)
        if high > low * (1 + NEAR_TIE):
            return f"{row}: left-out block scores {high:.9g} > chosen {low:.9g} (beyond NEAR_TIE)"
    return None


def _assert_selection(got, ref, q, k_cmp, lse, geo, scale, cu, ctx, max_near_ties=0.01):
    """``got`` equals ``ref`` except rare rows that are still correct up to near ties (module docstring)."""
    assert got.dtype == torch.int32, f"dtype {got.dtype} [{ctx}]"
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)} [{ctx}]"
    bad = torch.nonzero((got != ref).any(-1)).tolist()
    scores_cache = {}
    for b, t, h in bad:
        if (b, t) not in scores_cache:
            scores_cache[(b, t)] = _token_scores64(q, k_cmp, lse, geo, scale, cu, b, t)
        scores, pos = scores_cache[(b, t)]
        err = _check_row(got[b, t, h].tolist(), scores[h], pos, geo)
        assert err is None, f"row [b={b}, t={t}, h={h}] differs from reference {ref[b, t, h].tolist()}: {err} [{ctx}]"
    rows = got.shape[0] * got.shape[1] * got.shape[2]
    assert len(bad) <= max(2, max_near_ties * rows), f"{len(bad)} of {rows} rows differ (near ties) [{ctx}]"


def test_row_checker_rejects_wrong_rows(seed):
    """The near-tie allowance is no blank cheque: the reference's rows pass, corrupted ones fail."""
    geo = GEOMETRIES["l8d4s16n4"]
    q, k_cmp, lse = _inputs(1, 150, 4, 1, 16, geo)
    ref = _run(R.select_blocks, q, k_cmp, lse, geo)
    rejected = 0
    for t in range(100, 150, 7):
        scores, pos = _token_scores64(q, k_cmp, lse, geo, None, None, 0, t)
        row = ref[0, t, 0].tolist()
        assert _check_row(row, scores[0], pos, geo) is None, f"t={t} seed={seed}"
        last = pos // geo[2]
        left = [j for j in range(last + 1) if j not in row]
        worst = min(left, key=lambda j: scores[0, j].item())
        free = [j for j in row if 0 < j <= last - geo[5]]
        best = max(free, key=lambda j: scores[0, j].item())
        if scores[0, best] > scores[0, worst] * (1 + 10 * NEAR_TIE):
            rejected += _check_row(sorted(set(row) - {best} | {worst}), scores[0], pos, geo) is not None
        else:
            rejected += 1
        assert _check_row(row[::-1], scores[0], pos, geo) is not None  # not ascending
        assert _check_row([j for j in row if j != 0] + [-1], scores[0], pos, geo) is not None  # forced missing
        assert _check_row(row[:-1] + [last + 1], scores[0], pos, geo) is not None  # not a candidate
    assert rejected == len(range(100, 150, 7)), f"seed={seed}"


def _compare(q, k_cmp, lse, geo, ctx, scale=None, cu=None, exact=False, max_near_ties=0.01):
    got = _run(sel.select_blocks, q, k_cmp, lse, geo, scale, cu)
    ref = _run(R.select_blocks, q, k_cmp, lse, geo, scale, cu)
    if exact:
        bad = torch.nonzero((got != ref).any(-1))
        assert got.dtype == torch.int32 and got.shape == ref.shape, ctx
        assert not bad.numel(), (f"{len(bad)} rows differ; first {bad[0].tolist()}: "
                                 f"{got[tuple(bad[0])].tolist()} vs reference {ref[tuple(bad[0])].tolist()} [{ctx}]")
    else:
        _assert_selection(got, ref, q, k_cmp, lse, geo, scale, cu, ctx, max_near_ties)
    return got, ref


# --------------------------------------------------------------------------------------------
# CPU (interpreter), small shapes
# --------------------------------------------------------------------------------------------
# (geometry, G, H, Dk, T): every geometry meets G in {1, 4, 16}; unaligned T; Dk 24 pads to 32
CASES = [
    ("paper", 16, 1, 32, 150),
    ("l8d4s16n4", 1, 2, 24, 150),
    ("l8d4s16n4", 16, 1, 16, 117),
    ("l16d8s8n3_i0l1", 4, 2, 32, 133),
    ("l12d4s4n5_i2l0", 1, 3, 16, 101),
    ("l8d4s24n3_i0l0", 4, 1, 24, 150),
    ("l4d4s8n20", 16, 1, 16, 150),
]


@pytest.mark.parametrize("name,G,H,Dk,T", CASES, ids=[f"{c[0]}-G{c[1]}-T{c[4]}" for c in CASES])
def test_matches_reference(name, G, H, Dk, T, seed):
    geo = GEOMETRIES[name]
    q, k_cmp, lse = _inputs(2, T, G * H, H, Dk, geo)
    _compare(q, k_cmp, lse, geo, f"seed={seed} {name} G={G} H={H} Dk={Dk} T={T}")


@pytest.mark.parametrize("name,G", [("l8d4s16n4", 4), ("l16d8s8n3_i0l1", 16), ("l12d4s4n5_i2l0", 1)])
def test_packed_documents(name, G, seed):
    """Documents of 1 token, shorter than every block, unaligned; positions and blocks restart per document."""
    geo = GEOMETRIES[name]
    cu = torch.tensor([0, 1, 5, 75, 108, 109, 150], dtype=torch.int32)
    q, k_cmp, lse = _inputs(1, 150, G * 2, 2, 16, geo, cu=cu)
    _compare(q, k_cmp, lse, geo, f"seed={seed} {name} G={G} packed", cu=cu)


@pytest.mark.parametrize("name", ["l8d4s16n4", "l12d4s4n5_i2l0", "l16d8s8n3_i0l1"])
def test_sharp_attention_and_scale(name, seed):
    """Peaked probabilities (large q) and an explicit scale: scores spread over many orders of magnitude."""
    geo = GEOMETRIES[name]
    nc = total_compressed_blocks(130, geo[0], geo[1])
    q, k_cmp = torch.randn(1, 130, 8, 16) * 4.0, torch.randn(1, nc, 2, 16)
    _, lse = R.compressed_attention(q, k_cmp, torch.randn(1, nc, 2, 16), geo[0], geo[1], scale=0.7)
    _compare(q, k_cmp, lse, geo, f"seed={seed} {name} sharp", scale=0.7)


@pytest.mark.parametrize("name,G", [("l8d4s16n4", 4), ("l12d4s4n5_i2l0", 16), ("l16d8s8n3_i0l1", 1),
                                    ("l4d4s8n20", 4)])
def test_exact_ties(name, G, seed):
    """q = 0 and lse = 0: every visible p is exactly 1, scores are exact integers whatever the summation
    order, and full blocks tie exactly: ties must go to the lower index exactly as in the reference."""
    geo = GEOMETRIES[name]
    cu = torch.tensor([0, 3, 90, 150], dtype=torch.int32)
    q, k_cmp, _ = _inputs(1, 150, G * 2, 2, 16, geo, cu=cu)
    q = torch.zeros_like(q)
    lse = torch.zeros(1, 150, G * 2)
    _compare(q, k_cmp, lse, geo, f"seed={seed} {name} G={G} q=0 lse=0", cu=cu, exact=True)


@pytest.mark.parametrize("name", ["l8d4s16n4", "l12d4s4n5_i2l0"])
def test_real_ties(name, seed):
    """k_cmp = 0 with the true lse: p = 1/#visible, equal in exact arithmetic; fp32 rounding may break such ties
    either way, so differing rows must be near ties."""
    geo = GEOMETRIES[name]
    q, k_cmp, _ = _inputs(1, 150, 8, 2, 16, geo)
    k_cmp = torch.zeros_like(k_cmp)
    _, lse = R.compressed_attention(q, k_cmp, k_cmp, geo[0], geo[1])
    got, ref = _compare(q, k_cmp, lse, geo, f"seed={seed} {name} k_cmp=0", max_near_ties=1.0)
    assert (got >= 0).sum() == (ref >= 0).sum(), f"seed={seed}"


def test_queries_without_compressed_blocks(seed):
    """T < block_len (no compressed block at all, lse = -inf everywhere) and the early queries of a longer
    sequence: only the forced / candidate rules decide, exactly as in the reference."""
    geo = GEOMETRIES["l16d8s8n3_i0l1"]
    q, k_cmp, lse = _inputs(2, 15, 4, 2, 16, geo)
    assert k_cmp.shape[1] == 0 and torch.isneginf(lse).all()
    _compare(q, k_cmp, lse, geo, f"seed={seed} T=15", exact=True)
    q, k_cmp, lse = _inputs(1, 60, 4, 2, 16, geo)
    got, ref = _compare(q, k_cmp, lse, geo, f"seed={seed} T=60")
    early = torch.isneginf(lse[0, :, 0])
    assert early.sum() == geo[0] - 1 and torch.equal(got[:, early], ref[:, early]), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype, seed):
    """Half inputs (fp32 accumulation, as the reference computes on the upcast values) and fp64 (scored in fp32)."""
    geo = GEOMETRIES["l8d4s16n4"]
    q, k_cmp, lse = _inputs(1, 120, 8, 2, 32, geo, dtype=dtype)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _compare(q, k_cmp, lse, geo, f"seed={seed} {dtype}")


def test_split_passes_and_key_tiles(seed, monkeypatch):
    """Tiny tile budgets force the paths large shapes take on the GPU: the group's heads in several passes
    (PASSES > 1) and a chunk's compressed rows in several key tiles (KSPLIT > 1)."""
    monkeypatch.setattr(sel, "QUERY_TILE_BYTES", 2048)
    monkeypatch.setattr(sel, "KEY_TILE_BYTES", 1024)
    geo = GEOMETRIES["l8d4s16n4"]
    cfg = sel.selection_config(16, 32, *geo[:4], elem_bytes=4)
    assert cfg["PASSES"] > 1 and cfg["KSPLIT"] > 1, cfg
    cu = torch.tensor([0, 7, 130], dtype=torch.int32)
    q, k_cmp, lse = _inputs(1, 130, 16, 1, 32, geo, cu=cu)
    _compare(q, k_cmp, lse, geo, f"seed={seed} split", cu=cu)


def test_non_contiguous_inputs(seed):
    geo = GEOMETRIES["l16d8s8n3_i0l1"]
    q, k_cmp, lse = _inputs(2, 100, 8, 2, 16, geo)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_nc = k_cmp.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    lse_nc = lse.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous() and not lse_nc.is_contiguous()
    got = _run(sel.select_blocks, q_nc, k_nc, lse_nc, geo)
    assert torch.equal(got, _run(sel.select_blocks, q, k_cmp, lse, geo)), f"seed={seed}"


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the type and message are compared
        return type(exc), str(exc)
    return None


def test_validation_errors_match_reference():
    q, k_cmp, lse = _inputs(1, 40, 4, 2, 16, GEOMETRIES["l8d4s16n4"])
    cases = [
        (q, k_cmp, lse[:, :-1], 8, 4, 16, 4),  # lse shape
        (q, k_cmp, "lse", 8, 4, 16, 4),  # lse type
        (q, k_cmp[:, :-1], lse, 8, 4, 16, 4),  # wrong number of compressed blocks
        (q, k_cmp, lse, 8, 3, 16, 4),  # l % d
        (q, k_cmp, lse, 8, 4, 18, 4),  # l' % d
        (q, k_cmp, lse, 8, 4, 16, 2),  # init + local > top_n
        (q, k_cmp.double(), lse, 8, 4, 16, 4),  # dtype mismatch
    ]
    for args in cases:
        want = _error(R.select_blocks, *args)
        assert want is not None
        assert _error(sel.select_blocks, *args) == want, want
    cu = torch.tensor([0, 20, 41], dtype=torch.int32)  # does not end at T
    assert _error(sel.select_blocks, q, k_cmp, lse, 8, 4, 16, 4, cu_seqlens=cu) == _error(
        R.select_blocks, q, k_cmp, lse, 8, 4, 16, 4, cu_seqlens=cu)


def test_empty_sequence():
    q = torch.zeros(1, 0, 4, 16)
    out = sel.select_blocks(q, torch.zeros(1, 0, 2, 16), torch.zeros(1, 0, 4), 8, 4, 16, 4)
    assert out.shape == (1, 0, 2, 4) and out.dtype == torch.int32


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
def _gpu_inputs(T, HQ, H, Dk, geo, cu=None):
    l, d = geo[0], geo[1]
    nc = total_compressed_blocks(T, l, d, cu)
    q = torch.randn(1, T, HQ, Dk, device="cuda").bfloat16()
    k_cmp = torch.randn(1, nc, H, Dk, device="cuda").bfloat16()
    v_cmp = torch.randn(1, nc, H, 64, device="cuda").bfloat16()
    # reference on the upcast inputs, fp32
    _, lse = R.compressed_attention(q.float(), k_cmp.float(), v_cmp.float(), l, d, cu_seqlens=cu)
    return q, k_cmp, lse


@pytest.mark.gpu
@pytest.mark.parametrize("T,packed", [(4096, False), (32768, False), (32768, True)])
def test_gpu_matches_reference_bf16(T, packed, seed):
    """bf16 q / k_cmp with fp32 lse at the paper geometry, HQ = 64, H = 4 (G = 16), Dk = 128: the reference
    runs on the same values upcast to fp32; rows may differ only by near ties (at most 0.1 % of them)."""
    geo = GEOMETRIES["paper"]
    cu = torch.tensor([0, 1, 700, 9000, 9001, T], dtype=torch.int32, device="cuda") if packed else None
    q, k_cmp, lse = _gpu_inputs(T, 64, 4, 128, geo, cu)
    got = _run(sel.select_blocks, q, k_cmp, lse, geo, cu=cu)
    ref = _run(R.select_blocks, q.float(), k_cmp.float(), lse, geo, cu=cu)
    _assert_selection(got, ref, q, k_cmp, lse, geo, None, cu, f"seed={seed} T={T} packed={packed}",
                      max_near_ties=1e-3)


@pytest.mark.gpu
def test_gpu_one_million_tokens(seed):
    """T = 2**20 with HQ * Dk = 4096: q offsets pass 2**31 elements (int64 indexing). Forward smoke test: a sample
    of rows, including the last tokens, must be correct top-n selections (up to near ties)."""
    geo = GEOMETRIES["paper"]
    T, HQ, H, Dk = 1 << 20, 32, 2, 128
    l, d = geo[0], geo[1]
    nc = total_compressed_blocks(T, l, d)
    q = (torch.randn(1, T, HQ, Dk, device="cuda") * 0.5).bfloat16()
    k_cmp = torch.randn(1, nc, H, Dk, device="cuda").bfloat16()
    # a plausible lse without running compressed attention at 1M tokens: log(#visible blocks), -inf if none
    visible = torch.clamp(torch.div(torch.arange(T, device="cuda") - l + 1, d, rounding_mode="floor") + 1, min=0)
    lse = torch.log(visible.float())[None, :, None].expand(1, T, HQ).contiguous()
    assert q.numel() > 2 ** 31
    got = _run(sel.select_blocks, q, k_cmp, lse, geo)
    torch.cuda.synchronize()
    assert got.shape == (1, T, H, geo[3]) and bool((got >= -1).all()), f"seed={seed}"
    tokens = [0, 30, 31, 1000, 123457, T // 2 + 5, T - 2, T - 1]
    for t in tokens:
        scores, pos = _token_scores64(q, k_cmp, lse, geo, None, None, 0, t)
        for h in range(H):
            err = _check_row(got[0, t, h].tolist(), scores[h], pos, geo)
            assert err is None, f"t={t} h={h}: {err} [seed={seed}]"
