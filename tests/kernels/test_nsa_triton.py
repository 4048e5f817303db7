"""Triton NSA (all branches and gates) and the NativeSparseAttention module on the Triton backend,
against the reference: outputs and every gradient."""
import pytest
import torch

import nsa_kernels
from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_kernels import reference
from nsa_kernels.triton.nsa import nsa_attention as triton_nsa

pytestmark = pytest.mark.usefixtures("one_thread")

GEO = dict(block_len=16, stride=8, select_len=16, top_n=3, window=20)


def grads_of(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("window", [20, 0])
def test_triton_nsa_matches_reference(seed, G, window):
    H, Dk, Dv = 2, 32, 16
    cu = torch.tensor([0, 9, 70, 101], dtype=torch.int32)
    T = int(cu[-1])
    nc = nsa_kernels.total_compressed_blocks(T, GEO["block_len"], GEO["stride"], cu)
    inputs = [torch.randn(1, T, G * H, Dk), torch.randn(1, nc, H, Dk), torch.randn(1, nc, H, Dv)]
    inputs += [torch.randn(1, T, H, d) for d in (Dk, Dv, Dk, Dv)] + [torch.rand(1, T, G * H, 3)]
    kwargs = dict(GEO, window=window, cu_seqlens=cu)
    grad_out = torch.randn(1, T, G * H, Dv)
    got, got_grads = grads_of(lambda *x: triton_nsa(*x, **kwargs), inputs, grad_out)
    want, want_grads = grads_of(lambda *x: reference.nsa_attention(*x, **kwargs), inputs, grad_out)
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed} o: {m}")
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed} d{name}: {m}")


def test_module_on_triton_backend_matches_reference(seed):
    cfg = NSAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, **GEO)
    layer = NativeSparseAttention(cfg)
    x = torch.randn(1, 77, 32)
    cu = torch.tensor([0, 30, 77], dtype=torch.int32)
    outs, grads = [], []
    for backend in ("triton", "reference"):
        layer.zero_grad()
        with nsa_kernels.use_backend(backend):
            out = layer(x, cu_seqlens=cu)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"seed {seed} grad {name}: {m}")
