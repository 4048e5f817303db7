"""Triton ``compressed_attention`` (COMPRESSED mode of the range-attention kernels) against the reference.

CPU: the Triton interpreter on small shapes (T <= 150), fp32 inputs, tolerance atol = rtol = 1e-4 on o,
on the finite entries of lse and on dq/dk_cmp/dv_cmp; the -inf entries of lse (queries that see no block)
must sit exactly where the reference has them, with o exactly 0 there and no NaN anywhere. Geometries
(l, d) in {(32, 16), (16, 8), (8, 8)}, packed documents shorter than l, a 1-token document, G in {1, 4, 16},
Dk != Dv; a second set forces tiny tiles (``CONFIG_OVERRIDE``) so interior (unmasked) key tiles, many
query/key tiles and split GQA groups run too. bf16 cannot run on the interpreter (its bf16 ``tl.dot`` is
wrong), fp16 can; bf16 runs in the GPU tests.

GPU (``-m gpu``): bf16 at T up to 32k against the fp32 reference (relative error <= 1e-2, forward and
backward), fp32 (tf32x3 dots, relative error <= 1e-4), and T = 1M tokens forward (int64 offsets).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import oracle as O

from nsa_kernels import reference as R
from nsa_kernels.layout import total_compressed_blocks
from nsa_kernels.triton import range_attention as RA
from nsa_kernels.triton.compressed_attention import compressed_attention
from tests.helpers.small_tiles import use_small_range_tiles

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: Triton kernels under the CPU interpreter

DOCS = [45, 1, 20, 7, 77]  # T = 150: documents shorter than l (no block), a 1-token document
GEOMETRIES = [(32, 16), (16, 8), (8, 8)]
TOL = dict(atol=1e-4, rtol=1e-4)


def _inputs(B, T, H, G, dk, dv, block_len, stride, cu=None, dtype=torch.float32, device=None):
    nc = total_compressed_blocks(T, block_len, stride, cu)
    q = torch.randn(B, T, H * G, dk, dtype=dtype, device=device)
    k = torch.randn(B, nc, H, dk, dtype=dtype, device=device)
    v = torch.randn(B, nc, H, dv, dtype=dtype, device=device)
    return q, k, v


def _run(fn, q, k, v, do, *args, **kwargs):
    """``o``, ``lse`` and ``(dq, dk, dv)`` of ``fn`` for the output gradient ``do``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = fn(q, k, v, *args, **kwargs)
    assert not lse.requires_grad
    return o.detach(), lse, torch.autograd.grad(o, (q, k, v), do)


def _check_lse(lse, ref, msg):
    assert lse.dtype == torch.float32 and lse.shape == ref.shape, msg
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), f"-inf positions differ {msg}"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any(), msg
    finite = torch.isfinite(ref)
    torch.testing.assert_close(lse[finite], ref[finite], **TOL, msg=lambda m: f"lse {msg}: {m}")


def _compare(q, k, v, block_len, stride, seed, cu=None, scale=None):
    msg = f"[seed={seed}, l={block_len}, d={stride}]"
    do = torch.randn(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    o, lse, grads = _run(compressed_attention, q, k, v, do, block_len, stride, scale=scale, cu_seqlens=cu)
    ro, rlse, rgrads = _run(R.compressed_attention, q, k, v, do, block_len, stride, scale=scale, cu_seqlens=cu)
    assert o.dtype == q.dtype and o.shape == ro.shape, msg
    torch.testing.assert_close(o, ro, **TOL, msg=lambda m: f"o {msg}: {m}")
    _check_lse(lse, rlse, msg)
    assert torch.all(o[torch.isneginf(lse)] == 0), f"queries that see nothing must give o = 0 {msg}"
    for name, g, rg in zip(("dq", "dk_cmp", "dv_cmp"), grads, rgrads):
        assert not torch.isnan(g).any(), f"{name} has NaN {msg}"
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m: f"{name} {msg}: {m}")
    return lse


@pytest.fixture
def small_tiles(monkeypatch):
    use_small_range_tiles(monkeypatch)


@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("block_len,stride", GEOMETRIES)
def test_packed_matches_reference(G, block_len, stride, seed):
    cu = O.cu_seqlens_of(DOCS)
    q, k, v = _inputs(1, sum(DOCS), 2 if G < 16 else 1, G, 32, 16, block_len, stride, cu)
    lse = _compare(q, k, v, block_len, stride, seed, cu=cu)
    assert torch.isneginf(lse).any() and torch.isfinite(lse).any()


@pytest.mark.parametrize("G,block_len,stride", [(4, 8, 8), (4, 16, 8), (16, 32, 16), (1, 8, 8)])
def test_small_tiles_match_reference(G, block_len, stride, seed, small_tiles):
    """8-row tiles and 16-key tiles: interior unmasked key/query tiles, G = 16 split into two head chunks."""
    docs = [130, 1, 0, 12] if G != 16 else [70, 1]  # with an empty document
    cu = O.cu_seqlens_of(docs)
    q, k, v = _inputs(1, sum(docs), 1, G, 16, 32, block_len, stride, cu)
    _compare(q, k, v, block_len, stride, seed, cu=cu)


@pytest.mark.parametrize("G,block_len,stride", [(16, 32, 16), (4, 8, 8)])
def test_half_precision_tiling_matches_reference(G, block_len, stride, seed, monkeypatch):
    """fp32 inputs through the tiling the GPU uses for bf16/fp16 (128-row tiles, G = 16 -> 8 tokens)."""
    geom = RA.RangeGeometry(RA.COMPRESSED, block_len=block_len, stride=stride)
    monkeypatch.setattr(RA, "CONFIG_OVERRIDE", RA.pick_config(geom, 32, 16, torch.bfloat16)._asdict())
    cu = O.cu_seqlens_of(DOCS)
    q, k, v = _inputs(1, sum(DOCS), 1, G, 32, 16, block_len, stride, cu)
    _compare(q, k, v, block_len, stride, seed, cu=cu)


