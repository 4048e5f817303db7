"""Triton ``gate_combine`` against the reference: output and the gradients of the gates and every branch
output, with and without the window branch, row counts that are not multiples of the kernel's row block,
a head dim that is not a power of two, fp32 and fp16 (CPU interpreter; the compiled kernels on a GPU)."""
import pytest
import torch

from nsa_kernels import reference as R
from nsa_kernels.triton.gate_combine import gate_combine


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
