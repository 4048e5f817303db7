"""Triton ``window_attention`` (WINDOW mode of the range-attention kernels) against the reference.

CPU: the Triton interpreter on small shapes (T <= 130), fp32 inputs, tolerance atol = rtol = 1e-4 on the
output and on dq/dk/dv (the kernels accumulate in fp32 in another order than the reference; observed errors
are ~1e-6). Packed documents include a 1-token document and documents shorter than a query tile; windows
span w = 1, smaller and larger than BLOCK_T and than the documents. A second set forces tiny tiles
(``CONFIG_OVERRIDE``) so interior (unmasked) key tiles, many query tiles and split GQA groups run too.
bf16 cannot run on the interpreter (its bf16 ``tl.dot`` is wrong), fp16 can; bf16 runs in the GPU tests.

GPU (``-m gpu``): bf16 at T up to 32k against the fp32 reference (relative error <= 1e-2, forward and
backward), fp32 (tf32x3 dots, relative error <= 1e-4), and T = 1M tokens forward (int64 offsets).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import oracle as O

from nsa_kernels import reference as R
from nsa_kernels.triton import range_attention as RA
from nsa_kernels.triton.window_attention import window_attention
from tests.helpers.small_tiles import use_small_range_tiles

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: Triton kernels under the CPU interpreter

DOCS = [37, 1, 5, 64, 23]  # T = 130: a 1-token document and one shorter than every query tile
TOL = dict(atol=1e-4, rtol=1e-4)


def _inputs(B, T, H, G, dk, dv, dtype=torch.float32, device=None):
    q = torch.randn(B, T, H * G, dk, dtype=dtype, device=device)
    k = torch.randn(B, T, H, dk, dtype=dtype, device=device)
    v = torch.randn(B, T, H, dv, dtype=dtype, device=device)
    return q, k, v


def _run(fn, q, k, v, do, *args, **kwargs):
    """``o`` and ``(dq, dk, dv)`` of ``fn`` for the output gradient ``do``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, *args, **kwargs)
    return o.detach(), torch.autograd.grad(o, (q, k, v), do)


def _compare(q, k, v, window, seed, cu=None, scale=None):
    do = torch.randn(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    o, grads = _run(window_attention, q, k, v, do, window, scale=scale, cu_seqlens=cu)
    ro, rgrads = _run(R.window_attention, q, k, v, do, window, scale=scale, cu_seqlens=cu)
    assert o.dtype == q.dtype and o.shape == ro.shape
    torch.testing.assert_close(o, ro, **TOL, msg=lambda m: f"o [seed={seed}, w={window}]: {m}")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m: f"{name} [seed={seed}, w={window}]: {m}")


@pytest.fixture
def small_tiles(monkeypatch):
    use_small_range_tiles(monkeypatch)


@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("window", [1, 6, 40, 1000])
def test_packed_matches_reference(G, window, seed):
    cu = O.cu_seqlens_of(DOCS)
    q, k, v = _inputs(1, sum(DOCS), 2 if G < 16 else 1, G, 32, 16)
    _compare(q, k, v, window, seed, cu=cu)


@pytest.mark.parametrize("G,window", [(4, 1), (4, 19), (16, 7), (1, 64)])
def test_small_tiles_match_reference(G, window, seed, small_tiles):
    """8-row tiles and 16-key tiles: interior unmasked key tiles, G = 16 split into two head chunks."""
    docs = [3, 41, 0, 1, 20] if G == 16 else DOCS  # with an empty document
    cu = O.cu_seqlens_of(docs)
    q, k, v = _inputs(1, sum(docs), 1, G, 16, 32)
    _compare(q, k, v, window, seed, cu=cu)


@pytest.mark.parametrize("G,window", [(16, 6), (16, 1000), (4, 100)])
def test_half_precision_tiling_matches_reference(G, window, seed, monkeypatch):
    """fp32 inputs through the tiling the GPU uses for bf16/fp16 (128-row tiles, G = 16 -> 8 tokens)."""
    geom = RA.RangeGeometry(RA.WINDOW, window=window)
    monkeypatch.setattr(RA, "CONFIG_OVERRIDE", RA.pick_config(geom, 32, 16, torch.bfloat16)._asdict())
    cu = O.cu_seqlens_of(DOCS)
    q, k, v = _inputs(1, sum(DOCS), 1, G, 32, 16)
    _compare(q, k, v, window, seed, cu=cu)


def test_batch_noncontiguous_odd_dims(seed):
    """B = 2 without cu_seqlens, G = 3 (padded group), Dk = 24, Dv = 40, strided q/k/v, custom scale."""
    B, T, H, G = 2, 75, 2, 3
    q = torch.randn(B, H * G, T, 24).transpose(1, 2)          # non-contiguous head/token strides
    k = torch.randn(B, T, H, 48)[..., ::2]                   # last dim strided: copied by the op
    v = torch.randn(T, B, H, 40).transpose(0, 1)
    _compare(q, k, v, 17, seed, scale=0.3)


