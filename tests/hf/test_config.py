"""NSAGPTConfig: the GPTConfig fields round trip through to_dict and save_pretrained, checked as GPTConfig checks
them."""
import pytest

pytest.importorskip("transformers")

from nsa_dist import GPTConfig  # noqa: E402
from nsa_dist.hf import NSAGPTConfig  # noqa: E402
from transformers import AutoConfig  # noqa: E402

NSA = dict(block_len=8, stride=4, select_len=8, top_n=4, window=12, kv_sharing="shared",
           selection_scoring="max_logit")


def test_gpt_config_round_trip_through_save_pretrained(tmp_path):
    gpt = GPTConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, nsa=NSA,
                    tie_embeddings=False, rope_theta=500.0)
    config = NSAGPTConfig.from_gpt_config(gpt, eos_token_id=7)
    assert config.gpt_config() == gpt
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is NSAGPTConfig and loaded.model_type == "nsa_gpt"
    assert loaded.gpt_config() == gpt and loaded.eos_token_id == 7
    assert loaded.to_dict() == {**config.to_dict(), "_name_or_path": str(tmp_path)}


def test_resolved_fields_and_standard_names():
    config = NSAGPTConfig(vocab_size=50, hidden_size=64, num_heads=4, num_kv_heads=1, num_layers=3)
    assert (config.head_dim, config.ffn_hidden_size) == (16, 192)  # hidden / heads, 8/3 * hidden rounded to 64
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (3, 4, 1)
    assert config.tie_word_embeddings is True and config.initializer_range == config.init_std


@pytest.mark.parametrize("fields,message", [
    (dict(hidden_size=30, num_heads=4), "hidden_size=30 is not divisible by num_heads=4"),
    (dict(attention="linear"), "attention='linear'"),
    (dict(nsa={"block_size": 8}), "block_size"),
])
def test_invalid_fields_name_the_setting(fields, message):
    with pytest.raises(ValueError, match=message):
        NSAGPTConfig(vocab_size=50, **fields)
