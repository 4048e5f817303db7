"""Conversion of the training job's ``checkpoint.pt`` into a transformers model directory."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..models.gpt import GPTConfig
from .configuration import NSAGPTConfig
from .modeling import NSAGPTForCausalLM

CHECKPOINT_KEYS = ("model", "model_config")


def load_checkpoint(checkpoint_path: Union[str, Path]) -> NSAGPTForCausalLM:
    """An :class:`NSAGPTForCausalLM` holding the weights of the plain training job's ``checkpoint.pt`` (the GPT's
    state dict under ``"model"``, its :class:`~nsa_dist.GPTConfig` under ``"model_config"``), on the CPU in the
    checkpoint's dtype. ValueError naming the path for a DeepSpeed checkpoint directory or missing keys."""
    path = Path(checkpoint_path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: pass the plain training job's checkpoint.pt (DeepSpeed checkpoints "
                         "under out_dir/checkpoints are not converted)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} lacks {missing}: expected a checkpoint.pt of the training job with keys "
                         f"{list(CHECKPOINT_KEYS)}")
    config = NSAGPTConfig.from_gpt_config(GPTConfig.from_dict(checkpoint["model_config"]))
    model = NSAGPTForCausalLM(config)
    model.model.load_state_dict(checkpoint["model"])
    return model.eval()


def convert_checkpoint(checkpoint_path: Union[str, Path], out_dir: Union[str, Path]) -> NSAGPTForCausalLM:
    """Write the model of ``checkpoint_path`` (:func:`load_checkpoint`) to ``out_dir`` with ``save_pretrained``
    (``config.json``, ``model.safetensors``, ``generation_config.json``), loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import nsa_dist.hf``. Returns the model."""
    model = load_checkpoint(checkpoint_path)
    model.save_pretrained(out_dir)
    return model
