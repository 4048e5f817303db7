"""docs/inference.md's Hugging Face section works as written for the plain trainer's checkpoint: its export command
for checkpoint.pt converts a byte-level text model with its tokenizer, and its Python block generates from the
result. (Its DeepSpeed commands run in tests/hf/test_convert_deepspeed.py.)"""
import pytest
import torch

pytest.importorskip("transformers")

from nsa_dist import GPT  # noqa: E402
from nsa_dist.cli import main  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402
from tests.hf.inference_doc import REPO, option, plain_export_command, run_python_example  # noqa: E402


def test_export_and_generation_example_run(tmp_path, monkeypatch, capsys):
    command = plain_export_command()
    checkpoint = tmp_path / option(command, "--checkpoint")
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(0)
    config = TrainConfig.load(REPO / "configs/train/tiny-cpu.yaml").to_dict()
    config["data"].update(kind="text", text_file="my_corpus.txt")
    model = GPT(TrainConfig.from_dict(config).gpt_config(vocab_size=256))
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(), "train_config": config},
               checkpoint)
    monkeypatch.chdir(tmp_path)
    main(command[1:])
    printed = run_python_example(capsys)
    assert printed.startswith("The quick brown ") and "\nOnce upon a " in printed, printed
