"""A checkpoint.pt written by the training job converts (function and ``nsa-dist export-hf``) into a transformers
model with the training model's logits and generations, with the byte tokenizer for byte-level text only; wrong
checkpoints, files and DeepSpeed checkpoint directories and tags alike, are errors naming them."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from nsa_dist import GPT, GPTConfig  # noqa: E402
from nsa_dist.cli import main  # noqa: E402
from nsa_dist.hf import NSAByteTokenizer, NSAGPTForCausalLM, convert_checkpoint  # noqa: E402
from nsa_dist.train import train  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402
from tests.inference.cases import tiny_gpt  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


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


def test_byte_text_models_get_the_tokenizer_and_retrieval_models_none(checkpoint, tmp_path):
    main(["export-hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "text")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "text")
    assert type(tokenizer) is NSAByteTokenizer and tokenizer.encode("lazy dög") == list("lazy dög".encode())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "text").generation_config.pad_token_id == 0
    gpt = tiny_gpt(seed=1)
    torch.save({"model": gpt.state_dict(), "model_config": gpt.config.to_dict(),
                "train_config": TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()}, tmp_path / "retrieval.pt")
    convert_checkpoint(tmp_path / "retrieval.pt", tmp_path / "retrieval")
    assert not (tmp_path / "retrieval" / "tokenizer_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "retrieval").generation_config.pad_token_id is None
    with pytest.raises(OSError, match="holds no tokenizer_config.json"):
        AutoTokenizer.from_pretrained(tmp_path / "retrieval")


def deepspeed_tag(root: Path, tag: str, state: dict) -> Path:
    """A DeepSpeed-like checkpoint directory ``root`` holding tag ``tag`` with ``state`` as its model states."""
    (root / tag).mkdir(parents=True)
    torch.save(state, root / tag / "mp_rank_00_model_states.pt")
    return root


def test_wrong_checkpoints_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="checkpoint '.*missing.pt' does not exist"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "out")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks \['model_config'\]"):
        convert_checkpoint(tmp_path / "partial.pt", tmp_path / "out")
    with pytest.raises(ValueError, match="tag 'step1' applies to DeepSpeed checkpoint directories; .*partial.pt"):
        main(["export-hf", "--checkpoint", str(tmp_path / "partial.pt"), "--tag", "step1", "--out", str(tmp_path)])

    gpt = tiny_gpt(seed=2)
    root = deepspeed_tag(tmp_path / "run" / "checkpoints", "step4", {"model_config": gpt.config.to_dict()})
    deepspeed_tag(root, "step8", {"step": 8})
    with pytest.raises(FileNotFoundError, match=r"checkpoints' has no 'latest' file.*\(available tags: step4, step8\)"):
        main(["export-hf", "--checkpoint", str(root), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"'latest' file.*did you mean .*run/checkpoints\?"):
        convert_checkpoint(tmp_path / "run", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"--tag 'step5' but .*checkpoints' has no such checkpoint "
                                                r"\(available tags: step4, step8\)"):
        main(["export-hf", "--checkpoint", str(root), "--tag", "step5", "--out", str(tmp_path / "out")])
    (root / "latest").write_text("step9")
    with pytest.raises(FileNotFoundError, match="the 'latest' file of .* names tag 'step9' but .* has no such"):
        convert_checkpoint(root, tmp_path / "out")
    (root / "latest").write_text("step8")
    with pytest.raises(ValueError, match="step8/mp_rank_00_model_states.pt records no model_config"):
        convert_checkpoint(root, tmp_path / "out")
    with pytest.raises(ValueError, match="zero_to_fp32 cannot reassemble checkpoint .*step4 "):
        convert_checkpoint(root, tmp_path / "out", tag="step4")  # model states without ZeRO's optimizer states
    (root / "step2").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint .*step2 holds no DeepSpeed \\*model_states.pt file"):
        convert_checkpoint(root, tmp_path / "out", tag="step2")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # deepspeed not installed
    with pytest.raises(ImportError, match=r"pip install 'nsa-dist\[deepspeed\]'"):
        convert_checkpoint(root, tmp_path / "out", tag="step4")
