"""Triton ``gate_combine`` against the reference: output and the gradients of the gates and every branch
output, with and without the window branch, row counts that are not multiples of the kernel's row block,
a head dim that is not a power of two, fp32 and fp16 (CPU interpreter; the compiled kernels on a GPU)."""
import pytest
import torch

from nsa_kernels import reference as R
from nsa_kernels.triton.delta import attention_delta
from nsa_kernels.triton.gate_combine import combine_backward, gate_combine

pytestmark = pytest.mark.slow  # Triton kernels under the CPU interpreter


def _run(fn, gates, outs, do):
    leaves = [t.detach().clone().requires_grad_() for t in (gates, *outs)]
    o = fn(leaves[0], *leaves[1:3], leaves[3] if len(leaves) > 3 else None)
    o.backward(do)
    return o, [t.grad for t in leaves]


@pytest.mark.parametrize("with_window", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,T,HQ,Dv", [(1, 37, 3, 24), (2, 5, 4, 64)])
def test_matches_reference(with_window, dtype, tol, B, T, HQ, Dv, seed):
    gates = torch.rand(B, T, HQ, 3, dtype=dtype)
    outs = [torch.randn(B, T, HQ, Dv, dtype=dtype) for _ in range(3 if with_window else 2)]
    do = torch.randn(B, T, HQ, Dv, dtype=dtype)
    o, grads = _run(gate_combine, gates, outs, do)
    ro, rgrads = _run(R.gate_combine, gates.double(), [x.double() for x in outs], do.double())
    assert o.dtype == dtype and o.shape == ro.shape
    torch.testing.assert_close(o.double(), ro, atol=tol, rtol=tol, msg=lambda m: f"o [seed={seed}]: {m}")
    for name, g, rg in zip(("dgates", "do_cmp", "do_slc", "do_win"), grads, rgrads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), rg, atol=tol * Dv ** 0.5, rtol=tol,
                                   msg=lambda m: f"{name} [seed={seed}]: {m}")
    if not with_window:
        assert torch.all(grads[0][..., 2] == 0), "the absent window branch's gate must get a zero gradient"


@pytest.mark.parametrize("with_window", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_deltas_match_attention_delta(with_window, dtype, seed):
    """The fused NSA backward's ``delta_c`` equals ``attention_delta(o_c, dO_c)`` of the stored ``dO_c``, and asking
    for the deltas changes neither ``dO_c`` nor the gate gradient."""
    B, T, HQ, Dv = 2, 21, 3, 40
    gates = torch.rand(B, T, HQ, 3, dtype=dtype)
    outs = [torch.randn(B, T, HQ, Dv, dtype=dtype) for _ in range(3)]
    o_win = outs[2] if with_window else None
    do = torch.randn(B, T, HQ, Dv, dtype=dtype)
    dg, d_outs, delta = combine_backward(gates, outs[0], outs[1], o_win, do, with_delta=True)
    dg0, d_outs0, none = combine_backward(gates, outs[0], outs[1], o_win, do)
    assert none is None and delta.shape == (3, B, T, HQ) and delta.dtype == torch.float32
    assert torch.equal(dg, dg0), f"seed={seed}"
    for c in range(3 if with_window else 2):
        assert torch.equal(d_outs[c], d_outs0[c]), f"branch {c} seed={seed}"
        torch.testing.assert_close(delta[c], attention_delta(outs[c], d_outs[c]), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"delta[{c}] seed={seed}: {m}")
    assert (d_outs[2] is None) == (not with_window)
