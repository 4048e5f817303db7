"""The caches' memory formulas (nsa_dist.inference.memory) equal the bytes of the tensors they actually hold, and each
further token costs the documented bytes per token."""
import pytest
import torch

from nsa_dist.inference import (DenseLayerCache, ModelCache, NSALayerCache, dense_cache_bytes, nsa_bytes_per_token,
                                nsa_cache_bytes)

from .cases import nsa_config, tiny_gpt

CONFIGS = {
    "separate": {},
    "shared": dict(kv_sharing="shared"),
    "key-bound": dict(selection_scoring="key_bound", num_heads=8, num_kv_heads=2),
    "no-window-dk-ne-dv": dict(window=0, v_head_dim=12),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nsa_cache_bytes_equal_tensors_held(name, dtype):
    config = nsa_config(**CONFIGS[name])
    for batch, capacity in [(1, 5), (3, 61), (2, 64)]:
        cache = NSALayerCache(config, batch, capacity, dtype)
        assert cache.nbytes() == nsa_cache_bytes(config, batch, capacity, dtype), (batch, capacity)
    step = config.stride * config.select_len  # tokens after which every per-token term is whole
    grown = nsa_cache_bytes(config, 3, 100 + step, dtype) - nsa_cache_bytes(config, 3, 100, dtype)
    assert grown == 3 * step * nsa_bytes_per_token(config, dtype)


def test_separate_and_shared_kv_cost_the_same_per_token():
    separate, shared = nsa_config(), nsa_config(kv_sharing="shared")
    assert nsa_bytes_per_token(separate, torch.float32) == nsa_bytes_per_token(shared, torch.float32)
    held = NSALayerCache(separate, 2, 40, torch.float32).nbytes() - NSALayerCache(shared, 2, 40, torch.float32).nbytes()
    assert held == 2 * separate.window * separate.num_kv_heads * (separate.head_dim + separate.v_head_dim) * 4


def test_documented_example():
    """The memory module's example: H = 4, Dk = Dv = 128, d = 16, bf16: 2,176 bytes per token and layer."""
    config = nsa_config(num_heads=16, num_kv_heads=4, head_dim=128, block_len=32, stride=16, select_len=64, top_n=16,
                        window=512, hidden_size=2048)
    assert nsa_bytes_per_token(config, torch.bfloat16) == 2176


def test_dense_and_model_cache_bytes():
    cache = DenseLayerCache(2, 8, 3, 33, torch.bfloat16)
    assert cache.nbytes() == dense_cache_bytes(2, 8, 3, 33, torch.bfloat16)
    for attention in ("nsa", "dense"):
        model = tiny_gpt(attention)
        caches = ModelCache(model, 2, 30)
        assert caches.nbytes() == sum(layer.nbytes() for layer in caches.layers)
        assert len(caches.layers) == model.config.num_layers
