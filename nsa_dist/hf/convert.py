"""Conversion of the training job's checkpoints into a transformers model directory: the plain backend's
``checkpoint.pt`` and the DeepSpeed backend's checkpoint directories (:mod:`nsa_dist.hf.checkpoints`).

A model trained on byte-level text (``data.kind: text``) gets its tokenizer beside it, :class:`NSAByteTokenizer`,
whose ids are the training data's (the bytes). A model of the synthetic retrieval task gets none: its ids are the
task's symbols (filler, keys, values, the query marker), which no text encodes, so inputs are those ids and
``AutoTokenizer.from_pretrained`` on its directory is an error naming the directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .checkpoints import TrainingCheckpoint, read_checkpoint
from .configuration import NSAGPTConfig
from .modeling import NSAGPTForCausalLM
from .tokenizer import NSAByteTokenizer


def model_of(checkpoint: TrainingCheckpoint) -> NSAGPTForCausalLM:
    """An :class:`NSAGPTForCausalLM` of ``checkpoint``'s config holding its weights (dtype as read), eval mode."""
    model = NSAGPTForCausalLM(NSAGPTConfig.from_gpt_config(checkpoint.model_config))
    model.model.load_state_dict(checkpoint.weights)
    return model.eval()


def load_checkpoint(checkpoint_path: Union[str, Path], tag: Optional[str] = None) -> NSAGPTForCausalLM:
    """An :class:`NSAGPTForCausalLM` holding the weights of a training checkpoint, on the CPU: the plain job's
    ``checkpoint.pt`` (in its dtype) or a DeepSpeed checkpoint directory such as ``<out_dir>/checkpoints`` at
    ``tag`` (default: its ``latest`` file's; float32 weights from DeepSpeed's ``zero_to_fp32``). Errors name the
    path or tag (:func:`nsa_dist.hf.checkpoints.read_checkpoint`)."""
    return model_of(read_checkpoint(checkpoint_path, tag))


def convert_checkpoint(checkpoint_path: Union[str, Path], out_dir: Union[str, Path],
                       tag: Optional[str] = None) -> NSAGPTForCausalLM:
    """Write the model of a training checkpoint (:func:`load_checkpoint`) to ``out_dir`` with ``save_pretrained``
    (``config.json``, ``model.safetensors``, ``generation_config.json``), loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import nsa_dist.hf``; when it was trained on
    byte-level text, also :class:`NSAByteTokenizer` (``tokenizer_config.json``, for ``AutoTokenizer``), its pad id
    0 then the model's ``generation_config.pad_token_id``. Returns the model."""
    checkpoint = read_checkpoint(checkpoint_path, tag)
    model = model_of(checkpoint)
    tokenizer = NSAByteTokenizer() if checkpoint.byte_text else None
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return model
