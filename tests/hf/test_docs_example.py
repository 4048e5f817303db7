"""docs/inference.md's Hugging Face section works as written: its export command converts a checkpoint in the plain
trainer's format and its Python block generates from the result."""
import re
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from nsa_dist import GPT  # noqa: E402
from nsa_dist.cli import main  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "inference.md").read_text()
SECTION = DOC[DOC.index("\n## Hugging Face\n"):]


def test_export_and_generation_example_run(tmp_path, monkeypatch, capsys):
    command = shlex.split(re.search(r"```bash\n(nsa-dist export-hf .*?)\n```", SECTION).group(1))
    checkpoint = tmp_path / command[command.index("--checkpoint") + 1]
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = GPT(TrainConfig.load(REPO / "configs/train/tiny-cpu.yaml").gpt_config(vocab_size=256))
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, checkpoint)
    monkeypatch.chdir(tmp_path)
    main(command[1:])
    exec(re.search(r"```python\n(.*?)```", SECTION, re.S).group(1), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("The quick brown ")
