"""The training job's checkpoints read back as weights and configs: the plain backend's ``checkpoint.pt`` and the
DeepSpeed backend's ``engine.save_checkpoint`` directories (ZeRO stages 1 to 3).

Both record the GPT's :class:`~nsa_dist.GPTConfig` (``model_config``) and the training config (``train_config``)
as plain dicts: ``checkpoint.pt`` at its top level, a DeepSpeed checkpoint in the client state of its
``*model_states.pt`` files (saved since 2026-12-08). A DeepSpeed checkpoint's weights are the float32 weights
DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` reassembles from the ZeRO partitions of every rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Union

import torch

from ..deepspeed.checkpoints import checkpoint_tag, load_client_state, model_states_file
from ..models.gpt import GPTConfig

CHECKPOINT_KEYS = ("model", "model_config")


class TrainingCheckpoint(NamedTuple):
    """A training checkpoint: ``weights`` the GPT's state dict (CPU tensors), ``model_config`` its config,
    ``train_config`` the training config as saved (a dict; None when the checkpoint did not record it) and
    ``source`` the file or tag directory read."""
    weights: Dict[str, torch.Tensor]
    model_config: GPTConfig
    train_config: Optional[Dict[str, Any]]
    source: Path

    @property
    def byte_text(self) -> bool:
        """Whether the model was trained on byte-level text (``data.kind: text``: ids are bytes, vocabulary 256)."""
        return (self.train_config or {}).get("data", {}).get("kind") == "text"


def read_checkpoint(path: Union[str, Path], tag: Optional[str] = None) -> TrainingCheckpoint:
    """The checkpoint at ``path``: a plain ``checkpoint.pt`` file (:func:`read_plain_checkpoint`) or a DeepSpeed
    checkpoint directory such as ``<out_dir>/checkpoints`` (:func:`read_deepspeed_checkpoint`) at ``tag``.
    FileNotFoundError naming a missing path; ValueError for a ``tag`` with a file."""
    path = Path(path)
    if path.is_dir():
        return read_deepspeed_checkpoint(path, tag)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: pass the plain job's checkpoint.pt or a "
                                "DeepSpeed checkpoint directory (<out_dir>/checkpoints)")
    if tag is not None:
        raise ValueError(f"tag {tag!r} applies to DeepSpeed checkpoint directories; {str(path)!r} is a file (the "
                         "plain job's checkpoint.pt holds one checkpoint)")
    return read_plain_checkpoint(path)


def read_plain_checkpoint(path: Union[str, Path]) -> TrainingCheckpoint:
    """The plain training job's ``checkpoint.pt`` (the GPT's state dict under ``"model"``, its config under
    ``"model_config"``, the training config under ``"train_config"``), tensors in the checkpoint's dtype.
    ValueError naming the path and the missing keys."""
    path = Path(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} lacks {missing}: expected a checkpoint.pt of the training job with keys "
                         f"{list(CHECKPOINT_KEYS)}")
    return TrainingCheckpoint(checkpoint["model"], GPTConfig.from_dict(checkpoint["model_config"]),
                              checkpoint.get("train_config"), path)


def read_deepspeed_checkpoint(directory: Union[str, Path], tag: Optional[str] = None) -> TrainingCheckpoint:
    """The DeepSpeed training job's checkpoint in ``directory`` (``<out_dir>/checkpoints``) at ``tag``
    (:func:`~nsa_dist.deepspeed.checkpoints.checkpoint_tag`, default the ``latest`` file's): float32 weights from
    DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO 1, 2 or 3, any number of ranks), the configs from the
    client state. ImportError naming the pip extra without deepspeed; ValueError naming the checkpoint when it
    records no ``model_config`` or DeepSpeed cannot reassemble it."""
    from ..deepspeed.requirements import require_deepspeed

    root = Path(directory)
    tag = checkpoint_tag(root, tag, option="--tag")
    require_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    client = deepspeed_client_state(root / tag)
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(f"DeepSpeed's zero_to_fp32 cannot reassemble checkpoint {root / tag} (ZeRO stages 1 to 3 "
                         f"are supported; a truncated file fails here): {exc}") from exc
    return TrainingCheckpoint(weights, GPTConfig.from_dict(client["model_config"]), client.get("train_config"),
                              root / tag)


def deepspeed_client_state(tag_dir: Path) -> Dict[str, Any]:
    """The client state the DeepSpeed backend saved in tag folder ``tag_dir`` (without reading the weights).
    FileNotFoundError when it holds no ``*model_states.pt``; ValueError naming the file when the state records no
    ``model_config``."""
    file = model_states_file(tag_dir)
    state = load_client_state(file)
    if "model_config" not in state:
        raise ValueError(f"{file} records no model_config in its client state: it was not written by the "
                         "training job's DeepSpeed backend (which saves it since 2026-12-08)")
    return state
