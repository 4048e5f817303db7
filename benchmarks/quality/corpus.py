"""The byte-level LM corpus: the running Python's standard-library source, concatenated.

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded), sorted by relative path,
each preceded by a ``# ---- <path> ----`` line. Long-range structure: imports, class and function definitions
referenced thousands of bytes later. Built on the machine that trains (the GPU image has Python 3.12, this one
3.11, so the corpora differ slightly; each run records the corpus's Python version, files and bytes).
"""
from __future__ import annotations

import platform
import sysconfig
from pathlib import Path
from typing import Dict


def build_stdlib_corpus(out_path: str | Path) -> Dict[str, object]:
    """Write the corpus to ``out_path``; return ``{"python", "files", "bytes", "path"}``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library directory {root}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as out:
        for f in files:
            out.write(f"\n# ---- {f.relative_to(root)} ----\n".encode())
            out.write(f.read_bytes())
    return {"python": platform.python_version(), "files": len(files), "bytes": out_path.stat().st_size,
            "path": str(out_path)}