def test_batch_noncontiguous_odd_dims(seed):
    """B = 2 without cu_seqlens, G = 3 (padded group), Dk = 24, Dv = 40, strided inputs, custom scale."""
    B, T, H, G, l, d = 2, 75, 2, 3, 16, 8
    nc = total_compressed_blocks(T, l, d)
    q = torch.randn(B, H * G, T, 24).transpose(1, 2)
    k = torch.randn(B, nc, H, 48)[..., ::2]
    v = torch.randn(nc, B, H, 40).transpose(0, 1)
    _compare(q, k, v, l, d, seed, scale=0.3)


def test_no_blocks_at_all(seed):
    """Every document shorter than l: Nc = 0, o = 0, lse = -inf, zero dq, empty dk/dv."""
    q, k, v = _inputs(2, 20, 2, 2, 16, 16, 32, 16)
    assert k.shape[1] == 0
    _compare(q, k, v, 32, 16, seed)


def test_fp16(seed):
    cu = O.cu_seqlens_of([30, 1, 69])
    q, k, v = _inputs(1, 100, 2, 4, 32, 32, 16, 8, cu, dtype=torch.float16)
    o, lse = compressed_attention(q, k, v, 16, 8, cu_seqlens=cu)
    ro, rlse = R.compressed_attention(q.float(), k.float(), v.float(), 16, 8, cu_seqlens=cu)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32
    assert (o.float() - ro).norm() / ro.norm() < 2e-3, f"seed={seed}"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), f"seed={seed}"


@pytest.mark.parametrize("bad", ["geometry", "stride0", "rows", "cu_end"])
def test_errors_match_reference(bad):
    cu = O.cu_seqlens_of([40, 24])
    q, k, v = _inputs(1, 64, 2, 2, 16, 16, 16, 8, cu)
    l, d = 16, 8
    if bad == "geometry":
        l = 12
    elif bad == "stride0":
        d = 0
    elif bad == "rows":
        k, v = k[:, 1:], v[:, 1:]
    else:
        cu = O.cu_seqlens_of([40, 23])
    errors = []
    for fn in (compressed_attention, R.compressed_attention):
        with pytest.raises((ValueError, TypeError)) as info:
            fn(q, k, v, l, d, cu_seqlens=cu)
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]


# ---------------------------------------------------------------------------------------------------------- GPU

def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _gpu_compare(T, H, G, dk, dv, docs, dtype, tol, seed, l=32, d=16):
    dev = "cuda"
    cu = O.cu_seqlens_of(docs).to(dev) if docs else None
    q, k, v = _inputs(1, T, H, G, dk, dv, l, d, cu, dtype=dtype, device=dev)
    do = torch.randn(1, T, H * G, dv, dtype=dtype, device=dev)
    o, lse, grads = _run(compressed_attention, q, k, v, do, l, d, cu_seqlens=cu)
    ro, rlse, rgrads = _run(R.compressed_attention, q.float(), k.float(), v.float(), do.float(), l, d, cu_seqlens=cu)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), f"seed={seed}"
    finite = torch.isfinite(rlse)
    assert (lse[finite] - rlse[finite]).abs().max() < max(tol, 1e-5) * 10, f"lse [seed={seed}]"
    for name, a, b in zip(("o", "dq", "dk_cmp", "dv_cmp"), (o, *grads), (ro, *rgrads)):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name} [seed={seed}]"
        assert _rel(a, b) < tol, f"{name}: rel err {_rel(a, b):.2e} [seed={seed}, T={T}]"


@pytest.mark.gpu
@pytest.mark.parametrize("T,docs", [(4096, None), (32768, None), (32768, [1, 31, 777, 5000, 26959])])
def test_gpu_bf16_matches_fp32_reference(T, docs, seed):
    _gpu_compare(T, 2, 8, 128, 128, docs, torch.bfloat16, 1e-2, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("G,dk,dv", [(16, 128, 128), (1, 64, 64), (4, 192, 128), (3, 256, 64)])
def test_gpu_fp32_matches_reference(G, dk, dv, seed):
    _gpu_compare(4096, 2, G, dk, dv, [1, 300, 3795], torch.float32, 1e-4, seed)


@pytest.mark.gpu
def test_gpu_million_tokens_forward(seed):
    """T = 2**20 with HQ * Dv = 4096 (q/o hold 2**32 elements): the last, 4096-token document is compared."""
    dev = "cuda"
    T, H, G, D, l, d, last = 1 << 20, 2, 16, 128, 32, 16, 4096
    cu = O.cu_seqlens_of([T - last, last]).to(dev)
    q, k, v = _inputs(1, T, H, G, D, D, l, d, cu, dtype=torch.bfloat16, device=dev)
    with torch.no_grad():
        o, lse = compressed_attention(q, k, v, l, d, cu_seqlens=cu)
        assert torch.isfinite(o).all() and not torch.isnan(lse).any(), f"seed={seed}"
        nc_last = total_compressed_blocks(last, l, d)
        ro, rlse = R.compressed_attention(q[:, -last:].float(), k[:, -nc_last:].float(), v[:, -nc_last:].float(), l, d)
        assert _rel(o[:, -last:], ro) < 1e-2, f"seed={seed}"
        assert torch.equal(torch.isneginf(lse[:, -last:]), torch.isneginf(rlse)), f"seed={seed}"