def test_fp16(seed):
    q, k, v = _inputs(1, 70, 2, 4, 32, 32, dtype=torch.float16)
    cu = O.cu_seqlens_of([30, 1, 39])
    o = window_attention(q, k, v, 9, cu_seqlens=cu)
    ro = R.window_attention(q.float(), k.float(), v.float(), 9, cu_seqlens=cu)
    assert o.dtype == torch.float16
    assert (o.float() - ro).norm() / ro.norm() < 2e-3, f"seed={seed}"


def test_empty_sequence():
    q, k, v = (x.requires_grad_() for x in _inputs(1, 0, 2, 2, 16, 16))
    o = window_attention(q, k, v, 4)
    assert o.shape == (1, 0, 4, 16)
    o.sum().backward()
    assert k.grad.shape == k.shape


@pytest.mark.parametrize("bad", ["window0", "window_bool", "length", "groups", "cu_dtype"])
def test_errors_match_reference(bad):
    q, k, v = _inputs(1, 10, 2, 2, 16, 16)
    args = dict(window=3, cu_seqlens=None)
    if bad == "window0":
        args["window"] = 0
    elif bad == "window_bool":
        args["window"] = True
    elif bad == "length":
        k = k[:, :9]
    elif bad == "groups":
        q = q[:, :, :3]
    else:
        args["cu_seqlens"] = torch.tensor([0, 10])
    errors = []
    for fn in (window_attention, R.window_attention):
        with pytest.raises((ValueError, TypeError)) as info:
            fn(q, k, v, args["window"], cu_seqlens=args["cu_seqlens"])
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]


def test_float64_runs_in_fp32(seed):
    """fp64 inputs (which the reference takes) run through the fp32 kernels and come back as fp64."""
    q, k, v = _inputs(1, 40, 2, 2, 16, 8, dtype=torch.float64)
    o = window_attention(q, k, v, 9)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, R.window_attention(q, k, v, 9), rtol=1e-4, atol=1e-4, msg=lambda m: f"seed={seed}: {m}")


# ---------------------------------------------------------------------------------------------------------- GPU

def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("T,docs", [(4096, None), (32768, None), (32768, [1, 777, 5000, 31, 26959])])
def test_gpu_bf16_matches_fp32_reference(T, docs, seed):
    dev = "cuda"
    H, G, D, w = 2, 8, 128, 512
    cu = O.cu_seqlens_of(docs).to(dev) if docs else None
    q, k, v = _inputs(1, T, H, G, D, D, dtype=torch.bfloat16, device=dev)
    do = torch.randn(1, T, H * G, D, dtype=torch.bfloat16, device=dev)
    o, grads = _run(window_attention, q, k, v, do, w, cu_seqlens=cu)
    ro, rgrads = _run(R.window_attention, q.float(), k.float(), v.float(), do.float(), w, cu_seqlens=cu)
    assert o.dtype == torch.bfloat16
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), f"{name} [seed={seed}]"
        assert _rel(a, b) < 1e-2, f"{name}: rel err {_rel(a, b):.2e} [seed={seed}, T={T}]"


@pytest.mark.gpu
@pytest.mark.parametrize("G,dk,dv", [(16, 128, 128), (1, 64, 64), (4, 192, 128), (3, 256, 64)])
def test_gpu_fp32_matches_reference(G, dk, dv, seed):
    dev = "cuda"
    cu = O.cu_seqlens_of([1, 300, 1747]).to(dev)
    q, k, v = _inputs(1, 2048, 2, G, dk, dv, device=dev)
    do = torch.randn(1, 2048, 2 * G, dv, device=dev)
    o, grads = _run(window_attention, q, k, v, do, 512, cu_seqlens=cu)
    ro, rgrads = _run(R.window_attention, q, k, v, do, 512, cu_seqlens=cu)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
        assert _rel(a, b) < 1e-4, f"{name}: rel err {_rel(a, b):.2e} [seed={seed}]"


@pytest.mark.gpu
def test_gpu_million_tokens_forward(seed):
    """T = 2**20 with HQ * Dv = 4096: q/o hold 2**32 elements, so 32-bit offsets would wrap."""
    dev = "cuda"
    T, H, G, D, w, tail = 1 << 20, 2, 16, 128, 512, 2048
    q, k, v = _inputs(1, T, H, G, D, D, dtype=torch.bfloat16, device=dev)
    with torch.no_grad():
        o = window_attention(q, k, v, w)
        assert torch.isfinite(o).all(), f"seed={seed}"
        s = T - tail - w  # the last `tail` queries only see keys from s on
        ro = R.window_attention(q[:, s:].float(), k[:, s:].float(), v[:, s:].float(), w)
        assert _rel(o[:, -tail:], ro[:, -tail:]) < 1e-2, f"seed={seed}"
        ro = R.window_attention(q[:, :tail].float(), k[:, :tail].float(), v[:, :tail].float(), w)
        assert _rel(o[:, :tail], ro) < 1e-2, f"seed={seed}"
