"""NativeSparseAttention module: document isolation, batch independence, compressors, gradients."""
import math

import pytest
import torch

from nsa_dist import BlockCompressor, NativeSparseAttention, NSAConfig
from nsa_kernels import unfold_blocks

SMALL = dict(block_len=8, stride=4, select_len=8, top_n=3, window=12)


def make_layer(seed, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    cfg = NSAConfig(**{**dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=6,
                              compressor_hidden=8), **SMALL, **overrides})
    layer = NativeSparseAttention(cfg).to(dtype)
    for comp in (layer.k_compressor, layer.v_compressor):  # leave mean-pooling init so every path carries signal
        for p in comp.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("kv_sharing", ["separate", "shared"])
@pytest.mark.parametrize("compressor", ["mlp", "linear", "mean", "softmax"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_packed_documents_equal_separate_runs(seed, kv_sharing, compressor, num_kv_heads):
    """Packing documents with cu_seqlens must give exactly each document's standalone output."""
    layer = make_layer(seed, kv_sharing=kv_sharing, compressor=compressor, num_kv_heads=num_kv_heads)
    lengths = [5, 37, 1, 23, 61]  # shorter than a block, unaligned to l, d and l', a single token
    x = torch.randn(1, sum(lengths), 16, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = layer(x, cu_seqlens=cu)
    alone = torch.cat([layer(part) for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")


def test_batch_rows_are_independent(seed):
    layer = make_layer(seed)
    x = torch.randn(3, 45, 16, dtype=torch.float64)
    rows = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(layer(x), rows, rtol=0, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")


def test_output_is_causal(seed):
    """Changing token t must not change any output before t."""
    layer = make_layer(seed)
    x = torch.randn(1, 50, 16, dtype=torch.float64)
    y = x.clone()
    y[:, 30:] += torch.randn_like(y[:, 30:])
    torch.testing.assert_close(layer(x)[:, :30], layer(y)[:, :30], rtol=0, atol=1e-12)
    assert (layer(x)[:, 30:] - layer(y)[:, 30:]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_compressors_start_from_mean_pooling(seed, kind):
    comp = BlockCompressor(kind, head_dim=8, block_len=8, stride=4, hidden=16).double()
    x = torch.randn(1, 30, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    mean = unfold_blocks(x, 8, 4, cu).mean(dim=-2)
    expected = mean if kind == "mlp" else mean + comp.pos_emb.mean(0)
    torch.testing.assert_close(comp(x, cu), expected, rtol=0, atol=1e-12)


def _softmax_pool_loops(x, beta, block_len, stride, cu_seqlens):
    """Softmax pooling by explicit loops over documents, blocks, heads and coordinates (float64)."""
    T = x.shape[1]
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, T]
    rows = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(0, max(0, (end - start - block_len) // stride + 1)):
            tokens = x[0, start + i * stride:start + i * stride + block_len]          # [l, H, D]
            row = torch.empty(tokens.shape[1:], dtype=torch.float64)
            for h in range(tokens.shape[1]):
                for d in range(tokens.shape[2]):
                    v = [float(t) for t in tokens[:, h, d]]
                    e = [math.exp(float(beta[d]) * a - max(float(beta[d]) * b for b in v)) for a in v]
                    row[h, d] = math.fsum(w * a for w, a in zip(e, v)) / math.fsum(e)
            rows.append(row)
    return torch.stack(rows)[None]


def test_softmax_compressor_is_mean_at_start_and_tends_to_max(seed):
    comp = BlockCompressor("softmax", head_dim=6, block_len=8, stride=4, hidden=16).double()
    x = torch.randn(1, 33, 2, 6, dtype=torch.float64)
    cu = torch.tensor([0, 13, 33], dtype=torch.int32)
    torch.testing.assert_close(comp(x, cu), unfold_blocks(x, 8, 4, cu).mean(dim=-2), rtol=0, atol=1e-12)
    with torch.no_grad():
        comp.beta.copy_(torch.randn(6) * 3)
    torch.testing.assert_close(comp(x, cu), _softmax_pool_loops(x, comp.beta, 8, 4, cu), rtol=1e-10, atol=1e-12,
                               msg=lambda m: f"seed {seed}: {m}")
    with torch.no_grad():
        comp.beta.fill_(1e4)
    # a value delta below the max weighs exp(-beta * delta): the gap to the max is at most
    # (l - 1) * max_delta delta * exp(-beta * delta) = 7 / (e * beta) < 3e-4
    torch.testing.assert_close(comp(x, cu), unfold_blocks(x, 8, 4, cu).amax(dim=-2), rtol=0, atol=3e-4)
    assert torch.autograd.gradcheck(lambda xx, b: torch.func.functional_call(comp, {"beta": b}, (xx, cu)),
                     (x[:, :21].clone().requires_grad_(), (torch.randn(6, dtype=torch.float64) * 2).requires_grad_()))


def test_short_sequence_has_no_nan(seed):
    """T < block_len: no compressed block exists; forward and backward stay finite."""
    layer = make_layer(seed, dtype=torch.float32)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("compressor", ["mlp", "linear", "softmax"])
def test_gradcheck_through_compressor_gates_and_branches(seed, compressor):
    """float64 gradcheck w.r.t. the input and the compressor, gate and projection weights.

    top_n covers every candidate block here, so the (non-differentiable) selection cannot flip under the
    finite-difference perturbation, and every differentiable path is checked.
    """
    layer = make_layer(seed, compressor=compressor, top_n=5, hidden_size=8, num_heads=2, num_kv_heads=1,
                       head_dim=4, v_head_dim=4, compressor_hidden=4, block_len=8, stride=4, select_len=8, window=6)
    cu = torch.tensor([0, 13, 30], dtype=torch.int32)
    x = torch.randn(1, 30, 8, dtype=torch.float64, requires_grad=True)
    names = ["gate_proj.weight", "kv_proj.weight"]
    names += {"mlp": ["k_compressor.pos_emb", "v_compressor.pos_emb", "k_compressor.mlp.0.weight",
                      "v_compressor.mlp.2.weight"],
              "linear": ["k_compressor.pos_emb", "v_compressor.pos_emb", "k_compressor.proj.weight"],
              "softmax": ["k_compressor.beta", "v_compressor.beta"]}[compressor]
    params = dict(layer.named_parameters())
    leaves = [params[n].detach().clone().requires_grad_() for n in names]

    def fn(x, *weights):
        return torch.func.functional_call(layer, dict(zip(names, weights)), (x,), {"cu_seqlens": cu})

    # fast_mode checks v^T J u for random u, v: one backward instead of one per output element
    assert torch.autograd.gradcheck(fn, (x, *leaves), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True), f"seed {seed}"


@pytest.mark.parametrize("disabled", [("compressed",), ("selected",), ("compressed", "selected")])
def test_disabled_branches_equal_zero_gates(seed, disabled):
    """An ablated branch adds nothing: the layer equals the full layer with that branch's gate set to 0."""
    layer = make_layer(seed)
    ablated = make_layer(seed, disabled_branches=disabled)
    ablated.load_state_dict(layer.state_dict())
    x = torch.randn(2, 41, 16, dtype=torch.float64)
    keep = torch.tensor([0.0 if b in disabled else 1.0 for b in ("compressed", "selected", "window")],
                        dtype=torch.float64)
    gate_proj = layer.gate_proj.forward
    layer.gate_proj.forward = lambda h: torch.logit(torch.sigmoid(gate_proj(h)).view(*h.shape[:2], -1, 3) * keep
                                                    ).flatten(-2)
    torch.testing.assert_close(ablated(x), layer(x), rtol=0, atol=1e-12)
    assert (ablated(x) - make_layer(seed)(x)).abs().max() > 1e-6


def test_without_compressed_branch_its_keys_get_no_gradient(seed):
    """The compressed keys only feed the (non-differentiable) selection once the branch's output is off."""
    layer = make_layer(seed, disabled_branches=("compressed",))
    layer(torch.randn(1, 40, 16, dtype=torch.float64)).square().sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in layer.k_compressor.parameters())
    assert all(p.grad.abs().max() > 0 for p in layer.q_proj.parameters())


def test_bf16_autocast_runs_and_matches_fp32(seed):
    """Under autocast the projections, compressor MLPs and gates come out in mixed dtypes; the layer casts them
    to q's dtype, so it runs and stays near the float32 result."""
    layer = make_layer(seed, dtype=torch.float32)
    x = torch.randn(1, 45, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), rtol=0.05, atol=0.05)
