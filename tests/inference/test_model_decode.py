"""A GPT decoded through its caches (prefill prompts of different lengths, then one token or a few per step) gives
the logits of one forward over the whole sequence at every position, for NSA and dense attention."""
import pytest
import torch

from nsa_dist.inference import ModelCache, decode_step, prefill

from .cases import rows_of, tiny_gpt

ATOL = 2e-5
MODELS = {
    "nsa": ("nsa", {}),
    "nsa-shared-key-bound": ("nsa", dict(kv_sharing="shared", selection_scoring="key_bound")),
    "nsa-max-logit-linear": ("nsa", dict(selection_scoring="max_logit", compressor="linear")),
    "dense": ("dense", {}),
}


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_decoded_logits_equal_forward(name, chunk):
    attention, nsa = MODELS[name]
    model = tiny_gpt(attention, seed=7, **nsa)
    tokens = torch.randint(0, 50, (3, 50), generator=torch.Generator().manual_seed(8))
    lengths = torch.tensor([4, 21, 35])
    with torch.no_grad():
        full = model(tokens)
        cache = ModelCache(model, 3, 50)
        logits = prefill(model, tokens[:, :35], cache, lengths)
        for b, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(logits[b, :length], full[b, :length], atol=ATOL, rtol=0)
        for step in range(0, 15 - chunk + 1, chunk):
            logits = decode_step(model, rows_of(tokens, lengths, step, chunk), cache)
            torch.testing.assert_close(logits, rows_of(full, lengths, step, chunk), atol=ATOL, rtol=0,
                                       msg=lambda m: f"decode step at offset {step}: {m}")
    assert cache.lengths.tolist() == (lengths + 15 // chunk * chunk).tolist()
