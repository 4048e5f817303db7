"""Input validation of the public ops, identical in both backends (reference, and Triton through the
interpreter on the CPU or compiled on a GPU): ``gate_combine`` shapes/dtypes/devices, the ``scale`` of every
op taking one, and the reference ``gate_combine``'s fp32 accumulation of half-precision branch outputs."""
import re

import pytest
import torch

import nsa_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

GEO = dict(block_len=16, stride=8, select_len=16, top_n=3, init_blocks=1, local_blocks=2)
WINDOW = 20


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Run the public ops (``nsa_kernels.<op>``) on one backend; Triton is skipped where it is not installed."""
    if request.param == "triton":
        pytest.importorskip("triton")
    with nsa_kernels.use_backend(request.param):
        yield request.param


def _branches(B=2, T=37, HQ=3, Dv=24, dtype=torch.float32):
    """Fresh random ``gates [B, T, HQ, 3]`` and three branch outputs ``[B, T, HQ, Dv]`` (T, Dv not aligned to
    the kernel's row block or a power of two)."""
    return torch.rand(B, T, HQ, 3, dtype=dtype), [torch.randn(B, T, HQ, Dv, dtype=dtype) for _ in range(3)]


def _shape_cases():
    """(name, edit(gates, outs) -> call arguments, error type, message regex) for bad gate_combine inputs."""
    def with_(i, x):
        return lambda g, o: (g, *[x(t) if j == i else t for j, t in enumerate(o)])

    shape = r"\(2, 37, 3, 24\)"
    return [
        ("o_slc shorter", with_(1, lambda t: t[:, :30]), ValueError,
         rf"o_slc has shape \(2, 30, 3, 24\): expected o_cmp's shape {shape}"),
        ("o_win shorter", with_(2, lambda t: t[:, :36]), ValueError,
         rf"o_win has shape \(2, 36, 3, 24\): expected o_cmp's shape {shape}"),
        ("o_slc broadcastable", with_(1, lambda t: t[:, :1]), ValueError,
         rf"o_slc has shape \(2, 1, 3, 24\): expected o_cmp's shape {shape}"),
        ("o_win other Dv", with_(2, lambda t: t[..., :16]), ValueError,
         rf"o_win has shape \(2, 37, 3, 16\): expected o_cmp's shape {shape}"),
        ("o_slc 3-D", with_(1, lambda t: t[0]), ValueError,
         r"o_slc must be \[B, T, HQ, Dv\], got shape \(37, 3, 24\)"),
        ("o_cmp 3-D", with_(0, lambda t: t[0]), ValueError,
         r"o_cmp must be \[B, T, HQ, Dv\], got shape \(37, 3, 24\)"),
        ("o_slc not a tensor", with_(1, lambda t: t.tolist()), TypeError,
         r"o_slc must be a torch.Tensor, got list"),
        ("o_slc dtype", with_(1, lambda t: t.double()), TypeError,
         r"o_slc.dtype torch.float64 differs from o_cmp.dtype torch.float32"),
        ("o_win device", with_(2, lambda t: t.to("meta")), ValueError, r"o_win is on meta but o_cmp is on "),
        ("o_cmp integer", lambda g, o: (g, *[t.long() for t in o]), TypeError,
         r"o_cmp must be a floating tensor \(fp16, bf16, fp32, fp64\), got torch.int64"),
        ("gates 2 branches", lambda g, o: (g[..., :2], *o), ValueError,
         r"gates has shape \(2, 37, 3, 2\): expected \[B, T, HQ, 3\] = \[2, 37, 3, 3\]"),
        ("gates other T", lambda g, o: (g[:, :36], *o), ValueError,
         r"gates has shape \(2, 36, 3, 3\): expected \[B, T, HQ, 3\] = \[2, 37, 3, 3\]"),
        ("gates 3-D", lambda g, o: (g[..., 0], *o), ValueError,
         r"gates must be \[B, T, HQ, 3\], got shape \(2, 37, 3\)"),
        ("gates integer", lambda g, o: (g.long(), *o), TypeError,
         r"gates must be a floating tensor \(fp16, bf16, fp32, fp64\), got torch.int64"),
        ("gates device", lambda g, o: (g.to("meta"), *o), ValueError, r"gates is on meta but o_cmp is on "),
    ]


@pytest.mark.parametrize("name,edit,error,message", _shape_cases(), ids=[c[0] for c in _shape_cases()])
def test_gate_combine_rejects_mismatched_inputs(backend, name, edit, error, message, seed):
    gates, outs = _branches()
    with pytest.raises(error, match=message):
        nsa_kernels.gate_combine(*edit(gates, outs))


def test_gate_combine_without_window_checks_the_rest(backend, seed):
    gates, outs = _branches()
    with pytest.raises(ValueError, match=r"o_slc has shape \(2, 30, 3, 24\): expected o_cmp's shape"):
        nsa_kernels.gate_combine(gates, outs[0], outs[1][:, :30])
    o = nsa_kernels.gate_combine(gates, outs[0], outs[1])
    torch.testing.assert_close(o, gates[..., :1] * outs[0] + gates[..., 1:2] * outs[1], rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"seed={seed}: {m}")


def _op_calls():
    """Each public op taking ``scale``: a function of ``scale`` calling it on small valid inputs (T = 37, packed
    documents of unaligned lengths, G = 2, Dk != Dv)."""
    B, T, HQ, H, Dk, Dv = 1, 37, 4, 2, 16, 8
    cu = torch.tensor([0, 21, T], dtype=torch.int32)
    nc = nsa_kernels.total_compressed_blocks(T, GEO["block_len"], GEO["stride"], cu)
    q = torch.randn(B, T, HQ, Dk)
    k, v = torch.randn(B, T, H, Dk), torch.randn(B, T, H, Dv)
    k_cmp, v_cmp = torch.randn(B, nc, H, Dk), torch.randn(B, nc, H, Dv)
    lse = torch.zeros(B, T, HQ)
    block_idx = torch.zeros(B, T, H, GEO["top_n"], dtype=torch.int32)
    gates = torch.rand(B, T, HQ, 3)
    l, d = GEO["block_len"], GEO["stride"]
    return {
        "compressed_attention": lambda s: nsa_kernels.compressed_attention(q, k_cmp, v_cmp, l, d, s, cu)[0],
        "select_blocks": lambda s: nsa_kernels.select_blocks(q, k_cmp, lse, scale=s, cu_seqlens=cu, **GEO),
        "selected_attention": lambda s: nsa_kernels.selected_attention(q, k, v, block_idx, GEO["select_len"], s, cu),
        "window_attention": lambda s: nsa_kernels.window_attention(q, k, v, WINDOW, scale=s, cu_seqlens=cu),
        "nsa_attention": lambda s: nsa_kernels.nsa_attention(q, k_cmp, v_cmp, k, v, k, v, gates, window=WINDOW,
                                                             scale=s, cu_seqlens=cu, **GEO),
    }


OPS_WITH_SCALE = ["compressed_attention", "select_blocks", "selected_attention", "window_attention",
                  "nsa_attention"]
BAD_SCALES = [(float("nan"), ValueError), (float("inf"), ValueError), (float("-inf"), ValueError),
              (0, ValueError), (0.0, ValueError), (-0.25, ValueError), ("0.25", TypeError), (True, TypeError),
              (torch.tensor(0.25), TypeError)]


def _bad_scale_message(scale) -> str:
    return re.escape(f"scale must be None or a finite positive real number (int or float), got {scale!r}")


@pytest.mark.parametrize("op", OPS_WITH_SCALE)
@pytest.mark.parametrize("scale,error", BAD_SCALES, ids=[repr(s) for s, _ in BAD_SCALES])
def test_ops_reject_bad_scale(backend, op, scale, error, seed):
    call = _op_calls()[op]
    with pytest.raises(error, match=_bad_scale_message(scale)):
        call(scale)


@pytest.mark.parametrize("scale,error", BAD_SCALES[:1] + BAD_SCALES[-1:], ids=["nan", "tensor"])
def test_empty_nsa_rejects_bad_scale(backend, scale, error, seed):
    """T = 0 (nothing to attend) still checks the scale."""
    B, HQ, H, D = 1, 4, 2, 16
    q, k, gates = torch.randn(B, 0, HQ, D), torch.randn(B, 0, H, D), torch.rand(B, 0, HQ, 3)
    with pytest.raises(error, match=_bad_scale_message(scale)):
        nsa_kernels.nsa_attention(q, k, k, k, k, k, k, gates, window=WINDOW, scale=scale, **GEO)


@pytest.mark.parametrize("op", OPS_WITH_SCALE)
def test_ops_accept_int_scale_as_float(backend, op, seed):
    """A positive int is a valid scale and means the same as the float."""
    call = _op_calls()[op]
    torch.testing.assert_close(call(1), call(1.0), rtol=0, atol=0, msg=lambda m: f"{op} seed={seed}: {m}")


def _overflowing_fp16_branches(B=2, T=37, HQ=3, Dv=24):
    """fp16 inputs whose products ``g_c * o_c`` are finite and whose gated sum is finite, but whose partial sum
    ``g_cmp * o_cmp + g_slc * o_slc`` (> 66000) overflows fp16 (max 65504)."""
    def uniform(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(*shape)).half()

    gates = uniform(0.98, 1.0, B, T, HQ, 3)
    o_cmp, o_slc = uniform(34000, 38000, B, T, HQ, Dv), uniform(34000, 38000, B, T, HQ, Dv)
    o_win = uniform(-38000, -34000, B, T, HQ, Dv)
    return gates, [o_cmp, o_slc, o_win]


def test_reference_gate_combine_accumulates_half_in_fp32(seed):
    gates, outs = _overflowing_fp16_branches()
    g = gates.float()
    want = (g[..., 0:1] * outs[0].float() + g[..., 1:2] * outs[1].float() + g[..., 2:3] * outs[2].float()).half()
    assert torch.isfinite(want).all()
    got = nsa_kernels.reference.gate_combine(gates, *outs)
    assert got.dtype == torch.float16
    assert torch.isfinite(got).all(), f"fp16 sum overflowed [seed={seed}]"
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"seed={seed}: {m}")


def test_half_gate_combine_backends_agree(backend, seed):
    gates, outs = _overflowing_fp16_branches()
    want = nsa_kernels.reference.gate_combine(gates.double(), *[o.double() for o in outs]).half()
    got = nsa_kernels.gate_combine(gates, *outs)
    assert got.dtype == torch.float16 and torch.isfinite(got).all(), f"{backend} seed={seed}"
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0, msg=lambda m: f"{backend} seed={seed}: {m}")
