"""Triton NSA (all branches and gates) and the NativeSparseAttention module on the Triton backend,
against the reference: outputs and every gradient."""
import pytest
import torch

import nsa_kernels
from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_kernels import reference
from nsa_kernels.triton.nsa import nsa_attention as triton_nsa

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: Triton kernels under the CPU interpreter

GEO = dict(block_len=16, stride=8, select_len=16, top_n=3, window=20)


def grads_of(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("G,H", [(1, 2), (4, 2), (16, 1)])
@pytest.mark.parametrize("window", [20, 0])
def test_triton_nsa_matches_reference(seed, G, H, window):
    Dk, Dv = 32, 16
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


@pytest.mark.gpu
@pytest.mark.parametrize("G,docs", [(16, None), (4, [1, 3000, 77, 5114])])
def test_gpu_fused_nsa_matches_composed_branch_ops(G, docs, seed):
    """bf16 on the GPU at T = 8k: the fused Triton NSA (one autograd Function, deltas from the gate pass) against
    the same Triton kernels composed through their own autograd Functions (``gated_nsa``): output and every
    gradient within bf16 summation-order noise."""
    from types import SimpleNamespace

    from nsa_kernels.composition import gated_nsa
    from nsa_kernels.triton.compressed_attention import compressed_attention
    from nsa_kernels.triton.gate_combine import gate_combine
    from nsa_kernels.triton.selected_attention import selected_attention
    from nsa_kernels.triton.select_blocks import select_blocks
    from nsa_kernels.triton.window_attention import window_attention

    dev, H, D, T = "cuda", 4, 128, 8192
    geo = dict(block_len=32, stride=16, select_len=64, top_n=16, window=512, init_blocks=1, local_blocks=2,
               scale=None)
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=dev) if docs else None
    nc = nsa_kernels.total_compressed_blocks(T, 32, 16, None if cu is None else cu.cpu())
    inputs = [torch.randn(1, T, G * H, D, device=dev), torch.randn(1, nc, H, D, device=dev),
              torch.randn(1, nc, H, D, device=dev)]
    inputs += [torch.randn(1, T, H, D, device=dev) for _ in range(4)] + [torch.rand(1, T, G * H, 3, device=dev)]
    inputs = [x.bfloat16() for x in inputs]
    grad_out = torch.randn(1, T, G * H, D, device=dev, dtype=torch.bfloat16)
    ops = SimpleNamespace(compressed_attention=compressed_attention, select_blocks=select_blocks,
                          selected_attention=selected_attention, window_attention=window_attention,
                          gate_combine=gate_combine)
    got, got_grads = grads_of(lambda *x: triton_nsa(*x, **geo, cu_seqlens=cu), inputs, grad_out)
    want, want_grads = grads_of(lambda *x: gated_nsa(ops, *x, **geo, cu_seqlens=cu), inputs, grad_out)
    names = ["o", "dq", "dk_cmp", "dv_cmp", "dk_slc", "dv_slc", "dk_win", "dv_win", "dgates"]
    for name, a, b in zip(names, [got, *got_grads], [want, *want_grads]):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), f"{name} [seed={seed}]"
        rel = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
        assert rel < 1e-2, f"{name}: rel err {rel:.2e} [seed={seed}, G={G}]"
