"""docs/inference.md's example works as written: its training command parses with the CLI's arguments, and its Python
block generates from a checkpoint in the plain trainer's format (model and configuration of the command's YAML)."""
import argparse
import re
import shlex
from pathlib import Path

import torch

from nsa_dist import GPT
from nsa_dist.train import add_train_arguments
from nsa_dist.training import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "inference.md").read_text()


def test_training_command_parses():
    command = re.search(r"```bash\n(nsa-dist train .*?)\n```", DOC).group(1)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(shlex.split(command)[2:])
    assert (REPO / args.config).is_file()
    assert args.cp == 1


def test_generation_example_runs(tmp_path, monkeypatch, capsys):
    args = shlex.split(re.search(r"```bash\n(nsa-dist train .*?)\n```", DOC).group(1))
    out_dir = tmp_path / args[args.index("--out-dir") + 1]
    out_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = GPT(TrainConfig.load(REPO / args[args.index("--config") + 1]).gpt_config(vocab_size=256))
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, out_dir / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    exec(re.search(r"```python\n(.*?)```", DOC, re.S).group(1), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("The quick brown ")
