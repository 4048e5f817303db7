"""On a GPU: prefill runs the Triton training forward and decode steps the torch reference; their logits equal the
Triton forward over the whole sequence (fp32) at paper-like geometry, for every selection scoring."""
import pytest
import torch

import nsa_kernels
from nsa_dist import GPT, GPTConfig
from nsa_dist.inference import ModelCache, decode_step, prefill

from .cases import make_active, rows_of

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("scoring", ["compressed", "key_bound", "max_logit"])
def test_decode_equals_triton_forward(scoring):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, init_std=0.1,
                       nsa=dict(block_len=32, stride=16, select_len=64, top_n=8, window=128,
                                selection_scoring=scoring))
    model = make_active(GPT(config), seed=0).cuda()
    tokens = torch.randint(0, 512, (2, 1250), device="cuda")
    lengths = torch.tensor([700, 1190], device="cuda")
    with torch.no_grad(), nsa_kernels.use_backend("triton"):
        full = model(tokens)
        cache = ModelCache(model, 2, 1250)
        logits = prefill(model, tokens[:, :1190], cache, lengths)
        for b, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(logits[b, :length], full[b, :length], atol=1e-4, rtol=1e-4)
        for step in range(60):
            torch.testing.assert_close(decode_step(model, rows_of(tokens, lengths, step, 1), cache),
                                       rows_of(full, lengths, step, 1), atol=1e-3, rtol=1e-3,
                                       msg=lambda m: f"decode step {step}: {m}")
