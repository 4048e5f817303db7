"""The Hugging Face section of docs/inference.md as its tests run it: its commands and its Python example."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "inference.md").read_text()
SECTION = DOC[DOC.index("\n## Hugging Face\n"):]


def bash_commands() -> List[List[str]]:
    """The argv of each command of the section's bash block (backslash continuations joined)."""
    block = re.search(r"```bash\n(.*?)```", SECTION, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def plain_export_command() -> List[str]:
    """The argv of the section's ``nsa-dist export-hf`` of a plain ``checkpoint.pt`` (inline code)."""
    return shlex.split(re.search(r"`(nsa-dist export-hf --checkpoint \S+/checkpoint\.pt --out \S+)`", SECTION).group(1))


def option(argv: List[str], name: str) -> str:
    """The value following ``name`` in ``argv``."""
    return argv[argv.index(name) + 1]


def run_python_example(capsys) -> str:
    """Run the section's Python block (in the current directory); what it printed."""
    capsys.readouterr()
    exec(re.search(r"```python\n(.*?)```", SECTION, re.S).group(1), {})
    return capsys.readouterr().out
