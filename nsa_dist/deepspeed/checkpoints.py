"""The DeepSpeed training job's checkpoint directories (``engine.save_checkpoint``: ``<out_dir>/checkpoints`` with
one folder per tag and a ``latest`` file naming the newest), as read back by resuming and by the Hugging Face
export: which tag to read, and the client state the job saved in the tag's ``*model_states.pt``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

LATEST = "latest"


def available_tags(directory: Union[str, Path]) -> str:
    """``"available tags: a, b"`` (the tag folders of ``directory``, sorted) or ``"it holds no checkpoint tags"``,
    for error messages."""
    tags = sorted(p.name for p in Path(directory).iterdir() if p.is_dir())
    return f"available tags: {', '.join(tags)}" if tags else "it holds no checkpoint tags"


def checkpoint_tag(directory: Union[str, Path], tag: Optional[str] = None, option: str = "tag") -> str:
    """The tag of checkpoint directory ``directory`` to read: ``tag``, else the one its ``latest`` file names.

    FileNotFoundError naming the directory, the tag and the tags available when there is no ``latest`` file (with
    a hint when ``directory`` is a run folder holding ``checkpoints`` or ``checkpoint.pt``) or no such tag folder;
    ``option`` is what the user passes a tag with (``"--resume-tag"``, ``"--tag"``), named in the messages."""
    root = Path(directory)
    available = available_tags(root)
    if tag is None:
        if not (root / LATEST).is_file():
            found = [str(p) for p in (root / "checkpoints", root / "checkpoint.pt") if p.exists()]
            hint = f"; did you mean {' or '.join(found)}?" if found else ""
            raise FileNotFoundError(f"{str(root)!r} has no {LATEST!r} file: not a DeepSpeed checkpoint directory, or "
                                    f"pass {option} ({available}){hint}")
        tag = (root / LATEST).read_text().strip()
        named = f"the {LATEST!r} file of {str(root)!r} names tag {tag!r}"
    else:
        named = f"{option} {tag!r}"
    if not tag or not (root / tag).is_dir():
        raise FileNotFoundError(f"{named} but {str(root)!r} has no such checkpoint ({available})")
    return tag


def model_states_file(tag_dir: Union[str, Path]) -> Path:
    """The first ``*model_states.pt`` of tag folder ``tag_dir`` (every rank's holds the same client state).
    FileNotFoundError when there is none."""
    files = sorted(Path(tag_dir).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint {tag_dir} holds no DeepSpeed *model_states.pt file")
    return files[0]


def load_client_state(model_states: Union[str, Path]) -> Dict[str, Any]:
    """The dict saved in ``model_states`` (:func:`model_states_file`): the job's client state beside the module
    weights, memory-mapped so that no weight is read, as DeepSpeed's ``zero_to_fp32`` loads it."""
    return torch.load(model_states, map_location="cpu", mmap=True, weights_only=False)
