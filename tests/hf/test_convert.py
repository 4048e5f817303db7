"""A checkpoint.pt written by the training job converts (function and ``nsa-dist export-hf``) into a transformers
model with the training model's logits and generations."""
import pytest
import torch

pytest.importorskip("transformers")

from nsa_dist import GPT, GPTConfig  # noqa: E402
from nsa_dist.cli import main  # noqa: E402
from nsa_dist.hf import NSAGPTForCausalLM, convert_checkpoint  # noqa: E402
from nsa_dist.train import train  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint.pt`` of 2 training steps of tiny-cpu (one process) on a small byte corpus."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    raw = TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()
    raw["data"].update(kind="text", text_file=str(corpus), seq_len=64)
    raw["train"].update(steps=2, cp=1, batch_size=2, eval_batches=1, log_every=1)
    raw["out_dir"] = str(root / "run")
    train(TrainConfig.from_dict(raw), progress=False)
    return root / "run" / "checkpoint.pt"


def training_model(path) -> GPT:
    """The trained GPT as the checkpoint holds it."""
    saved = torch.load(path, weights_only=True)
    model = GPT(GPTConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["model"])
    return model.eval()


def test_converted_checkpoint_gives_the_training_models_logits(checkpoint, tmp_path):
    gpt = training_model(checkpoint)
    tokens = torch.tensor([list(b"the quick brown fox jumps over the lazy dog and the cat")])
    converted = convert_checkpoint(checkpoint, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded) is NSAGPTForCausalLM and loaded.config.gpt_config() == gpt.config
    with torch.no_grad():
        expected = gpt(tokens)
        assert torch.equal(converted(tokens).logits, expected)
        assert torch.equal(loaded(tokens).logits, expected)
    out = loaded.generate(tokens, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(out, gpt.generate(tokens, 20).tokens)


def test_export_hf_command(checkpoint, tmp_path):
    main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "config.json").is_file() and (tmp_path / "cli" / "model.safetensors").is_file()
    tokens = torch.tensor([list(b"over the lazy")])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "cli")(tokens).logits,
                           training_model(checkpoint)(tokens))


def test_wrong_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="is a directory: pass the plain training job's checkpoint.pt"):
        convert_checkpoint(tmp_path, tmp_path / "out")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks \['model_config'\]"):
        convert_checkpoint(tmp_path / "partial.pt", tmp_path / "out")
