"""Decoding refuses what it cannot do with errors that name the setting: context-parallel models, prompts longer
than max_length or the cache, mismatched batches and dtypes, bad lengths and sampling options."""
import pytest
import torch

from nsa_dist.inference import ModelCache, decode_step, prefill, prefill_layer
from nsa_dist.inference.nsa_cache import NSALayerCache

from .cases import nsa_config, nsa_layer, tiny_gpt

TOKENS = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_context_parallel_model_is_refused(attention):
    model = tiny_gpt(attention)
    model.blocks[1].attn.cp_group = object()  # what use_context_parallel sets: any group
    with pytest.raises(ValueError, match=r"one rank.*'blocks.1.attn'.*cp_group"):
        model.generate(TOKENS, 3)
    with pytest.raises(ValueError, match="cp_group"):
        ModelCache(model, 2, 20)


def test_ulysses_model_is_refused():
    model = tiny_gpt("nsa")
    model.blocks[0].attn.ulysses_group = object()
    with pytest.raises(ValueError, match="ulysses_group"):
        model.generate(TOKENS, 3)


def test_prompt_longer_than_max_length():
    with pytest.raises(ValueError, match=r"10 tokens, more than max_length=8"):
        tiny_gpt().generate(TOKENS, 3, max_length=8)


def test_prompt_or_step_past_the_cache_capacity():
    model = tiny_gpt()
    cache = ModelCache(model, 2, 8)
    with pytest.raises(ValueError, match="capacity=8"):
        prefill(model, TOKENS, cache)
    cache = ModelCache(model, 2, 10)
    with torch.no_grad():
        prefill(model, TOKENS, cache)
        with pytest.raises(ValueError, match="capacity=10"):
            decode_step(model, TOKENS[:, :1], cache)


def test_batch_and_dtype_mismatches():
    model = tiny_gpt("dense")
    cache = ModelCache(model, 3, 20)
    with pytest.raises(ValueError, match="batch 2 but the cache was built for batch 3"):
        prefill(model, TOKENS, cache)
    cache = ModelCache(model, 2, 20, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float32 but the cache holds torch.float64"):
        prefill(model, TOKENS, cache)
    with pytest.raises(TypeError, match="integer tensor"):
        model.generate(TOKENS.float(), 3)


@pytest.mark.parametrize("lengths,error,match", [
    (torch.tensor([3]), ValueError, r"lengths must be \[B\] = \[2\]"),
    (torch.tensor([0, 4]), ValueError, r"lengths must lie in \[1, T=10\]"),
    (torch.tensor([3, 11]), ValueError, r"lengths must lie in \[1, T=10\]"),
    (torch.tensor([3.0, 4.0]), TypeError, "lengths must be an integer tensor"),
])
def test_bad_lengths(lengths, error, match):
    with pytest.raises(error, match=match):
        tiny_gpt().generate(TOKENS, 3, lengths=lengths)


@pytest.mark.parametrize("options,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_length=0), "max_length"),
])
def test_bad_generation_options(options, match):
    options = {"max_new_tokens": 3, **options}
    with pytest.raises(ValueError, match=match):
        tiny_gpt().generate(TOKENS, **options)


def test_prefill_refuses_the_selection_warm_up():
    layer = nsa_layer(nsa_config())
    layer.full_selection = True
    x = torch.randn(2, 10, 32)
    with pytest.raises(ValueError, match="full_selection"):
        prefill_layer(layer, x, torch.tensor([10, 10]), NSALayerCache(layer.config, 2, 10, torch.float32))
