"""save_pretrained / from_pretrained (directly and through AutoModelForCausalLM) give the same logits as the GPT; a
fresh model starts as the GPT does; labels give the causal LM loss."""
import pytest
import torch

pytest.importorskip("transformers")

from nsa_dist.hf import NSAGPTForCausalLM  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from .models import LAYOUTS, hf_copy, layout_gpt  # noqa: E402


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_from_pretrained_gives_identical_logits(tmp_path, layout):
    gpt = layout_gpt(layout)
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = gpt(tokens)
        hf_copy(gpt).save_pretrained(tmp_path)
        for cls in (NSAGPTForCausalLM, AutoModelForCausalLM):
            loaded = cls.from_pretrained(tmp_path)
            assert type(loaded) is NSAGPTForCausalLM and not loaded.training
            assert torch.equal(loaded(tokens).logits, expected), cls.__name__


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    hf_copy(layout_gpt("nsa-paper")).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.lm_head.weight is loaded.model.embed.weight


def test_fresh_model_starts_as_the_gpt_does():
    """Building the transformers model runs the GPT's own initialisation (compressors at mean pooling: their MLP
    output layer zero), not transformers' default one."""
    gpt = layout_gpt("nsa-paper")
    model = NSAGPTForCausalLM(hf_copy(gpt).config)
    compressor = model.model.blocks[0].attn.k_compressor
    assert torch.count_nonzero(compressor.mlp[-1].weight) == 0
    assert float(model.model.embed.weight.detach().std()) == pytest.approx(gpt.config.init_std, rel=0.1)


def test_labels_give_the_shifted_causal_lm_loss():
    gpt = layout_gpt("nsa-shared-max-logit")
    tokens = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = hf_copy(gpt)(tokens, labels=tokens).loss
        expected = torch.nn.functional.cross_entropy(gpt(tokens)[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
