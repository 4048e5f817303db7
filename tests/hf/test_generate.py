"""transformers' generate (greedy, left-padded batches) equals GPT.generate; padded forwards equal unpadded ones; the
generation settings the cache cannot serve are refused by name."""
import pytest
import torch

pytest.importorskip("transformers")

from nsa_dist.hf import NSAGenerationCache  # noqa: E402

from .models import LAYOUTS, hf_copy, layout_gpt, prompts  # noqa: E402

LENGTHS = [23, 9, 31]  # prompts across several compressed and selection blocks and the window
NEW = 30


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_greedy_generate_equals_gpt_generate(layout):
    gpt = layout_gpt(layout)
    model = hf_copy(gpt)
    right, lengths, left, mask = prompts(LENGTHS)
    expected = gpt.generate(right, NEW, lengths=lengths)
    result = model.generate(left, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
    out, T = result.sequences, left.shape[1]
    assert torch.equal(out[:, :T], left)
    # decoded through the project's cache: each sequence holds its prompt and every new token but the last
    assert isinstance(result.cache, NSAGenerationCache)
    assert torch.equal(result.cache.model_cache.lengths, lengths + NEW - 1)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, T:], expected.tokens[b, n:n + NEW]), f"{layout}: row {b}"


def test_one_prompt_without_mask_equals_gpt_generate():
    gpt = layout_gpt("nsa-shared-max-logit")
    right, lengths, _, _ = prompts([37])
    out = hf_copy(gpt).generate(right, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, gpt.generate(right, NEW).tokens)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_padded_forward_equals_each_prompt_alone(layout):
    """Left- and right-padded batches give each row the logits of its prompt alone (0 at padding)."""
    gpt = layout_gpt(layout)
    model = hf_copy(gpt)
    right, lengths, left, mask = prompts(LENGTHS)
    T = left.shape[1]
    with torch.no_grad():
        from_left = model(left, attention_mask=mask).logits
        from_right = model(right, attention_mask=(torch.arange(T) < lengths[:, None]).long()).logits
        for b, n in enumerate(lengths.tolist()):
            alone = gpt(right[b:b + 1, :n])[0]
            torch.testing.assert_close(from_left[b, T - n:], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(from_right[b, :n], alone, rtol=1e-5, atol=1e-5)
            assert not from_left[b, :T - n].any() and not from_right[b, n:].any()


def test_cache_prefill_and_steps_equal_the_full_forward():
    """A forward with an NSAGenerationCache (prefill, then steps of one and of three tokens) gives the rows of one
    forward over the whole sequences."""
    gpt = layout_gpt("nsa-paper")
    model = hf_copy(gpt)
    right, lengths, left, mask = prompts([20, 14])
    follow = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(3))
    T = left.shape[1]
    cache = NSAGenerationCache(capacity=T + 4)
    with torch.no_grad():
        first = model(left, attention_mask=mask, cache=cache).logits
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        one = model(follow[:, :1], attention_mask=mask, cache=cache).logits
        mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
        three = model(follow[:, 1:], attention_mask=mask, cache=cache).logits
        assert cache.get_seq_length() == T + 4
        for b, n in enumerate(lengths.tolist()):
            full = gpt(torch.cat([right[b, :n], follow[b]])[None])[0]
            torch.testing.assert_close(torch.cat([first[b, T - n:], one[b], three[b]]), full, rtol=1e-5, atol=1e-5)


def test_refused_settings_are_named():
    model = hf_copy(layout_gpt("dense"))
    right, _, left, mask = prompts([5, 3])
    with pytest.raises(ValueError, match="beam_search"):
        model.generate(left, attention_mask=mask, max_new_tokens=2, num_beams=2, pad_token_id=0)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(left, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    with pytest.raises(ValueError, match=r"attention_mask row 0 is \[1, 0, 1, 1, 1\]"):
        model(right, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))
    cache = NSAGenerationCache(capacity=8)
    with torch.no_grad():
        model(left, attention_mask=mask, cache=cache)
        with pytest.raises(ValueError, match="only prompts may be padded"):
            model(left[:, :1], attention_mask=torch.cat([mask, torch.tensor([[1], [0]])], dim=1), cache=cache)


def test_sampling_and_generation_without_cache():
    """Sampling (top_k, several sequences per prompt: the cache is built for the expanded batch) is reproducible
    under a seed; greedy generation without a cache (every step a padded forward over the whole sequences) equals
    the cached one."""
    model = hf_copy(layout_gpt("nsa-paper"))
    _, _, left, mask = prompts([12, 7])
    options = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(model.generate(left, do_sample=True, top_k=5, num_return_sequences=2, **options))
    assert draws[0].shape == (4, left.shape[1] + 10) and torch.equal(*draws)
    assert torch.equal(model.generate(left, do_sample=False, use_cache=False, **options),
                       model.generate(left, do_sample=False, **options))
