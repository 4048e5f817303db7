"""Every bad hyper-parameter or input raises an error that names the offending value."""
import pytest
import torch

import nsa_kernels as nk
from nsa_dist import GPTConfig, NativeSparseAttention, NSAConfig
from nsa_dist.training import TrainConfig

BASE = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)


def test_paper_defaults():
    c = NSAConfig(**BASE)
    assert (c.block_len, c.stride, c.select_len, c.top_n, c.window) == (32, 16, 64, 16, 512)
    assert (c.init_blocks, c.local_blocks, c.compressor, c.kv_sharing) == (1, 2, "mlp", "separate")
    assert c.v_head_dim == 16 and c.group_size == 2 and c.num_kv_branches == 3


@pytest.mark.parametrize("override, message", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6 must be a multiple of num_kv_heads=4"),
    (dict(block_len=24, stride=16), "block_len=24 must be a multiple of stride=16"),
    (dict(select_len=40), "select_len=40 must be a multiple of stride=16"),
    (dict(top_n=2), "init_blocks=1 + local_blocks=2 exceeds top_n=2"),
    (dict(window=-1), "window must be a non-negative int, got -1"),
    (dict(stride=0), "stride must be a positive int, got 0"),
    (dict(init_blocks=-1), "init_blocks must be a non-negative int, got -1"),
    (dict(compressor="conv"), "compressor='conv' is not one of"),
    (dict(kv_sharing="tied"), "kv_sharing='tied' is not one of"),
    (dict(head_dim=15), "head_dim=15 must be even for rotary"),
    (dict(rope_theta=0.0), "rope_theta must be > 0, got 0.0"),
    (dict(hidden_size=32.0), "hidden_size must be a positive int, got 32.0"),
    (dict(softmax_scale=-1.0), "softmax_scale must be > 0 or None, got -1.0"),
    (dict(disabled_branches=("window",)), "drop the window branch with window=0"),
    (dict(disabled_branches=("selection",)), "disabled_branches entry 'selection' is not one of"),
    (dict(disabled_branches="compressed"), "must be a list of branch names, got the string 'compressed'"),
    (dict(disabled_branches=["compressed", "selected"], window=0), "leaves no branch"),
])
def test_nsa_config_rejects(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        NSAConfig(**{**BASE, **override})


def test_nsa_config_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown NSAConfig keys \['topn'\]"):
        NSAConfig.from_dict({**BASE, "topn": 4})


def test_module_rejects_wrong_input_shape():
    layer = NativeSparseAttention(NSAConfig(**BASE))
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden_size=64\], got shape \(2, 10, 32\)"):
        layer(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="packed documents .* need batch size B = 1, got B=2"):
        layer(torch.randn(2, 10, 64), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


def _qkv(T=40, HQ=4, H=2, D=8, dtype=torch.float32):
    return torch.randn(1, T, HQ, D, dtype=dtype), torch.randn(1, T, H, D, dtype=dtype), torch.randn(1, T, H, D, dtype=dtype)


def test_op_input_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query heads HQ=4 must be a multiple of KV heads H=3"):
        nk.window_attention(q, torch.randn(1, 40, 3, 8), torch.randn(1, 40, 3, 8), 16)
    with pytest.raises(TypeError, match="k.dtype torch.float64 differs from q.dtype torch.float32"):
        nk.window_attention(q, k.double(), v, 16)
    with pytest.raises(ValueError, match=r"k has shape \(1, 39, 2, 8\): expected length T=40"):
        nk.window_attention(q, k[:, :39], v[:, :39], 16)
    with pytest.raises(ValueError, match=r"q must be \[B, T, HQ, Dk\], got shape \(40, 4, 8\)"):
        nk.window_attention(q[0], k, v, 16)
    with pytest.raises(ValueError, match="k head dim 6 differs from q head dim 8"):
        nk.window_attention(q, k[..., :6], v, 16)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=40, got start 0 and end 39"):
        nk.window_attention(q, k, v, 16, cu_seqlens=torch.tensor([0, 20, 39], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D int32 tensor \[N \+ 1\], got torch.int64"):
        nk.window_attention(q, k, v, 16, cu_seqlens=torch.tensor([0, 40]))
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing, got \[0, 30, 20, 40\]"):
        nk.window_attention(q, k, v, 16, cu_seqlens=torch.tensor([0, 30, 20, 40], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k_cmp has shape \(1, 3, 2, 8\): T=40 with block_len=16, stride=8 gives 4"):
        nk.compressed_attention(q, k[:, :3], v[:, :3], 16, 8)
    with pytest.raises(ValueError, match=r"lse must be \[B, T, HQ\] = \[1, 40, 4\], got \(1, 40, 2\)"):
        nk.select_blocks(q, k[:, :4], torch.zeros(1, 40, 2), 16, 8, 16, 4)
    with pytest.raises(TypeError, match="block_idx must be int32 or int64, got torch.float32"):
        nk.selected_attention(q, k, v, torch.zeros(1, 40, 2, 4), 16)
    with pytest.raises(ValueError, match=r"gates has shape \(1, 40, 4, 2\): expected \[B, T, HQ, 3\]"):
        nk.nsa_attention(q, k[:, :4], v[:, :4], k, v, k, v, torch.rand(1, 40, 4, 2), block_len=16, stride=8,
                         select_len=16, top_n=4, window=8)


def test_gpt_and_train_config_errors():
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        GPTConfig(vocab_size=10, attention="flash")
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_heads=3"):
        GPTConfig(vocab_size=10, hidden_size=100, num_heads=3, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"unknown keys \['stepz'\] in section 'train'"):
        TrainConfig.from_dict({"model": {}, "train": {"stepz": 3}})
    with pytest.raises(ValueError, match="data.kind='text' needs data.text_file"):
        TrainConfig.from_dict({"model": {}, "data": {"kind": "text"}})
    with pytest.raises(ValueError, match="data.seq_len=20 is too short for 8 retrieval pairs"):
        TrainConfig.from_dict({"model": {}, "data": {"seq_len": 20, "retrieval": {"num_pairs": 8}}})
    with pytest.raises(ValueError, match="model.vocab_size is set by the data"):
        TrainConfig.from_dict({"model": {"vocab_size": 5}})
