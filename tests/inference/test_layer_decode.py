"""An NSA layer decoded through its cache (prefill a prompt, then decode the rest) equals the training forward over
the whole sequence at every position: GQA ratios, shared and separate K/V, every selection scoring and compressor,
lengths that are not multiples of the block sizes, prompts of different lengths in one batch, speculative steps."""
import pytest
import torch

from .cases import layer_decode_walk, nsa_config, nsa_layer

ATOL = 2e-5

CONFIGS = {
    "gqa1": dict(num_heads=2, num_kv_heads=2),
    "gqa4": dict(num_heads=4, num_kv_heads=1),
    "gqa8": dict(num_heads=8, num_kv_heads=1),
    "gqa4-two-kv-heads": dict(num_heads=8, num_kv_heads=2),
    "shared-kv": dict(kv_sharing="shared"),
    "key-bound": dict(selection_scoring="key_bound"),
    "max-logit": dict(selection_scoring="max_logit"),
    "shared-key-bound": dict(kv_sharing="shared", selection_scoring="key_bound", num_heads=8, num_kv_heads=2),
    "no-window": dict(window=0),
    "shared-no-window": dict(kv_sharing="shared", window=0),
    "linear-compressor": dict(compressor="linear"),
    "mean-compressor": dict(compressor="mean"),
    "softmax-compressor": dict(compressor="softmax"),
    "dk-ne-dv-no-rope": dict(v_head_dim=12, use_rope=False),
    "init-local-blocks": dict(init_blocks=0, local_blocks=1, top_n=2, block_len=12, stride=4, select_len=12),
    "disabled-compressed": dict(disabled_branches=("compressed",), softmax_scale=0.2),
    # no forced blocks: the scores alone pick every block, the newest included
    "scores-only-compressed": dict(init_blocks=0, local_blocks=0, top_n=2, num_heads=8, num_kv_heads=2),
    "scores-only-key-bound": dict(init_blocks=0, local_blocks=0, top_n=2, selection_scoring="key_bound"),
    "scores-only-max-logit": dict(init_blocks=0, local_blocks=0, top_n=2, selection_scoring="max_logit",
                                  num_heads=8, num_kv_heads=2),
}


def check_walk(layer, x, lengths, chunk=1):
    with torch.no_grad():
        full = layer(x)
    for b, out in enumerate(layer_decode_walk(layer, x, lengths, chunk)):
        torch.testing.assert_close(out, full[b, :out.shape[0]], atol=ATOL, rtol=0, msg=lambda m: f"sequence {b}: {m}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_equals_forward(name):
    layer = nsa_layer(nsa_config(**CONFIGS[name]), seed=1)
    x = torch.randn(3, 61, 32, generator=torch.Generator().manual_seed(2))
    check_walk(layer, x, torch.tensor([1, 13, 30]))


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_speculative_steps_equal_forward(chunk):
    """A few new tokens per step (blocks completing inside the step, more tokens than fit the ring for 5 of a
    window of 4)."""
    layer = nsa_layer(nsa_config(num_heads=4, num_kv_heads=2, window=4 if chunk == 5 else 12), seed=3)
    x = torch.randn(2, 58, 32, generator=torch.Generator().manual_seed(4))
    check_walk(layer, x, torch.tensor([7, 22]), chunk)


def test_long_prompt_and_single_token_prompt():
    """A prompt past the window and several selection blocks, and one of a single token, decoded together."""
    layer = nsa_layer(nsa_config(selection_scoring="max_logit", num_heads=8, num_kv_heads=2), seed=5)
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(6))
    check_walk(layer, x, torch.tensor([45, 1]))
