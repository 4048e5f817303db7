"""``NSAByteTokenizer`` gives the ids the training job's byte-level text data reads from a file (random text with
multi-byte UTF-8 characters, and bytes that are not UTF-8 at all), decodes them back, pads on the left with id 0,
and round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from nsa_dist.data import ByteTextDataset  # noqa: E402
from nsa_dist.hf import NSAByteTokenizer, NSAGPTConfig, NSAGPTForCausalLM  # noqa: E402
from tests.hf.byte_text import random_bytes, random_text  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

def training_ids(tmp_path: Path, data: bytes) -> list:
    """The ids the training data reads from a file holding ``data``."""
    path = tmp_path / "corpus.bin"
    path.write_bytes(data)
    return ByteTextDataset(path).data.tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return NSAByteTokenizer()


def test_text_ids_are_the_training_datas(tokenizer, tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    for length in (1, 7, 300):
        text = random_text(generator, length)
        expected = training_ids(tmp_path, text.encode("utf-8"))
        assert tokenizer(text)["input_ids"] == expected, f"seed {seed}"
        assert tokenizer.encode(text) == expected == tokenizer.encode_bytes(text.encode("utf-8"))
        assert tokenizer.decode(expected) == text
        assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) == expected
    ascii_text = "NUL \x00 here"
    assert tokenizer.encode(ascii_text) == list(ascii_text.encode()) and len(tokenizer) == tokenizer.vocab_size == 256


def test_arbitrary_bytes_are_the_training_datas(tokenizer, tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    raw = random_bytes(generator, 500) + bytes(range(256))
    expected = training_ids(tmp_path, raw)
    assert tokenizer.encode_bytes(raw) == expected, f"seed {seed}"
    assert tokenizer.encode(raw.decode("utf-8", "surrogateescape")) == expected
    assert tokenizer.decode_bytes(expected) == raw
    assert tokenizer.decode_bytes(torch.tensor(expected)) == raw
    assert tokenizer.decode(expected) == raw.decode("utf-8", "replace")
    lossless = NSAByteTokenizer(errors="surrogateescape")
    assert lossless.decode(expected).encode("utf-8", "surrogateescape") == raw


def test_padding_is_id_0_on_the_left(tokenizer):
    batch = tokenizer(["ab", "wörld"], padding=True, return_tensors="pt")
    word = list("wörld".encode())
    assert batch["input_ids"].tolist() == [[0] * (len(word) - 2) + [97, 98], word]
    assert batch["attention_mask"].tolist() == [[0] * (len(word) - 2) + [1, 1], [1] * len(word)]
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "ab"
    assert tokenizer.decode_bytes(batch["input_ids"][0], skip_special_tokens=True) == b"ab"


def test_save_and_auto_tokenizer_round_trip(tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    text, raw = random_text(generator, 50), random_bytes(generator, 50)
    NSAByteTokenizer(errors="surrogateescape").save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is NSAByteTokenizer and loaded.errors == "surrogateescape" and len(loaded) == 256
    assert loaded.encode(text) == list(text.encode()) and loaded.encode_bytes(raw) == list(raw), f"seed {seed}"
    assert loaded.decode(list(raw)).encode("utf-8", "surrogateescape") == raw
    assert (loaded.pad_token_id, loaded.padding_side) == (0, "left")
    assert type(NSAByteTokenizer.from_pretrained(tmp_path)) is NSAByteTokenizer


def test_wrong_uses_are_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"token id 256 is outside the byte vocabulary \[0, 256\)"):
        tokenizer.decode([65, 256])
    with pytest.raises(ValueError, match="pad_token must be '\\\\x00'"):
        NSAByteTokenizer(pad_token="<pad>")
    with pytest.raises(LookupError, match="bogus"):
        NSAByteTokenizer(errors="bogus")
    config = NSAGPTConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, attention="dense")
    NSAGPTForCausalLM(config).save_pretrained(tmp_path)  # a model without a tokenizer (the retrieval task's)
    with pytest.raises(OSError, match=f"{tmp_path} holds no tokenizer_config.json"):
        AutoTokenizer.from_pretrained(tmp_path)
