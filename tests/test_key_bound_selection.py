"""Key-bound block selection against float64 loops (packed documents, lengths that are not multiples of the
tiles or blocks, several GQA ratios), the bound's defining property, and the layer that uses it (or max-logit
selection) on both backends."""
from __future__ import annotations

import math

import pytest
import torch

import nsa_kernels
from tests.helpers import oracle as O
from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_dist import key_bound_selection
from nsa_dist.key_bound_selection import key_bound_select_blocks

PICK = dict(select_len=8, tile_len=4, top_n=3, init_blocks=1, local_blocks=1)


def _oracle_key_bound_blocks(q, k, select_len, tile_len, top_n, init_blocks, local_blocks, scale, cu_seqlens):
    """int ``[B, T, H, top_n]`` by explicit loops: tile minima/maxima, per-head bounds, softmax, group sum."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    out = torch.full((B, T, H, top_n), -1, dtype=torch.int32)
    for b, t, local, _, start, _ in O._queries(B, T, cu_seqlens):
        tiles = [i for i in range((local + 1) // tile_len)]  # complete tiles ending at or before local
        for h in range(H):
            heads = []
            for hq in range(h * HQ // H, (h + 1) * HQ // H):
                logits = {}
                for i in tiles:
                    keys = k[b, start + i * tile_len:start + (i + 1) * tile_len, h].double()
                    qv = q[b, t, hq].double()
                    bound = math.fsum(max(float(qv[d] * keys[:, d].max()), float(qv[d] * keys[:, d].min()))
                                      for d in range(D)) * scale
                    j = i * tile_len // select_len
                    logits[j] = max(logits.get(j, -math.inf), bound)
                heads.append(logits)
            out[b, t, h] = torch.tensor(O.oracle_pick_from_head_logits(heads, local, select_len, top_n, init_blocks,
                                                                       local_blocks))
    return out


@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rows_per_chunk", [1024, 7])
def test_matches_loops(HQ, H, packed, rows_per_chunk, seed, monkeypatch):
    monkeypatch.setattr(key_bound_selection, "ROWS_PER_CHUNK", rows_per_chunk)
    B, T, D = (1 if packed else 2), 53, 5
    cu = torch.tensor([0, 22, T], dtype=torch.int32) if packed else None
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D)
    got = key_bound_select_blocks(q, k, scale=0.7, cu_seqlens=cu, **PICK)
    expected = _oracle_key_bound_blocks(q, k, scale=0.7, cu_seqlens=cu, **PICK)
    assert torch.equal(got, expected), f"HQ={HQ} H={H} packed={packed} seed={seed}"


def test_a_strongly_matched_key_is_selected(seed):
    """A key that one query head matches strongly puts its block in that query's selection, wherever it is."""
    T, D, H, G = 200, 16, 2, 2
    q, k = torch.randn(1, T, H * G, D) * 0.3, torch.randn(1, T, H, D) * 0.3
    t = T - 1
    for _ in range(5):
        needle = int(torch.randint(0, t - 2 * 8, ()))
        k2 = k.clone()
        k2[0, needle, 1] = q[0, t, 3] * 20  # query head 3 belongs to KV head 1
        idx = key_bound_select_blocks(q, k2, scale=D ** -0.5, **PICK)
        assert needle // 8 in idx[0, t, 1].tolist(), f"seed={seed} needle={needle}"


def test_refuses_tiles_that_do_not_divide_the_block():
    with pytest.raises(ValueError, match="select_len=8 must be a multiple of tile_len=3"):
        key_bound_select_blocks(torch.randn(1, 9, 2, 4), torch.randn(1, 9, 1, 4), select_len=8, tile_len=3,
                                top_n=2, init_blocks=0, local_blocks=1)


@pytest.mark.parametrize("scoring", ["key_bound", "max_logit"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_uses_its_own_logit_blocks(scoring, backend, seed):
    """The layer's output is the gated sum of the branch ops over the loops' blocks (reference) of its scoring
    (key bounds or exact block maxima), on both backends; it differs from the paper's compressed scoring."""
    cfg = dict(hidden_size=12, num_heads=4, num_kv_heads=2, head_dim=4, block_len=8, stride=4, select_len=8,
               top_n=3, init_blocks=1, local_blocks=1, window=8, use_rope=False)
    layer = NativeSparseAttention(NSAConfig(**cfg, selection_scoring=scoring))
    paper = NativeSparseAttention(NSAConfig(**cfg))
    paper.load_state_dict(layer.state_dict())
    T = 61
    cu = torch.tensor([0, 25, T], dtype=torch.int32)
    x = torch.randn(1, T, 12)
    with torch.no_grad():
        q = layer.q_proj(x).view(1, T, 4, 4)
        kv = layer.kv_proj(x).view(1, T, 3, 2, 8)
        k_c, k_s, k_w = (kv[:, :, i, :, :4] for i in range(3))
        v_c, v_s, v_w = (kv[:, :, i, :, 4:] for i in range(3))
        gates = torch.sigmoid(layer.gate_proj(x)).view(1, T, 4, 3)
        k_cmp, v_cmp = layer.k_compressor(k_c, cu), layer.v_compressor(v_c, cu)
        pick = dict(select_len=8, top_n=3, init_blocks=1, local_blocks=1, scale=0.5, cu_seqlens=cu)
        idx = (_oracle_key_bound_blocks(q, k_s, tile_len=4, **pick) if scoring == "key_bound"
               else O.oracle_max_logit_blocks(q, k_s, **pick))
        ref = nsa_kernels.reference
        o = ref.gate_combine(gates, ref.compressed_attention(q, k_cmp, v_cmp, 8, 4, None, cu)[0],
                             ref.selected_attention(q, k_s, v_s, idx, 8, None, cu),
                             ref.window_attention(q, k_w, v_w, 8, None, cu))
        expected = layer.o_proj(o.reshape(1, T, 16))
    with nsa_kernels.use_backend(backend):
        y = layer(x, cu_seqlens=cu)
        y_paper = paper(x, cu_seqlens=cu)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6, msg=f"{scoring} backend={backend} seed={seed}")
    assert not torch.allclose(y, y_paper, atol=1e-5), f"the scorings must differ: seed={seed}"
    y.square().sum().backward()
    assert layer.q_proj.weight.grad.abs().sum() > 0


def test_config_refuses_selection_loss_and_unknown_scoring():
    base = dict(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="selection_scoring='quest' is not one of"):
        NSAConfig(**base, selection_scoring="quest")
    with pytest.raises(ValueError, match="selection_loss_weight=1.0 trains the compressed scores"):
        NSAConfig(**base, selection_scoring="key_bound", selection_loss_weight=1.0)
